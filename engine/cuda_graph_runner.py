"""Decode steps replayed from CUDA graphs captured at fixed batch-size buckets.

The vAttention cache makes this simple: K/V live at virtual addresses reserved once, so a captured graph stays
valid while physical pages come and go underneath. A decode batch of ``N`` sequences is padded up to the next
bucket; padding rows point at the cache's reserved slot (never given to a request, its first rows always mapped),
so they write and read only memory of their own. Per step the host fills one pinned buffer and issues one copy;
everything else (casts, the attention backend's metadata from the slots and positions, the model, the logits) is
inside the graph. Buckets are captured largest first into one memory pool.

Under asynchronous scheduling a decode token may still be on the device (sampled by the step before): the packed
metadata then carries its row in that step's sampled ids, and one gather fills it in before the replay.
"""

from __future__ import annotations

import torch

from engine.batch import ForwardBatch

# Rows of the packed per-step metadata: input ids, positions, slots, KV lengths, and the row of the previous step's
# sampled ids that supplies the input id (-1: the host knows it).
_IDS, _POS, _SLOTS, _LENS, _PREV = range(5)
_NUM_ROWS = 5


def graph_buckets(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, then multiples of 8 up to ``max_batch_size`` (vLLM's capture sizes)."""
    sizes = [b for b in (1, 2, 4) if b <= max_batch_size]
    sizes += list(range(8, max_batch_size + 1, 8))
    if sizes[-1] != max_batch_size:
        sizes.append(max_batch_size)
    return sizes


class CudaGraphRunner:
    """Captures ``model`` decode forwards (one token per sequence) and replays them.

    Args:
        model: the ``LlamaForCausalLM``; its ``forward`` and ``compute_logits`` are captured.
        kv_cache: the ``kvcache.KVCache``; padding rows use its reserved slot.
        max_batch_size: largest decode batch to capture.
        max_seq_len: KV length bound passed to the kernels (a capture-time constant).
    """

    def __init__(self, model, kv_cache, max_batch_size: int, max_seq_len: int):
        self.model = model
        self.kv_cache = kv_cache
        self.device = kv_cache.k[0].device
        self.max_seq_len = max_seq_len
        self.scratch_slot = kv_cache.reserved_slot
        self.buckets = graph_buckets(max_batch_size)
        largest = self.buckets[-1]
        # Two staging buffers used in turn: the host fills one while the copy out of the other may still wait
        # in the stream behind the step before (asynchronous scheduling); an event says when a buffer is free.
        self._staging = [torch.zeros(_NUM_ROWS, largest, dtype=torch.int64, pin_memory=True) for _ in range(2)]
        self._copied = [torch.cuda.Event(), torch.cuda.Event()]
        self._turn = 0
        self._host = self._staging[0]
        self._packed = torch.zeros(_NUM_ROWS, largest, dtype=torch.int64, device=self.device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._logits: dict[int, torch.Tensor] = {}
        self._capture_all()

    def _pad(self, num_seqs: int, bucket: int) -> None:
        """Padding rows: token 0 at position 0 of the scratch slot, KV length 1."""
        host = self._host
        host[_IDS, num_seqs:bucket] = 0
        host[_POS, num_seqs:bucket] = 0
        host[_SLOTS, num_seqs:bucket] = self.scratch_slot
        host[_LENS, num_seqs:bucket] = 1

    def _static_batch(self, bucket: int) -> ForwardBatch:
        packed = self._packed
        lens = packed[_LENS, :bucket].to(torch.int32)
        arange = torch.arange(bucket + 1, dtype=torch.int32, device=self.device)
        ones = [1] * bucket
        # Only the device tensors are true; the host lists are placeholders (positions_cpu None says so).
        return ForwardBatch(
            input_ids=packed[_IDS, :bucket],
            positions=packed[_POS, :bucket],
            slot_ids=packed[_SLOTS, :bucket],
            query_lens=arange[1:] - arange[:-1],
            context_lens=lens - 1,
            seq_lens=lens,
            cu_seqlens_q=arange,
            logits_indices=arange[:bucket].long(),
            max_query_len=1,
            max_seq_len=self.max_seq_len,
            slot_ids_cpu=[self.scratch_slot] * bucket,
            query_lens_cpu=ones,
            context_lens_cpu=[0] * bucket,
            seq_lens_cpu=ones,
            cu_seqlens_q_cpu=list(range(bucket + 1)),
        )

    @torch.inference_mode()
    def _capture_all(self) -> None:
        try:
            self._capture_buckets()
        except BaseException:
            self.close()  # the graphs captured so far would keep a TP group from being left or aborted
            raise

    def _capture_buckets(self) -> None:
        pool = None
        stream = torch.cuda.Stream(self.device)
        for bucket in reversed(self.buckets):
            self._pad(0, bucket)
            self._packed.copy_(self._host)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up outside the graph: kernel selection, lazy init
                    batch = self._static_batch(bucket)
                    self.model.compute_logits(self.model(batch, self.kv_cache)[batch.logits_indices])
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                batch = self._static_batch(bucket)
                logits = self.model.compute_logits(self.model(batch, self.kv_cache)[batch.logits_indices])
            pool = graph.pool()
            self._graphs[bucket] = graph
            self._logits[bucket] = logits
        torch.cuda.synchronize(self.device)

    def close(self) -> None:
        """Destroys the graphs (a replay in flight completes first) and hands their memory pool back."""
        for graph in self._graphs.values():
            graph.reset()
        self._graphs.clear()
        self._logits.clear()

    def can_run(self, seqs) -> bool:
        """Whether ``seqs`` (``(slot, token_ids, start_pos)`` items) is a decode batch a graph holds."""
        return len(seqs) <= self.buckets[-1] and all(len(token_ids) == 1 for _, token_ids, _ in seqs)

    def run(self, seqs, fill: tuple[torch.Tensor, list[int]] | None = None) -> torch.Tensor:
        """Replays the smallest graph that holds the decode batch ``seqs``; returns logits ``[N, vocab]``.
        ``fill = (prev_token_ids, prev_rows)``: input ids to take from the device (see ``ModelRunner.run``)."""
        n = len(seqs)
        bucket = next(b for b in self.buckets if b >= n)
        slots, token_ids, positions = zip(*seqs)
        self._turn ^= 1
        self._copied[self._turn].synchronize()
        host = self._host = self._staging[self._turn]
        host[_IDS, :n] = torch.tensor([t[0] for t in token_ids])
        host[_POS, :n] = torch.tensor(positions)
        host[_SLOTS, :n] = torch.tensor(slots)
        host[_LENS, :n] = host[_POS, :n] + 1
        self._pad(n, bucket)
        if fill is not None:
            host[_PREV, :n] = torch.tensor(fill[1])
        self._packed.copy_(host, non_blocking=True)
        self._copied[self._turn].record(torch.cuda.current_stream(self.device))  # the copy's stream
        if fill is not None:
            ids, prev = self._packed[_IDS, :n], self._packed[_PREV, :n]
            torch.where(prev >= 0, fill[0][prev.clamp(min=0)], ids, out=ids)
        self._graphs[bucket].replay()
        return self._logits[bucket][:n]
