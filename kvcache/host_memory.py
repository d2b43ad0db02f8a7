"""Host (Linux) physical memory: virtual ranges from mmap, physical pages from a memfd.

Reservation is ``mmap(PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE)``; page ``i`` of the pool is
offset ``i * page_size`` of a ``memfd_create`` file, mapped over the reservation with
``MAP_SHARED | MAP_FIXED``, and unmapped by mapping ``PROT_NONE`` anonymous memory over it again, so that
the address range stays reserved. Same semantics as CUDA's virtual memory API, on real memory.
"""

from __future__ import annotations

import ctypes
import mmap as _mmap
import os
from collections.abc import Sequence

import torch

from kvcache.errors import PhysicalMemoryError
from kvcache.fence import Fence, HostTimeline
from kvcache.physical_memory import PhysicalMemory, page_runs

_PROT_NONE = 0
_PROT_RW = _mmap.PROT_READ | _mmap.PROT_WRITE
_MAP_SHARED = _mmap.MAP_SHARED
_MAP_PRIVATE = _mmap.MAP_PRIVATE
_MAP_ANONYMOUS = _mmap.MAP_ANONYMOUS
_MAP_FIXED = 0x10
_MAP_NORESERVE = 0x4000
_MAP_FAILED = ctypes.c_void_p(-1).value

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)


def _mmap_call(address: int, size: int, prot: int, flags: int, fd: int, offset: int) -> int:
    result = _libc.mmap(address, size, prot, flags, fd, offset)
    if result is None or result == _MAP_FAILED:
        errno = ctypes.get_errno()
        raise PhysicalMemoryError(f"mmap({size} bytes) failed: {os.strerror(errno)}")
    return result


class HostMemory(PhysicalMemory):
    """Page pool in a memfd, mapped into reserved host address space."""

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self._fd: int | None = None
        self._page_size = 0
        self._reservations: list[tuple[int, int]] = []
        self._timeline = HostTimeline()

    @property
    def granularity_bytes(self) -> int:
        # 64 KiB rather than the 4 KiB OS page keeps per-call costs low; the paper's GPU driver changes use 64 KiB too.
        return 64 << 10

    def free_memory_bytes(self) -> int:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        raise PhysicalMemoryError("MemAvailable missing from /proc/meminfo")

    def reserve(self, size_bytes: int) -> int:
        flags = _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_NORESERVE
        address = _mmap_call(0, size_bytes, _PROT_NONE, flags, -1, 0)
        self._reservations.append((address, size_bytes))
        return address

    def create_pool(self, num_pages: int, page_size_bytes: int) -> None:
        if self._fd is not None:
            raise PhysicalMemoryError("the page pool already exists")
        fd = os.memfd_create("vattention-kv-pool", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, num_pages * page_size_bytes)
            # Commit the memory now, as cuMemCreate does, so that mapping never fails for want of memory.
            os.posix_fallocate(fd, 0, num_pages * page_size_bytes)
        except OSError as e:
            os.close(fd)
            raise PhysicalMemoryError(f"cannot create a pool of {num_pages} pages: {e}") from e
        self._fd, self._page_size = fd, page_size_bytes

    def map(self, address: int, page_ids: Sequence[int]) -> None:
        flags = _MAP_SHARED | _MAP_FIXED
        done = 0  # pages mapped by this call, undone if a later run fails: all or nothing
        try:
            for position, first_id, length in page_runs(page_ids):
                _mmap_call(
                    address + position * self._page_size,
                    length * self._page_size,
                    _PROT_RW,
                    flags,
                    self._fd,
                    first_id * self._page_size,
                )
                done = position + length
        except PhysicalMemoryError:
            if done:
                self.unmap(address, done)
            raise

    def unmap(self, address: int, num_pages: int) -> None:
        flags = _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_NORESERVE | _MAP_FIXED
        _mmap_call(address, num_pages * self._page_size, _PROT_NONE, flags, -1, 0)

    def as_tensor(self, address: int, size_bytes: int) -> torch.Tensor:
        buffer = (ctypes.c_uint8 * size_bytes).from_address(address)
        return torch.frombuffer(buffer, dtype=torch.uint8, count=size_bytes)

    def record_fence(self) -> Fence:
        return self._timeline.record()

    def close(self) -> None:
        # Unmapping a reservation drops every page mapped inside it.
        for address, size in self._reservations:
            _libc.munmap(address, size)
        self._reservations.clear()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
