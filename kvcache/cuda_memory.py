"""CUDA physical memory through the driver's virtual memory API (``cuda.bindings.driver``).

Pages are ``cuMemCreate`` handles made once; mapping is ``cuMemMap`` per page plus one ``cuMemSetAccess``
over each run of consecutive pages (access setting dominates the per-page cost, so batching it matters).
Driver calls return without waiting for running kernels, so the engine maps while the GPU computes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvcache.errors import PhysicalMemoryError
from kvcache.fence import CudaFence, Fence
from kvcache.physical_memory import PhysicalMemory, page_runs


def _driver():
    try:
        from cuda.bindings import driver
    except ImportError as e:  # pragma: no cover - depends on the install
        raise PhysicalMemoryError("the CUDA backend needs cuda-python (pip install '.[gpu]')") from e
    return driver


def _check(result, call: str):
    """Unpacks a driver call's ``(CUresult, *values)`` tuple, raising on any error code."""
    cu = _driver()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cu.CUresult.CUDA_SUCCESS:
        _, name = cu.cuGetErrorName(err)
        raise PhysicalMemoryError(f"{call} failed: {name.decode() if isinstance(name, bytes) else name}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


class _ArrayInterface:
    """Exposes a device address to ``torch.as_tensor`` through ``__cuda_array_interface__``."""

    def __init__(self, address: int, size_bytes: int):
        self.__cuda_array_interface__ = {
            "shape": (size_bytes,),
            "typestr": "|u1",
            "data": (address, False),
            "version": 3,
            "strides": None,
        }


class CudaMemory(PhysicalMemory):
    """Page pool of ``cuMemCreate`` handles mapped into ``cuMemAddressReserve`` ranges on one device."""

    def __init__(self, device: torch.device | str = "cuda") -> None:
        device = torch.device(device)
        index = device.index if device.index is not None else torch.cuda.current_device()
        self.device = torch.device("cuda", index)
        cu = _driver()
        # Use the primary context that torch uses, so tensors and mappings share one address space.
        torch.cuda.set_device(index)
        torch.cuda.init()
        torch.empty(0, device=self.device)
        _check(cu.cuInit(0), "cuInit")
        if int(_check(cu.cuCtxGetCurrent(), "cuCtxGetCurrent")) == 0:
            ctx = _check(cu.cuDevicePrimaryCtxRetain(index), "cuDevicePrimaryCtxRetain")
            _check(cu.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
        self._cu = cu
        prop = cu.CUmemAllocationProp()
        prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = index
        self._prop = prop
        access = cu.CUmemAccessDesc()
        access.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        access.location.id = index
        access.flags = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        self._access = [access]
        self._granularity = int(
            _check(
                cu.cuMemGetAllocationGranularity(
                    prop, cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM
                ),
                "cuMemGetAllocationGranularity",
            )
        )
        self._handles: list = []
        self._page_size = 0
        self._reservations: list[tuple[int, int]] = []
        self._mapped: set[int] = set()  # address of every mapped page, for teardown

    @property
    def granularity_bytes(self) -> int:
        return self._granularity

    def free_memory_bytes(self) -> int:
        free, _total = _check(self._cu.cuMemGetInfo(), "cuMemGetInfo")
        return int(free)

    def reserve(self, size_bytes: int) -> int:
        if size_bytes % self._granularity:
            raise PhysicalMemoryError(f"reservation of {size_bytes} bytes is not a multiple of {self._granularity}")
        ptr = _check(self._cu.cuMemAddressReserve(size_bytes, self._granularity, 0, 0), "cuMemAddressReserve")
        self._reservations.append((int(ptr), size_bytes))
        return int(ptr)

    def create_pool(self, num_pages: int, page_size_bytes: int) -> None:
        if self._handles:
            raise PhysicalMemoryError("the page pool already exists")
        if page_size_bytes % self._granularity:
            raise PhysicalMemoryError(f"page size {page_size_bytes} is not a multiple of {self._granularity}")
        self._page_size = page_size_bytes
        try:
            for _ in range(num_pages):
                self._handles.append(_check(self._cu.cuMemCreate(page_size_bytes, self._prop, 0), "cuMemCreate"))
        except PhysicalMemoryError:
            self._release_handles()
            raise

    def map(self, address: int, page_ids: Sequence[int]) -> None:
        cu, size = self._cu, self._page_size
        mapped: list[int] = []  # every page this call mapped: a failure anywhere unmaps them all (all or nothing)
        try:
            for position, first_id, length in page_runs(page_ids):
                start = address + position * size
                for i in range(length):
                    _check(cu.cuMemMap(start + i * size, size, 0, self._handles[first_id + i], 0), "cuMemMap")
                    mapped.append(start + i * size)
                _check(cu.cuMemSetAccess(start, length * size, self._access, 1), "cuMemSetAccess")
        except PhysicalMemoryError:
            for page_address in mapped:
                cu.cuMemUnmap(page_address, size)
            raise
        self._mapped.update(mapped)

    def unmap(self, address: int, num_pages: int) -> None:
        size = self._page_size
        # One call may span several per-page mappings as long as none is split.
        _check(self._cu.cuMemUnmap(address, num_pages * size), "cuMemUnmap")
        self._mapped.difference_update(address + i * size for i in range(num_pages))

    def as_tensor(self, address: int, size_bytes: int) -> torch.Tensor:
        # torch asks the driver which device owns the pointer, which fails on an unmapped address:
        # back the first page briefly while the tensor is made.
        first_page_mapped = address in self._mapped
        if not first_page_mapped:
            self.map(address, [0])
        try:
            return torch.as_tensor(_ArrayInterface(address, size_bytes), device=self.device)
        finally:
            if not first_page_mapped:
                self.unmap(address, 1)

    def record_fence(self) -> Fence:
        return CudaFence(self.device)

    def _release_handles(self) -> None:
        for handle in self._handles:
            self._cu.cuMemRelease(handle)
        self._handles.clear()

    def close(self) -> None:
        cu = self._cu
        for address in list(self._mapped):
            cu.cuMemUnmap(address, self._page_size)
        self._mapped.clear()
        self._release_handles()
        for address, size in self._reservations:
            cu.cuMemAddressFree(address, size)
        self._reservations.clear()
