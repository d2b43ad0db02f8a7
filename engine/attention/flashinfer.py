"""GPU default where FlashInfer is importable: prefill rows through FlashInfer's paged prefill kernel (its FA3
backend on Hopper, FA2 elsewhere) reading the vAttention cache in place; decode rows through the Triton split-KV
kernel, as ``triton_flash``.

A paged kernel reads the vAttention cache unmodified: each slot is one page of ``max_seq_len`` tokens.
``kv_cache.k[layer]`` is already ``[slots, max_seq_len, H_kv, D]`` with the slot stride as its page stride (either
KV layout: the kernel takes the token and head strides too), so a sequence's page list is its slot id and its last
page's length is its KV length. Nothing is copied, and there is no block table beyond one entry per sequence.

FlashInfer splits the work once per forward (``plan``, on the host) and runs it per layer. ``plan`` leaves its
partition in a pinned host buffer and queues an asynchronous copy of it to the device, so the host must not plan
into that buffer again before the copy ran; with asynchronous scheduling the host prepares step ``n + 1`` while
the device may still be on step ``n - 1``. ``PagedPrefill`` therefore plans into two wrappers in turn and reuses
one only after an event recorded behind its last copy has passed, as the CUDA graph runner does with its staging
buffers.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from engine.attention.backend import SlotRows, slot_rows
from engine.attention.triton_flash import TritonFlashBackend

if TYPE_CHECKING:
    from engine.batch import ForwardBatch
    from kvcache import KVCache

logger = logging.getLogger(__name__)

FLOAT_WORKSPACE_BYTES = 128 << 20  # FlashInfer's recommended size (split-KV partial outputs)
HEAD_DIMS = (64, 128, 256)  # what FlashInfer's prefill kernels are built for


def flashinfer_prefill_kernel(device: torch.device) -> str:
    """FlashInfer's prefill backend for ``device``: ``fa3`` on Hopper (compute capability 9.x), else ``fa2``."""
    return "fa3" if torch.cuda.get_device_capability(device)[0] == 9 else "fa2"


class PagedPrefill:
    """FlashInfer's paged prefill over ``[pages, page_size, H_kv, D]`` K/V views: ``plan`` once per forward (returns
    the planned wrapper), then the wrapper's ``run(q, (k, v), out=...)`` per layer.

    Args:
        num_heads, num_kv_heads, head_dim, scale: the attention's shape and softmax scale.
        dtype: of q, K/V and the output (16-bit).
        device: a CUDA device.
        kernel: ``"fa3"`` or ``"fa2"``; None: ``flashinfer_prefill_kernel(device)``.
    """

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        dtype: torch.dtype,
        device: torch.device,
        kernel: str | None = None,
    ) -> None:
        import flashinfer

        self.shape = (num_heads, num_kv_heads, head_dim)
        self.scale = scale
        self.dtype = dtype
        self.kernel = kernel or flashinfer_prefill_kernel(device)
        # Shared by both wrappers: their runs are ordered on the stream.
        workspace = torch.empty(FLOAT_WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self._wrappers = [
            flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD", backend=self.kernel) for _ in range(2)
        ]
        self._copied = [torch.cuda.Event(), torch.cuda.Event()]  # one never recorded is complete
        self._turn = 0

    @classmethod
    def for_cache(
        cls, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, k: torch.Tensor
    ) -> PagedPrefill | None:
        """A planner for K/V like ``k`` (one layer's cache tensor, ``[pages, page_size, H_kv, D]``), or None where
        FlashInfer has no prefill kernel for it: not installed, not CUDA, not 16-bit, a head dim other than
        64/128/256, or (FA2, off Hopper) strides past 32 bits, which its paged layout stores as 32-bit integers (a
        token-major slot of Llama-3-8B passes that at 65,536 tokens; FA3 takes 64-bit strides)."""
        if not k.is_cuda or k.dtype not in (torch.float16, torch.bfloat16) or head_dim not in HEAD_DIMS:
            return None
        if importlib.util.find_spec("flashinfer") is None:
            return None
        kernel = flashinfer_prefill_kernel(k.device)
        if kernel == "fa2" and max(k.stride()) >= 2**32:
            return None
        return cls(num_heads, num_kv_heads, head_dim, scale, k.dtype, k.device, kernel)

    def plan(
        self,
        qo_indptr: list[int],
        kv_indptr: list[int],
        kv_indices: list[int] | torch.Tensor,
        last_page_len: list[int],
        page_size: int,
    ) -> Any:
        """Plans causal attention of ``len(qo_indptr) - 1`` sequences: sequence ``i``'s queries are rows
        ``qo_indptr[i]:qo_indptr[i+1]`` of q (the last ones of its KV), its KV the pages
        ``kv_indices[kv_indptr[i]:kv_indptr[i+1]]``, the last holding ``last_page_len[i]`` tokens. Host values in;
        returns the wrapper to ``run``."""
        self._turn ^= 1
        self._copied[self._turn].synchronize()  # this wrapper's pinned buffer is free again
        wrapper = self._wrappers[self._turn]
        num_heads, num_kv_heads, head_dim = self.shape
        wrapper.plan(
            torch.tensor(qo_indptr, dtype=torch.int32),
            torch.tensor(kv_indptr, dtype=torch.int32),
            torch.as_tensor(kv_indices, dtype=torch.int32),
            torch.tensor(last_page_len, dtype=torch.int32),
            num_heads,
            num_kv_heads,
            head_dim,
            page_size,
            causal=True,
            sm_scale=self.scale,
            q_data_type=self.dtype,
            kv_data_type=self.dtype,
            non_blocking=True,
        )
        self._copied[self._turn].record()
        return wrapper


@dataclass(frozen=True)
class PlannedSlotRows(SlotRows):
    """``SlotRows`` plus the FlashInfer plan of the batch's prefill rows (None: none or not planned)."""

    prefill: Any = None


class FlashInferBackend(TritonFlashBackend):
    """Decode rows through the Triton split-KV kernel, prefill rows through FlashInfer (see the module doc); falls
    back to FA2 varlen for prefill where FlashInfer has no kernel (head dims other than 64/128/256, 32-bit)."""

    name = "flashinfer"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        import flashinfer  # noqa: F401  (ImportError names the missing package)

        # FlashInfer's planner, decided once (at start, or at the first prefill): None where FlashInfer has no kernel
        # for the cache or its kernel failed to build, and prefill stays on FA2 varlen.
        self.prefill_planner: PagedPrefill | None = None
        self._planner_decided = False

    def _planner(self, kv_cache: KVCache) -> PagedPrefill | None:
        if not self._planner_decided:
            self._planner_decided = True
            self.prefill_planner = PagedPrefill.for_cache(
                self.num_heads, self.num_kv_heads, self.head_dim, self.scale, kv_cache.k[0]
            )
        return self.prefill_planner

    def build_metadata(self, batch: ForwardBatch, kv_cache: KVCache) -> SlotRows:
        rows = slot_rows(batch, kv_cache.slot_stride_tokens)
        if batch.is_decode_only:
            return rows
        planner = self._planner(kv_cache)
        if planner is None:
            return rows
        first = batch.num_leading_decodes  # those go to the decode kernel
        cu = batch.cu_seqlens_q_cpu
        count = batch.num_seqs - first
        plan = planner.plan(
            [c - cu[first] for c in cu[first:]],
            list(range(count + 1)),
            batch.slot_ids_cpu[first:],
            batch.seq_lens_cpu[first:],
            kv_cache.k[0].shape[1],
        )
        return PlannedSlotRows(rows.slot_mapping, rows.kv_start_rows, plan)

    def _prefill(self, layer, q, batch, meta, kv_cache, first, out=None):
        plan = getattr(meta, "prefill", None)
        if plan is None:
            return super()._prefill(layer, q, batch, meta, kv_cache, first, out)
        return plan.run(q, (kv_cache.k[layer], kv_cache.v[layer]), out=out if out is not None else torch.empty_like(q))

    def compile_kernels(self, kv_cache: KVCache) -> None:
        """Builds (or loads from FlashInfer's cache) the prefill kernel now, not in the first request's step, by
        planning and running a one-token prompt over the cache's reserved slot (its first row is always mapped;
        attention writes nothing)."""
        try:
            planner = self._planner(kv_cache)  # its workspaces are allocated here, after the KV pool took its share
            if planner is None:
                return
            slot = kv_cache.reserved_slot
            plan = planner.plan([0, 1], [0, 1], [slot], [1], kv_cache.k[0].shape[1])
            q = torch.zeros(1, self.num_heads, self.head_dim, dtype=planner.dtype, device=kv_cache.k[0].device)
            plan.run(q, (kv_cache.k[0], kv_cache.v[0]))
            torch.cuda.synchronize(q.device)
        except Exception as exc:  # e.g. no nvcc on the machine: the engine still serves, on FA2
            logger.warning("FlashInfer's prefill kernel is unavailable (%s); prefill runs on torch's FA2 varlen", exc)
            self.prefill_planner = None
