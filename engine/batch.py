"""Batch metadata: one typed object describing a flattened forward batch.

A batch mixes prefill chunks and decode tokens of several sequences. Their tokens are
concatenated into one flat ``[T]`` stream (``T`` = total new tokens, ``N`` = sequences);
per-sequence metadata locates each sequence's tokens in that stream and names its cache slot.
Where a slot's KV lives in the cache (rows of ``k_flat`` / ``v_flat``, or a block table) is the
attention backend's business: ``AttentionBackend.build_metadata``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch


def to_device(values, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """Host values (a list or a CPU tensor) as a ``device`` tensor without waiting for the device: through
    pinned memory and an asynchronous copy. A plain ``torch.tensor(..., device="cuda")`` synchronizes the
    stream, which would stall the host behind the forward it just launched."""
    host = values.to(dtype) if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    device = torch.device(device)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


@dataclass(frozen=True)
class ForwardBatch:
    """Metadata of one model forward. Device tensors live on ``device``; ``*_cpu`` twins are
    Python lists of ints for host-side loops (no device sync needed to read them).

    Attributes:
        input_ids: ``[T]`` int64, new tokens of all sequences, concatenated in sequence order.
        positions: ``[T]`` int64, absolute position of each token within its sequence.
        slot_ids: ``[N]`` int64, cache slot of each sequence.
        query_lens: ``[N]`` int32, new tokens per sequence (1 for decode, chunk length for prefill).
        context_lens: ``[N]`` int32, tokens already in the cache before this step (= ``start_pos``).
        seq_lens: ``[N]`` int32, ``context_lens + query_lens``: KV length after this step.
        cu_seqlens_q: ``[N+1]`` int32, prefix sums of ``query_lens`` (offsets into the flat stream).
        logits_indices: ``[N]`` int64, flat index of each sequence's last token (its logits row).
        max_query_len / max_seq_len: Python ints, maxima of ``query_lens`` / ``seq_lens``.
        slot_ids_cpu, query_lens_cpu, context_lens_cpu, seq_lens_cpu, cu_seqlens_q_cpu: host twins.
        positions_cpu: ``[T]`` int64 host twin of ``positions``; None where the batch is a CUDA graph's static one,
            whose host lists are placeholders (then only the device tensors are true).
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_ids: torch.Tensor
    query_lens: torch.Tensor
    context_lens: torch.Tensor
    seq_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor
    logits_indices: torch.Tensor
    max_query_len: int
    max_seq_len: int
    slot_ids_cpu: list[int]
    query_lens_cpu: list[int]
    context_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    cu_seqlens_q_cpu: list[int]
    positions_cpu: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        """``T``: new tokens in the batch."""
        return self.cu_seqlens_q_cpu[-1]

    @property
    def num_seqs(self) -> int:
        """``N``: sequences in the batch."""
        return len(self.slot_ids_cpu)

    @property
    def is_decode_only(self) -> bool:
        """True when every sequence contributes exactly one token."""
        return self.max_query_len == 1

    @functools.cached_property
    def num_leading_decodes(self) -> int:
        """Sequences at the front of the batch that contribute one token each (the scheduler puts decodes first).
        Computed once per batch (every layer's attention asks)."""
        return next((i for i, n in enumerate(self.query_lens_cpu) if n != 1), self.num_seqs)

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    @classmethod
    def build(cls, seqs: Sequence[tuple[int, Sequence[int], int]], device: torch.device | str) -> ForwardBatch:
        """Build the batch from ``(slot, token_ids, start_pos)`` per sequence.

        ``token_ids`` is the chunk of tokens to run for that sequence and ``start_pos`` the number
        of its tokens already in the cache.

        Raises:
            ValueError: empty batch, empty chunk, negative ``start_pos`` / slot, or a slot twice.
        """
        if len(seqs) == 0:
            raise ValueError("seqs must hold at least one sequence")
        slot_ids: list[int] = []
        query_lens: list[int] = []
        context_lens: list[int] = []
        input_ids: list[int] = []
        for i, (slot, token_ids, start_pos) in enumerate(seqs):
            if slot < 0:
                raise ValueError(f"seqs[{i}] slot must be >= 0, got {slot}")
            if start_pos < 0:
                raise ValueError(f"seqs[{i}] start_pos must be >= 0, got {start_pos}")
            if len(token_ids) == 0:
                raise ValueError(f"seqs[{i}] token_ids must hold at least one token")
            slot_ids.append(int(slot))
            query_lens.append(len(token_ids))
            context_lens.append(int(start_pos))
            input_ids.extend(token_ids)
        if len(set(slot_ids)) != len(slot_ids):
            raise ValueError(f"seqs slots must be distinct, got {slot_ids}")

        seq_lens = [c + q for c, q in zip(context_lens, query_lens)]
        cu_seqlens_q = [0]
        for q in query_lens:
            cu_seqlens_q.append(cu_seqlens_q[-1] + q)
        # Positions: a range per sequence, extended in C. (torch's CPU repeat_interleave forks its thread pool for
        # any size; on a many-core GPU host that cost milliseconds a step.)
        positions_list: list[int] = []
        for c, q in zip(context_lens, query_lens):
            positions_list.extend(range(c, c + q))
        q_lens_t = torch.tensor(query_lens, dtype=torch.int64)
        ctx_t = torch.tensor(context_lens, dtype=torch.int64)
        cu_t = torch.tensor(cu_seqlens_q, dtype=torch.int64)
        positions = torch.tensor(positions_list, dtype=torch.int64)

        return cls(
            input_ids=to_device(input_ids, torch.int64, device),
            positions=to_device(positions, torch.int64, device),
            slot_ids=to_device(slot_ids, torch.int64, device),
            query_lens=to_device(q_lens_t, torch.int32, device),
            context_lens=to_device(ctx_t, torch.int32, device),
            seq_lens=to_device(seq_lens, torch.int32, device),
            cu_seqlens_q=to_device(cu_t, torch.int32, device),
            logits_indices=to_device(cu_t[1:] - 1, torch.int64, device),
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            slot_ids_cpu=slot_ids,
            query_lens_cpu=query_lens,
            context_lens_cpu=context_lens,
            seq_lens_cpu=seq_lens,
            cu_seqlens_q_cpu=cu_seqlens_q,
            positions_cpu=positions,
        )
