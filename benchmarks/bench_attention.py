"""Attention over the vAttention cache (non-paged kernels) against paged baselines, on one GPU.

    python benchmarks/bench_attention.py                 # full grid (B 1-512 x L 512-128K: 34 points within the
                                                         # K+V limit; the earlier 18-point grid took ~2 minutes)
    python benchmarks/bench_attention.py --gqa 8         # 64 query heads over 8 KV heads (Llama-3-70B's ratio)
    python benchmarks/bench_attention.py --quick         # three decode points and one prefill point
    python benchmarks/bench_attention.py --plot-only benchmarks/results/attention_h100.json   # PNGs, no GPU

Decode, Llama-3-8B shapes (32 q heads, 8 KV heads, d=128, bf16; ``--gqa 8``: 64 q heads), one layer of a real
``VirtualKVCache`` on CUDA virtual memory whose slots are mapped point by point, for that point's batch and context
only; sequence ``i`` in the ``i``-th slot (``slot * slot_stride_tokens ...`` rows of ``k_flat[0]``):

    non-paged  fa2_varlen    torch's FlashAttention-2 varlen: cu_seqlens_k = slot starts, seqused_k = lengths
               triton_split  engine/attention/triton_decode.py: split-KV, one program per (seq, KV head, split)
               fi_slots_tc   FlashInfer's paged decode (tensor cores) over the cache, each slot one page of max_seq_len
    paged      triton_paged  the same Triton kernel reading through a block table (benchmarks/triton_paged_decode.py)
               fi_paged      FlashInfer's paged decode (CUDA cores), 16-token pages: what vLLM and SGLang run
               fi_paged_tc   the same with tensor cores (FlashInfer's prefill kernel on one query row)
               flex_paged    FlexAttention with torch's experimental PagedAttention block-mask conversion

FlashInfer kernels (where ``flashinfer`` is importable; skipped otherwise) compile on first use, 15-30 s each.

The paged kernels read a copy of the same K/V laid out in 16-token pages scattered at random over a pool sized for
the batch at the longest context. Figures: bytes moved (K/V read + q read + output written) over kernel time,
against the device-to-device copy bandwidth measured in the same run (target: >= 80% where B*L >= 64K tokens), and
the best non-paged kernel against the best paged one on the same work (target: >= 1.3x).

Prefill: causal chunks of new tokens after cached context. Over the cache: fa2_varlen (torch's FA2) and fi_slots
(FlashInfer's paged prefill, FA3 on Hopper, each slot one page: the engine's path, ``engine/attention/flashinfer.py``).
Paged (16-token pages): fi_fa3_paged, fi_fa2_paged (FlashInfer) and flex_paged (block mask 128x16). TFLOP/s of
useful work (causal FLOPs) against a bf16 8192^3 GEMM measured in the same run. Targets: fa2_varlen >= 1.2x
flex_paged; fi_slots >= 1.0x fi_fa3_paged (the best kernel of the day, unmodified, loses nothing over our cache).

Trust: every kernel is first run on a batch of varied lengths in non-monotonic slot order and compared with fp32
SDPA on gathered K/V; at every timed point its output for the first and last sequences is compared again. A kernel
that errors (compile failure, OOM) or disagrees is recorded as failed with the error, and the run goes on. Times are
medians of CUDA-event timings after warm-up, with L2 flushed before each call; decode kernels are replayed from a
CUDA graph as the engine's decode steps are (a kernel that cannot be captured is timed eagerly: ``timed_in``), and
each one's host launch time is reported beside (``host_launch_us``: what an eager call costs the step loop). The optional, slow-to-compile Flex
variants are skipped once the time budget (--budget-s) is spent, so the whole run stays under 6 minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS_DIR, machine_info, measure_copy_bandwidth, write_result  # noqa: E402

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 8, 128  # Llama-3-8B, TP=1
GROUP = NUM_HEADS // NUM_KV_HEADS
DTYPE = torch.bfloat16
SCALE = HEAD_DIM**-0.5
PAGE_SIZE = 16
KV_LIMIT_BYTES = 32e9  # decode points whose K+V (one layer) exceed this are skipped (the paged copy doubles it)
FLEX_COPY_LIMIT_BYTES = 8e9  # FlexAttention's own copy of the pages is made only for batches this small
DEVICE = "cuda"  # "cpu" only under --dry-run-cpu

DECODE_BATCHES = [1, 8, 32, 64, 128, 256, 512]
DECODE_CONTEXTS = [512, 1024, 4096, 16384, 65536, 131072]
QUICK_DECODE = [(8, 4096), (64, 4096), (1, 16384)]
PREFILL_POINTS = [(1, 2048, 2048), (1, 8192, 8192), (1, 16384, 0), (4, 4096, 4096)]  # (requests, chunk, prior)
QUICK_PREFILL = [(1, 4096, 4096)]
CHECK_BATCH = 8  # the varied-length correctness batch reuses this batch size's compiled Flex kernel
CHECK_LENS = [4096, 1, 1537, 17, 4000, 16, 2048, 999]

BW_TARGET = 0.80
BW_TARGET_MIN_TOKENS = 64 * 1024
DECODE_SPEEDUP_TARGET = 1.3
PREFILL_SPEEDUP_TARGET = 1.2

DECODE_KERNELS = ["fa2_varlen", "triton_split", "fi_slots_tc", "triton_paged", "fi_paged", "fi_paged_tc", "flex_paged"]
NONPAGED = {"fa2_varlen", "triton_split", "fi_slots_tc"}
PREFILL_KERNELS = ["fa2_varlen", "fi_slots", "fi_fa3_paged", "fi_fa2_paged", "flex_paged"]
FI_DECODE_TARGET = 1.0  # our decode kernel / FlashInfer paged decode (tensor cores), at every point
FI_PREFILL_TARGET = 1.0  # the engine's prefill over the slots / FlashInfer FA3 over 16-token pages

# FlexAttention needs block sizes that divide the 16-token pages; tried in order, the first that compiles and
# passes the check is kept for the rest of the run.
FLEX_DECODE_OPTIONS = [
    {"BLOCK_M": 16, "BLOCK_N": 16},
    {"BLOCK_N": 16},
    None,
    {"FORCE_USE_FLEX_ATTENTION": True, "BLOCK_M": 16, "BLOCK_N": 16},
]
FLEX_PREFILL_OPTIONS = [
    {"BLOCK_M": 128, "BLOCK_N": 16},
    {"BLOCK_M": 64, "BLOCK_N": 16},
    {"BLOCK_M": 64, "BLOCK_N": 16, "num_warps": 4, "num_stages": 2},
    None,
]

REL_TOL, ABS_TOL = 2e-2, 5e-4  # bf16 output vs fp32 reference: |err| <= REL_TOL * max|ref| + ABS_TOL


# ---- timing ------------------------------------------------------------------------------------------------------


class Timer:
    """Median kernel time by CUDA events, one pair per call, 256 MiB written between calls to flush L2 (50 MiB on
    an H100) so that small problems are not served from cache. The flush also keeps the GPU busy while Python
    launches the next call, for calls whose launch takes less than the flush (~90 us on an H100).

    ``graph=True`` times ``fn`` replayed from a CUDA graph, as the engine runs decode: a kernel's host launch cost
    (Triton's argument binding, a wrapper's Python) is then not in its time even where it exceeds the flush. A
    callable that cannot be captured is timed eagerly; ``last_mode`` says which was used."""

    def __init__(self, warmup_ms: float = 20.0, rep_ms: float = 60.0):
        self.flush = torch.empty(256 << 20 if DEVICE == "cuda" else 1, dtype=torch.int8, device=DEVICE)
        self.warmup_ms, self.rep_ms = warmup_ms, rep_ms
        self.last_mode = "eager"
        self.last_capture_error: str | None = None

    def _captured(self, fn):
        """``fn`` as a CUDA graph's replay, or None (with ``last_capture_error``) where capture fails."""
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                fn()  # warm-up on the capture stream (lazy allocations, workspaces)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            graph.replay()
            torch.cuda.synchronize()
            return graph.replay
        except Exception as exc:  # noqa: BLE001 - timed eagerly instead; the reason is reported
            self.last_capture_error = short_error(exc)
            torch.cuda.synchronize()
            return None

    def __call__(self, fn, graph: bool = False) -> float:
        self.last_mode, self.last_capture_error = "eager", None
        if DEVICE != "cuda":  # --dry-run-cpu: the wall clock of one call; exercises the code, not the hardware
            t = time.perf_counter()  # (Runner.measure made the first call; Triton kernels run interpreted, slowly)
            fn()
            return (time.perf_counter() - t) * 1e3
        fn()
        torch.cuda.synchronize()
        if graph:
            replay = self._captured(fn)
            if replay is not None:
                fn, self.last_mode = replay, "graph"
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(3):
            fn()
        end.record()
        torch.cuda.synchronize()
        estimate_ms = max(start.elapsed_time(end) / 3, 1e-3)
        for _ in range(max(1, min(100, int(self.warmup_ms / estimate_ms)))):
            fn()
        runs = max(5, min(500, int(self.rep_ms / estimate_ms)))
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
        for i in range(runs):
            self.flush.zero_()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))

    @staticmethod
    def host_us(fn, calls: int = 50) -> float:
        """Host time of one eager call (the launch path alone; the device work is queued, not awaited)."""
        fn()
        sync()
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        elapsed = time.perf_counter() - t
        sync()
        return elapsed / calls * 1e6


def measure_gemm_tflops(timer: Timer, n: int) -> float:
    a = torch.randn(n, n, dtype=DTYPE, device=DEVICE)
    b = torch.randn(n, n, dtype=DTYPE, device=DEVICE)
    c = torch.empty(n, n, dtype=DTYPE, device=DEVICE)
    ms = timer(lambda: torch.matmul(a, b, out=c))
    return 2 * n**3 / (ms * 1e-3) / 1e12


# ---- references and checks ---------------------------------------------------------------------------------------


def expand_kv(rows: torch.Tensor) -> torch.Tensor:
    """``[L, Hkv, D]`` cache rows -> ``[Hq, L, D]`` fp32 (each KV head repeated for its query heads)."""
    return rows.float().transpose(0, 1).repeat_interleave(GROUP, 0)


def decode_reference(q_row: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor) -> torch.Tensor:
    """``q_row [Hq, D]`` over ``[L, Hkv, D]`` -> ``[Hq, D]`` fp32."""
    out = torch.nn.functional.scaled_dot_product_attention(
        q_row.float()[:, None], expand_kv(k_rows), expand_kv(v_rows), scale=SCALE
    )
    return out[:, 0]


def compare(out: torch.Tensor, ref: torch.Tensor) -> tuple[bool, float, float]:
    err = (out.float() - ref).abs().max().item()
    scale = ref.abs().max().item()
    return math.isfinite(err) and err <= REL_TOL * scale + ABS_TOL, err, scale


def short_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= 800 else text[:800] + " ..."


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def free_gpu_memory() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# ---- the cache and the decode batches ----------------------------------------------------------------------------


class DecodeBatch:
    """Queries and per-sequence metadata for one decode step over slots ``slots`` with lengths ``lens``.

    ``cu_seqlens_k`` is ``[B+1]`` int32: slot start rows, then the end of the last sequence (monotonic when the
    slots are ascending) or, with ``engine_style_cu_k``, a final 0 as the engine's ``SlotRows.kv_start_rows``."""

    def __init__(self, cache, slots: list[int], lens: list[int], seed: int, engine_style_cu_k: bool = False):
        batch = len(slots)
        gen = torch.Generator(device=DEVICE).manual_seed(seed)
        self.slots, self.lens = slots, lens
        self.batch, self.max_len = batch, max(lens)
        self.q = torch.randn(batch, NUM_HEADS, HEAD_DIM, generator=gen, device=DEVICE).to(DTYPE)
        starts = [s * cache.slot_stride_tokens for s in slots]
        self.slot_starts = torch.tensor(starts, dtype=torch.int64, device=DEVICE)
        self.seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
        self.cu_seqlens_q = torch.arange(batch + 1, dtype=torch.int32, device=DEVICE)
        last = 0 if engine_style_cu_k else starts[-1] + lens[-1]
        self.cu_seqlens_k = torch.tensor(starts + [last], dtype=torch.int32, device=DEVICE)
        self.kv_bytes = sum(lens) * NUM_KV_HEADS * HEAD_DIM * DTYPE.itemsize * 2
        self.bytes_moved = self.kv_bytes + 2 * self.q.numel() * DTYPE.itemsize  # + q read, output written

    def reference_rows(self, cache, rows: list[int]) -> dict[int, torch.Tensor]:
        out = {}
        for b in rows:
            k = cache.k[0][self.slots[b], : self.lens[b]]
            v = cache.v[0][self.slots[b], : self.lens[b]]
            out[b] = decode_reference(self.q[b], k, v)
        return out


class PagedCopy:
    """The batch's K/V copied into a pool of ``num_pages`` 16-token pages, pages taken at random, in two layouts:
    ``[pages * 16, Hkv, D]`` for the Triton paged kernel (vLLM's block layout) and ``[1, Hkv, pages * 16, D]``
    for FlexAttention's PagedAttention."""

    def __init__(self, num_pages: int, with_flex: bool):
        self.num_pages = num_pages
        rows = num_pages * PAGE_SIZE
        self.k = torch.empty(rows, NUM_KV_HEADS, HEAD_DIM, dtype=DTYPE, device=DEVICE)
        self.v = torch.empty_like(self.k)
        self.k_flex = self.v_flex = None
        if with_flex:
            self.k_flex = torch.empty(1, NUM_KV_HEADS, rows, HEAD_DIM, dtype=DTYPE, device=DEVICE)
            self.v_flex = torch.empty_like(self.k_flex)

    def fill(self, cache, slots: list[int], lens: list[int], seed: int) -> torch.Tensor:
        """Copies each sequence's first ``lens[b]`` rows (rounded up to whole pages) -> block table ``[B, P]``."""
        pages = [-(-n // PAGE_SIZE) for n in lens]
        if sum(pages) > self.num_pages:
            raise ValueError(f"{sum(pages)} pages needed, pool has {self.num_pages}")
        gen = torch.Generator(device=DEVICE).manual_seed(seed)
        perm = torch.randperm(self.num_pages, generator=gen, device=DEVICE)
        table = torch.zeros(len(slots), max(pages), dtype=torch.int32, device=DEVICE)
        used = 0
        k_blocks = self.k.view(-1, PAGE_SIZE, NUM_KV_HEADS, HEAD_DIM)
        v_blocks = self.v.view(-1, PAGE_SIZE, NUM_KV_HEADS, HEAD_DIM)
        for b, (slot, n) in enumerate(zip(slots, pages)):
            ids = perm[used : used + n]
            used += n
            table[b, :n] = ids.to(torch.int32)
            # Rows up to the page boundary are mapped: slots are allocated at the longest context, a multiple of 16.
            k_src = cache.k[0][slot, : n * PAGE_SIZE].view(n, PAGE_SIZE, NUM_KV_HEADS, HEAD_DIM)
            v_src = cache.v[0][slot, : n * PAGE_SIZE].view(n, PAGE_SIZE, NUM_KV_HEADS, HEAD_DIM)
            k_blocks[ids] = k_src
            v_blocks[ids] = v_src
            if self.k_flex is not None:
                self.k_flex[0].view(NUM_KV_HEADS, -1, PAGE_SIZE, HEAD_DIM)[:, ids] = k_src.permute(2, 0, 1, 3)
                self.v_flex[0].view(NUM_KV_HEADS, -1, PAGE_SIZE, HEAD_DIM)[:, ids] = v_src.permute(2, 0, 1, 3)
        return table


def flex_page_table(num_pages: int, table: torch.Tensor, lens: list[int]):
    """A PagedAttention whose page table is ``table`` (the Triton kernel's, so both read the same pages)."""
    from torch.nn.attention.experimental._paged_attention import PagedAttention

    paged = PagedAttention(num_pages, PAGE_SIZE, table.shape[0], device=DEVICE)
    for b, n in enumerate(lens):
        pages = -(-n // PAGE_SIZE)
        ids = table[b, :pages].long()
        paged.page_table[b, :pages] = ids
        paged.physical_to_logical[b, ids] = torch.arange(pages, device=DEVICE)
        paged.capacity[b] = pages * PAGE_SIZE
    paged.empty_pages = []
    return paged


# ---- the kernels -------------------------------------------------------------------------------------------------


def fa2(q, k, v, cu_q, cu_k, max_q, max_k, causal, seqused_k):
    return torch.ops.aten._flash_attention_forward(
        q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False, scale=SCALE, seqused_k=seqused_k
    )[0]


def _flashinfer():
    try:
        import flashinfer
    except ImportError as exc:
        raise _Skip(f"skipped: flashinfer not importable ({short_error(exc)})") from None
    return flashinfer


_FI_WORKSPACE: list[torch.Tensor] = []


def fi_workspace() -> torch.Tensor:
    """One 128 MiB float workspace for every FlashInfer wrapper of the run (their calls never overlap)."""
    if not _FI_WORKSPACE:
        _FI_WORKSPACE.append(torch.empty(128 << 20, dtype=torch.uint8, device=DEVICE))
    return _FI_WORKSPACE[0]


def page_lists(table: torch.Tensor, lens: list[int], page_size: int) -> tuple[list[int], list[int], list[int]]:
    """FlashInfer's ``(indptr, indices, last_page_len)`` of sequences whose pages are the rows of ``table``."""
    indptr, indices, last = [0], [], []
    rows = table.tolist()
    for row, n in zip(rows, lens):
        pages = -(-n // page_size)
        indptr.append(indptr[-1] + pages)
        indices.extend(row[:pages])
        last.append(n - (pages - 1) * page_size)
    return indptr, indices, last


def fi_decode(q, k_pages, v_pages, indptr, indices, last, page_size: int, tensor_cores: bool):
    """A planned FlashInfer paged decode over ``[pages, page_size, Hkv, D]`` K/V -> a callable."""
    fi = _flashinfer()
    wrapper = fi.BatchDecodeWithPagedKVCacheWrapper(fi_workspace(), "NHD", use_tensor_cores=tensor_cores)

    def as_tensor(values):
        return torch.tensor(values, dtype=torch.int32, device=DEVICE)

    wrapper.plan(
        as_tensor(indptr),
        as_tensor(indices),
        as_tensor(last),
        NUM_HEADS,
        NUM_KV_HEADS,
        HEAD_DIM,
        page_size,
        q_data_type=DTYPE,
        kv_data_type=DTYPE,
        sm_scale=SCALE,
    )
    out = torch.empty_like(q)
    return lambda: wrapper.run(q, (k_pages, v_pages), out=out)


def fi_prefill(q, k_pages, v_pages, cu_q, indptr, indices, last, page_size: int, kernel: str):
    """A planned FlashInfer paged prefill (the engine's ``PagedPrefill``) -> a callable."""
    _flashinfer()
    from engine.attention.flashinfer import PagedPrefill

    planner = PagedPrefill(NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, SCALE, DTYPE, q.device, kernel=kernel)
    wrapper = planner.plan(cu_q, indptr, indices, last, page_size)
    out = torch.empty_like(q)
    return lambda: wrapper.run(q, (k_pages, v_pages), out=out)


class Runner:
    """Holds the run's state: cache, timer, time budget, per-kernel disablement and Flex options found."""

    def __init__(self, args, cache):
        self.args, self.cache = args, cache
        self.timer = Timer()
        self.t0 = time.perf_counter()
        self.disabled: dict[str, str] = {}
        self.flex_options: dict[str, dict | None] = {}
        self.flex_attempts: dict[str, list] = {"decode": [], "prefill": []}
        self.failures: list[dict] = []
        self.flex = None
        self.checks: dict = {}
        self.slots: list[int] = []  # the current point's slots (Runner.fill)
        try:
            import torch._dynamo.config as dynamo_config

            for name in (
                "cache_size_limit",
                "recompile_limit",
                "accumulated_cache_size_limit",
                "accumulated_recompile_limit",
            ):
                if hasattr(dynamo_config, name):
                    setattr(dynamo_config, name, max(getattr(dynamo_config, name), 256))
        except Exception:  # noqa: BLE001 - only raises limits; the defaults still work for small grids
            pass

    def fill(self, count: int, num_tokens: int) -> list[int]:
        """Slots for the next point: the previous point's freed and unmapped, ``count`` slots mapped for
        ``num_tokens`` tokens each (whole pages), K and V random (seeded by the shape). Returns them, ascending."""
        cache = self.cache
        for slot in self.slots:
            cache.free(slot)
        sync()  # nothing queued touches the freed slots any more: reclaim unmaps them now
        cache.reclaim()
        self.slots = sorted(cache.allocate(num_tokens) for _ in range(count))
        gen = torch.Generator(device=DEVICE).manual_seed(count * 1000003 + num_tokens)
        rows = cache.capacity_tokens(self.slots[0])  # mapped rows of each slot: writing them touches no unmapped page
        for slot in self.slots:
            for part in (cache.k[0], cache.v[0]):
                part[slot, :rows].normal_(generator=gen)
        sync()
        return self.slots

    def elapsed_s(self) -> float:
        return time.perf_counter() - self.t0

    def flex_allowed(self, phase: str) -> str | None:
        """None if Flex may still compile in this phase, else why not."""
        share = 0.6 if phase == "decode" else 1.0
        if self.elapsed_s() > share * self.args.budget_s:
            return f"skipped: time budget ({self.args.budget_s:.0f} s, {share:.0%} for {phase}) spent"
        return None

    def flex_fn(self):
        if self.flex is None:
            from torch.nn.attention.flex_attention import flex_attention

            self.flex = torch.compile(flex_attention, dynamic=False)
        return self.flex

    def measure(
        self, name: str, point: str, build, check, disabled_key: str | None = None, graph: bool = False
    ) -> dict:
        """Builds ``name``'s callable, checks its output with ``check(out) -> (ok, detail)``, then times it
        (``graph``: replayed from a CUDA graph where it can be captured, see ``Timer``)."""
        disabled_key = disabled_key or name
        if disabled_key in self.disabled:
            return {"status": "skipped", "error": self.disabled[disabled_key]}
        try:
            t = time.perf_counter()
            fn = build()
            out = fn()
            sync()
            first_call_s = time.perf_counter() - t
            ok, detail = check(out)
            if not ok:
                result = {"status": "wrong", "error": f"output differs from the fp32 reference: {detail}"}
                self.failures.append({"kernel": name, "point": point, **result})
                return result
            del out
            ms = self.timer(fn, graph=graph)
            result = {"status": "ok", "time_us": ms * 1e3, "first_call_s": round(first_call_s, 2), "check": detail}
            if graph:
                result["timed_in"] = self.timer.last_mode
                if self.timer.last_capture_error:
                    result["capture_error"] = self.timer.last_capture_error
                if DEVICE == "cuda":
                    result["host_launch_us"] = round(Timer.host_us(fn), 1)
            return result
        except _Skip as skip:
            return {"status": "skipped", "error": str(skip)}
        except Exception as exc:  # noqa: BLE001 - one kernel's failure must not end the run
            result = {"status": "failed", "error": short_error(exc)}
            self.failures.append(
                {"kernel": name, "point": point, **result, "traceback": traceback.format_exc(limit=6)[-3000:]}
            )
            free_gpu_memory()
            return result

    # -- decode ----------------------------------------------------------------------------------------------------

    def decode_builders(self, batch: DecodeBatch, paged: PagedCopy | None, table, flex_state):
        from benchmarks.triton_paged_decode import triton_paged_decode_attention
        from engine.attention.triton_decode import triton_decode_attention

        cache = self.cache
        k, v = cache.k_flat[0], cache.v_flat[0]

        def build_fa2():
            return lambda: fa2(
                batch.q, k, v, batch.cu_seqlens_q, batch.cu_seqlens_k, 1, batch.max_len, False, batch.seq_lens
            )

        def build_triton():
            return lambda: triton_decode_attention(
                batch.q, k, v, batch.slot_starts, batch.seq_lens, SCALE, max_seq_len=batch.max_len
            )

        def build_triton_paged():
            return lambda: triton_paged_decode_attention(
                batch.q, paged.k, paged.v, table, batch.seq_lens, SCALE, PAGE_SIZE, max_seq_len=batch.max_len
            )

        def build_fi_slots():
            # Each slot one page of max_seq_len tokens: page list = the slot, last page length = the length.
            count = len(batch.slots)
            return fi_decode(
                batch.q,
                cache.k[0],
                cache.v[0],
                list(range(count + 1)),
                batch.slots,
                batch.lens,
                cache.k[0].shape[1],
                tensor_cores=True,
            )

        def build_fi_paged(tensor_cores):
            def build():
                indptr, indices, last = page_lists(table, batch.lens, PAGE_SIZE)
                pages = paged.k.view(-1, PAGE_SIZE, NUM_KV_HEADS, HEAD_DIM)
                values = paged.v.view(-1, PAGE_SIZE, NUM_KV_HEADS, HEAD_DIM)
                return fi_decode(batch.q, pages, values, indptr, indices, last, PAGE_SIZE, tensor_cores)

            return build

        def build_flex():
            why = self.flex_allowed("decode")
            if why:
                raise _Skip(why)
            if paged.k_flex is None:
                raise _Skip("skipped: no Flex copy of the pages (time budget spent before this batch)")
            return self.flex_decode_fn(batch, paged, table, flex_state)

        return {
            "fa2_varlen": build_fa2,
            "triton_split": build_triton,
            "fi_slots_tc": build_fi_slots,
            "triton_paged": build_triton_paged,
            "fi_paged": build_fi_paged(False),
            "fi_paged_tc": build_fi_paged(True),
            "flex_paged": build_flex,
        }

    def flex_decode_fn(self, batch: DecodeBatch, paged: PagedCopy, table, flex_state):
        from torch.nn.attention.flex_attention import create_block_mask

        flex = self.flex_fn()
        if "block_mask" not in flex_state:
            lens = torch.tensor(batch.lens, dtype=torch.int64, device=DEVICE)

            def within_length(b, h, q_idx, kv_idx):
                return kv_idx < lens[b]

            kv_len = -(-batch.max_len // PAGE_SIZE) * PAGE_SIZE
            logical = create_block_mask(
                within_length, batch.batch, None, 1, kv_len, device=DEVICE, BLOCK_SIZE=(PAGE_SIZE, PAGE_SIZE)
            )
            pa = flex_page_table(paged.num_pages, table, batch.lens)
            flex_state["block_mask"] = pa.convert_logical_block_mask(logical)
            flex_state["keep"] = (lens, pa)
        mask = flex_state["block_mask"]
        q4 = batch.q.unsqueeze(2)  # [B, Hq, 1, D]

        def call(options):
            return flex(
                q4, paged.k_flex, paged.v_flex, block_mask=mask, scale=SCALE, enable_gqa=True, kernel_options=options
            ).squeeze(2)

        return self._with_flex_options("decode", FLEX_DECODE_OPTIONS, call)

    def _with_flex_options(self, phase, candidates, call):
        """Returns a callable using the options already found for ``phase``, or finds the first that compiles."""
        if phase in self.flex_options:
            options = self.flex_options[phase]
            return lambda: call(options)
        errors = []
        for options in candidates:
            if self.elapsed_s() > self.args.budget_s:
                break
            try:
                call(options)
                sync()
            except Exception as exc:  # noqa: BLE001 - try the next block sizes
                errors.append({"kernel_options": options, "error": short_error(exc)})
                free_gpu_memory()
                continue
            self.flex_attempts[phase] = errors + [{"kernel_options": options, "error": None}]
            self.flex_options[phase] = options
            return lambda: call(options)
        self.flex_attempts[phase] = errors
        self.disabled_flex(phase, errors)
        raise RuntimeError(
            f"no FlexAttention kernel_options compiled for {phase}: "
            + "; ".join(f"{e['kernel_options']}: {e['error'][:300]}" for e in errors)
        )

    def disabled_flex(self, phase, errors):
        # Remember the failure: compiling again at every point would burn the time budget.
        key = "flex_paged" if phase == "decode" else "flex_paged_prefill"
        self.disabled[key] = f"failed: no kernel_options compiled ({len(errors)} tried, see flex_attempts)"

    def decode_point(self, batch: DecodeBatch, paged: PagedCopy, table, rows: list[int], label: str) -> dict:
        refs = batch.reference_rows(self.cache, rows)

        def check(out):
            worst = (True, 0.0, 0.0)
            for b in rows:
                ok, err, scale = compare(out[b], refs[b])
                if not ok or err > worst[1]:
                    worst = (ok and worst[0], err, scale)
            return worst[0], {"rows_checked": rows, "max_abs_err": worst[1], "max_abs_ref": worst[2]}

        flex_state: dict = {}
        builders = self.decode_builders(batch, paged, table, flex_state)
        kernels = {}
        for name in DECODE_KERNELS:
            result = self.measure(name, label, builders[name], check, graph=True)
            if result.get("status") == "ok":
                result["gb_s"] = batch.bytes_moved / (result["time_us"] * 1e-6) / 1e9
            kernels[name] = result
        return kernels


class _Skip(Exception):
    """A variant not run (time budget, no pool for it); reported as skipped, not failed."""


def run_decode(runner: Runner, args) -> dict:
    cache = runner.cache
    points = args.decode_grid
    token_bytes_kv = NUM_KV_HEADS * HEAD_DIM * DTYPE.itemsize * 2
    skipped = [
        {
            "batch": b,
            "context": n,
            "status": f"skipped: K+V {b * n * token_bytes_kv / 1e9:.1f} GB > {KV_LIMIT_BYTES / 1e9:.0f} GB",
        }
        for b, n in points
        if b * n * token_bytes_kv > KV_LIMIT_BYTES
    ]
    points = [(b, n) for b, n in points if b * n * token_bytes_kv <= KV_LIMIT_BYTES]
    batches = sorted({b for b, _ in points} | {CHECK_BATCH}, key=lambda b: (b != CHECK_BATCH, b))
    results = []
    for batch_size in batches:
        longest = max(
            [n for b, n in points if b == batch_size] + ([max(CHECK_LENS)] if batch_size == CHECK_BATCH else [])
        )
        pool_bytes = batch_size * longest * token_bytes_kv
        flex_ok = (
            runner.flex_allowed("decode") is None
            and "flex_paged" not in runner.disabled
            and pool_bytes <= FLEX_COPY_LIMIT_BYTES
        )
        try:
            paged = PagedCopy(-(-batch_size * longest // PAGE_SIZE) + batch_size, with_flex=flex_ok)
        except torch.OutOfMemoryError as exc:
            for b, n in points:
                if b == batch_size:
                    results.append({"batch": b, "context": n, "status": f"failed: paged pool: {short_error(exc)}"})
            free_gpu_memory()
            continue
        if batch_size == CHECK_BATCH:
            runner.checks["decode"] = decode_checks(runner, paged)
        for b, n in points:
            if b != batch_size:
                continue
            label = f"decode B={b} L={n}"
            batch = DecodeBatch(cache, runner.fill(b, n), [n] * b, seed=b * 100003 + n)
            table = paged.fill(cache, batch.slots, batch.lens, seed=n)
            kernels = runner.decode_point(batch, paged, table, sorted({0, b - 1}), label)
            point = {"batch": b, "context": n, "tokens": b * n, "bytes_moved": batch.bytes_moved, "kernels": kernels}
            results.append(summarise_decode_point(point, runner.copy_gb_s))
            print_decode_row(results[-1], runner.copy_gb_s)
            del batch, table
        del paged
        free_gpu_memory()
    results.sort(key=lambda p: (p["batch"], p["context"]))
    return {"points": results + skipped}


def decode_checks(runner: Runner, paged: PagedCopy) -> dict:
    """Every decode kernel on varied lengths in non-monotonic slot order (slots 7..0), the engine's kv_start_rows
    convention (slot starts then 0) for FA2. Kernels failing here are disabled for the run."""
    cache = runner.cache
    lens = [min(n, cache.config.max_seq_len) for n in CHECK_LENS]
    slots = runner.fill(CHECK_BATCH, max(lens))[::-1]
    batch = DecodeBatch(cache, slots, lens, seed=7, engine_style_cu_k=True)
    table = paged.fill(cache, slots, lens, seed=7)
    kernels = runner.decode_point(batch, paged, table, list(range(CHECK_BATCH)), "decode check (varied lengths)")
    report = {"lens": lens, "slots": slots, "kernels": kernels}
    # FA2 with slots out of order: if it fails, find out whether ascending starts would have worked.
    fa2_ok = kernels["fa2_varlen"].get("status") == "ok"
    report["fa2_accepts_non_monotonic_cu_seqlens_k"] = fa2_ok
    if not fa2_ok:
        order = sorted(range(CHECK_BATCH), key=lambda i: slots[i])
        sorted_batch = DecodeBatch(cache, [slots[i] for i in order], [lens[i] for i in order], seed=7)
        refs = sorted_batch.reference_rows(cache, list(range(CHECK_BATCH)))
        try:
            out = fa2(
                sorted_batch.q,
                cache.k_flat[0],
                cache.v_flat[0],
                sorted_batch.cu_seqlens_q,
                sorted_batch.cu_seqlens_k,
                1,
                sorted_batch.max_len,
                False,
                sorted_batch.seq_lens,
            )
            report["fa2_with_sorted_slots_ok"] = all(compare(out[b], refs[b])[0] for b in range(CHECK_BATCH))
        except Exception as exc:  # noqa: BLE001
            report["fa2_with_sorted_slots_ok"] = False
            report["fa2_with_sorted_slots_error"] = short_error(exc)
        # The grid uses ascending slots; keep FA2 enabled if that form works.
        if report.get("fa2_with_sorted_slots_ok"):
            runner.disabled.pop("fa2_varlen", None)
    for name, result in kernels.items():
        if result.get("status") in ("wrong", "failed") and not (
            name == "fa2_varlen" and report.get("fa2_with_sorted_slots_ok")
        ):
            runner.disabled[name] = f"failed the varied-length check: {result.get('error', '')[:300]}"
    print(
        f"decode check (B={CHECK_BATCH}, varied lengths, slots out of order): "
        + ", ".join(f"{k}={v.get('status')}" for k, v in kernels.items())
    )
    return report


def summarise_decode_point(point: dict, copy_gb_s: float) -> dict:
    ok = {k: r for k, r in point["kernels"].items() if r.get("status") == "ok"}
    for r in ok.values():
        r["fraction_of_copy_bw"] = r["gb_s"] / copy_gb_s
    nonpaged = {k: r for k, r in ok.items() if k in NONPAGED}
    paged = {k: r for k, r in ok.items() if k not in NONPAGED}
    if nonpaged:
        best = min(nonpaged, key=lambda k: nonpaged[k]["time_us"])
        point["best_nonpaged"] = best
        point["best_nonpaged_fraction_of_copy_bw"] = nonpaged[best]["fraction_of_copy_bw"]
        if point["tokens"] >= BW_TARGET_MIN_TOKENS:
            point["bw_target_met"] = nonpaged[best]["fraction_of_copy_bw"] >= BW_TARGET
    if paged:
        point["best_paged"] = min(paged, key=lambda k: paged[k]["time_us"])
    if nonpaged and paged:
        point["speedup_vs_best_paged"] = (
            paged[point["best_paged"]]["time_us"] / nonpaged[point["best_nonpaged"]]["time_us"]
        )
        point["speedup_target_met"] = point["speedup_vs_best_paged"] >= DECODE_SPEEDUP_TARGET
    if "triton_split" in ok and "fi_paged_tc" in ok:
        point["triton_split_vs_fi_paged_tc"] = ok["fi_paged_tc"]["time_us"] / ok["triton_split"]["time_us"]
    return point


def print_decode_header(copy_gb_s: float) -> None:
    print(
        f"\nDecode, {NUM_HEADS} q heads / {NUM_KV_HEADS} KV heads x {HEAD_DIM}, {str(DTYPE).removeprefix('torch.')}. Cells: GB/s (% of copy bandwidth {copy_gb_s:.0f} GB/s). Targets: "
        f">= {BW_TARGET:.0%} of copy where B*L >= {BW_TARGET_MIN_TOKENS // 1024}K; best non-paged >= "
        f"{DECODE_SPEEDUP_TARGET}x best paged"
    )
    print(
        f"{'B':>4} {'L':>6} {'tokens':>7} | "
        + " | ".join(f"{k:>15}" for k in DECODE_KERNELS)
        + " | np/paged  bw  x | ours/fi_tc"
    )


def print_decode_row(point: dict, copy_gb_s: float) -> None:
    cells = []
    for name in DECODE_KERNELS:
        r = point["kernels"].get(name, {})
        if r.get("status") == "ok":
            cells.append(f"{r['gb_s']:7.0f} ({r['gb_s'] / copy_gb_s:4.0%})")
        else:
            cells.append(f"{r.get('status', '-'):>15}")
    speed = point.get("speedup_vs_best_paged")
    flags = (
        "ok" if point.get("bw_target_met") else ("--" if "bw_target_met" not in point else "NO"),
        "ok" if point.get("speedup_target_met") else ("--" if "speedup_target_met" not in point else "NO"),
    )
    speed_cell = f"{speed:6.2f}x" if speed else "     - "
    vs_fi = point.get("triton_split_vs_fi_paged_tc")
    print(
        f"{point['batch']:>4} {point['context']:>6} {point['tokens'] // 1024:>6}K | "
        + " | ".join(cells)
        + f" | {speed_cell} {flags[0]:>3} {flags[1]:>2}"
        + (f" | {vs_fi:9.2f}x" if vs_fi else " |         -"),
        flush=True,
    )


# ---- prefill -----------------------------------------------------------------------------------------------------


def causal_flops(chunk: int, prior: int) -> int:
    """Multiply-adds x2 of QK^T and PV for one request: query i of the chunk sees prior + i + 1 keys."""
    pairs = chunk * prior + chunk * (chunk + 1) // 2
    return 4 * NUM_HEADS * HEAD_DIM * pairs


def run_prefill(runner: Runner, args) -> dict:
    cache = runner.cache
    points = args.prefill_grid
    print(
        f"\nPrefill, causal chunk after cached context. Cells: TFLOP/s (% of bf16 GEMM {runner.gemm_tflops:.0f} "
        f"TFLOP/s). Target: fa2_varlen >= {PREFILL_SPEEDUP_TARGET}x flex_paged"
    )
    print(
        f"{'reqs':>4} {'chunk':>6} {'prior':>6} | "
        + " | ".join(f"{k:>16}" for k in PREFILL_KERNELS)
        + " | fa2/flex | fi_slots/fi_fa3_paged"
    )
    results = []
    for requests, chunk, prior in points:
        total = prior + chunk
        label = f"prefill {requests}x{chunk}+{prior}"
        if requests > cache.config.max_batch_size or total > cache.config.max_seq_len:
            results.append(
                {
                    "requests": requests,
                    "chunk": chunk,
                    "prior": prior,
                    "status": "skipped: larger than the benchmark cache",
                }
            )
            continue
        gen = torch.Generator(device=DEVICE).manual_seed(requests * 7 + chunk)
        q = torch.randn(requests * chunk, NUM_HEADS, HEAD_DIM, generator=gen, device=DEVICE).to(DTYPE)
        slots = runner.fill(requests, total)
        starts = [s * cache.slot_stride_tokens for s in slots]
        cu_q = torch.arange(requests + 1, dtype=torch.int32, device=DEVICE) * chunk
        cu_k = torch.tensor(starts + [starts[-1] + total], dtype=torch.int32, device=DEVICE)
        seqused = torch.full((requests,), total, dtype=torch.int32, device=DEVICE)
        # Reference on the first and last 32 queries of each request (the causal edges).
        sel = torch.cat([torch.arange(32), torch.arange(chunk - 32, chunk)]).to(DEVICE)
        refs = []
        for r, slot in enumerate(slots):
            k = expand_kv(cache.k[0][slot, :total])
            v = expand_kv(cache.v[0][slot, :total])
            allowed = torch.arange(total, device=DEVICE)[None, :] <= (prior + sel)[:, None]
            qr = q[r * chunk + sel].float().transpose(0, 1)  # [Hq, 64, D]
            refs.append(torch.nn.functional.scaled_dot_product_attention(qr, k, v, attn_mask=allowed, scale=SCALE))
            del k, v

        def check(out):  # out [requests * chunk, Hq, D]
            worst_ok, worst_err, worst_scale = True, 0.0, 0.0
            for r in range(requests):
                ok, err, scale = compare(out[r * chunk + sel].transpose(0, 1), refs[r])
                worst_ok &= ok
                if err > worst_err:
                    worst_err, worst_scale = err, scale
            return worst_ok, {"queries_checked_per_request": 64, "max_abs_err": worst_err, "max_abs_ref": worst_scale}

        k_flat, v_flat = cache.k_flat[0], cache.v_flat[0]
        kernels = {
            "fa2_varlen": runner.measure(
                "fa2_varlen",
                label,
                lambda: lambda: fa2(q, k_flat, v_flat, cu_q, cu_k, chunk, total, True, seqused),
                check,
                disabled_key="fa2_varlen_prefill",
            )
        }
        cu_q_host = [r * chunk for r in range(requests + 1)]
        kernels["fi_slots"] = runner.measure(
            "fi_slots",
            label,
            lambda: fi_prefill(
                q,
                cache.k[0],
                cache.v[0],
                cu_q_host,
                list(range(requests + 1)),
                slots,
                [total] * requests,
                cache.k[0].shape[1],
                kernel=None,
            ),
            check,
        )
        state = {}

        def build_fi_paged(kernel):
            def build():
                if "paged" not in state:
                    pages_per_request = -(-total // PAGE_SIZE)
                    paged = PagedCopy(requests * pages_per_request, with_flex=False)
                    state["paged"] = (paged, paged.fill(cache, slots, [total] * requests, seed=chunk))
                paged, table = state["paged"]
                indptr, indices, last = page_lists(table, [total] * requests, PAGE_SIZE)
                pages = paged.k.view(-1, PAGE_SIZE, NUM_KV_HEADS, HEAD_DIM)
                values = paged.v.view(-1, PAGE_SIZE, NUM_KV_HEADS, HEAD_DIM)
                return fi_prefill(q, pages, values, cu_q_host, indptr, indices, last, PAGE_SIZE, kernel)

            return build

        for kernel in ("fa3", "fa2"):
            kernels[f"fi_{kernel}_paged"] = runner.measure(f"fi_{kernel}_paged", label, build_fi_paged(kernel), check)
        state.clear()
        kernels["flex_paged"] = measure_flex_prefill(runner, label, q, requests, chunk, prior, slots, check)
        flops = causal_flops(chunk, prior) * requests
        for r in kernels.values():
            if r.get("status") == "ok":
                r["tflops"] = flops / (r["time_us"] * 1e-6) / 1e12
                r["fraction_of_gemm"] = r["tflops"] / runner.gemm_tflops
        point = {"requests": requests, "chunk": chunk, "prior": prior, "flops": flops, "kernels": kernels}
        if all(kernels[k].get("status") == "ok" for k in ("fa2_varlen", "flex_paged")):
            point["speedup_vs_paged"] = kernels["flex_paged"]["time_us"] / kernels["fa2_varlen"]["time_us"]
            point["speedup_target_met"] = point["speedup_vs_paged"] >= PREFILL_SPEEDUP_TARGET
        if all(kernels[k].get("status") == "ok" for k in ("fi_slots", "fi_fa3_paged")):
            point["fi_slots_vs_fi_fa3_paged"] = kernels["fi_fa3_paged"]["time_us"] / kernels["fi_slots"]["time_us"]
        results.append(point)
        cells = []
        for name in PREFILL_KERNELS:
            r = kernels[name]
            cells.append(
                f"{r['tflops']:7.1f} ({r['fraction_of_gemm']:5.0%})"
                if r.get("status") == "ok"
                else f"{r.get('status', '-'):>16}"
            )
        speed, vs_fi = point.get("speedup_vs_paged"), point.get("fi_slots_vs_fi_fa3_paged")
        print(
            f"{requests:>4} {chunk:>6} {prior:>6} | "
            + " | ".join(cells)
            + (f" | {speed:5.2f}x {'ok' if point['speedup_target_met'] else 'NO'}" if speed else " |     -")
            + (f" | {vs_fi:5.2f}x" if vs_fi else " |     -"),
            flush=True,
        )
        free_gpu_memory()
    return {"points": results}


def measure_flex_prefill(runner: Runner, label, q, requests, chunk, prior, slots, check) -> dict:
    if "flex_paged_prefill" in runner.disabled:
        return {"status": "skipped", "error": runner.disabled["flex_paged_prefill"]}
    why = runner.flex_allowed("prefill")
    if why:
        return {"status": "skipped", "error": why}
    cache = runner.cache
    total = prior + chunk
    state = {}

    def build():
        from torch.nn.attention.flex_attention import create_block_mask

        pages_per_request = -(-total // PAGE_SIZE)
        paged = PagedCopy(requests * pages_per_request, with_flex=True)
        table = paged.fill(cache, slots, [total] * requests, seed=chunk)
        pa = flex_page_table(paged.num_pages, table, [total] * requests)

        def causal_after_prior(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx + prior

        logical = create_block_mask(
            causal_after_prior,
            requests,
            None,
            chunk,
            pages_per_request * PAGE_SIZE,
            device=DEVICE,
            BLOCK_SIZE=(128, PAGE_SIZE),
        )
        mask = pa.convert_logical_block_mask(logical)
        q4 = q.view(requests, chunk, NUM_HEADS, HEAD_DIM).transpose(1, 2).contiguous()  # [R, Hq, C, D]
        state["keep"] = (paged, pa, mask, q4)
        flex = runner.flex_fn()

        def call(options):
            out = flex(
                q4, paged.k_flex, paged.v_flex, block_mask=mask, scale=SCALE, enable_gqa=True, kernel_options=options
            )
            return out.transpose(1, 2).reshape(requests * chunk, NUM_HEADS, HEAD_DIM)

        return runner._with_flex_options("prefill", FLEX_PREFILL_OPTIONS, call)

    result = runner.measure("flex_paged", label, build, check, disabled_key="flex_paged_prefill")
    if result.get("status") == "ok":
        result["kernel_options"] = runner.flex_options.get("prefill")
    state.clear()
    return result


# ---- plots -------------------------------------------------------------------------------------------------------


def plot(payload: dict, out_dir: Path) -> list[Path]:
    """Decode bandwidth vs B*L per kernel, prefill TFLOP/s bars; returns the PNGs written (none without
    matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not importable: no plots (run --plot-only on the JSON where it is)")
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    copy_gb_s = payload["copy_bandwidth_gb_s"]
    points = [p for p in payload.get("decode", {}).get("points", []) if "kernels" in p]
    if points:
        fig, ax = plt.subplots(figsize=(9, 5.5))
        markers = {"fa2_varlen": "o", "triton_split": "s", "triton_paged": "^", "flex_paged": "v"}
        for name in DECODE_KERNELS:
            xs, ys = [], []
            for p in sorted(points, key=lambda p: (p["tokens"], p["batch"])):
                r = p["kernels"].get(name, {})
                if r.get("status") == "ok":
                    xs.append(p["tokens"])
                    ys.append(r["gb_s"])
            if xs:
                style = "-" if name in NONPAGED else "--"
                ax.plot(xs, ys, style, marker=markers.get(name, "o"), label=name)
        ax.axhline(copy_gb_s, color="black", lw=1, label=f"copy bandwidth {copy_gb_s:.0f} GB/s")
        ax.axhline(BW_TARGET * copy_gb_s, color="gray", lw=1, ls=":", label=f"target {BW_TARGET:.0%} of copy")
        ax.axvline(BW_TARGET_MIN_TOKENS, color="gray", lw=0.8, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("B x L (tokens of context in the batch)")
        ax.set_ylabel("achieved GB/s (K/V + q + out bytes / kernel time)")
        gpu = payload.get("machine", {}).get("gpu", "GPU")
        dtype = payload.get("settings", {}).get("dtype", "torch.bfloat16").removeprefix("torch.")
        heads = payload.get("settings", {})
        shape = f"{heads.get('num_heads', NUM_HEADS)} q / {heads.get('num_kv_heads', NUM_KV_HEADS)} KV heads"
        ax.set_title(f"Decode attention, {shape}, {dtype} - {gpu}")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        path = out_dir / "attention_decode_bandwidth.png"
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    ppoints = [p for p in payload.get("prefill", {}).get("points", []) if "kernels" in p]
    if ppoints:
        fig, ax = plt.subplots(figsize=(8, 5))
        width = 0.8 / len(PREFILL_KERNELS)
        for i, name in enumerate(PREFILL_KERNELS):
            values = [p["kernels"].get(name, {}).get("tflops", 0.0) for p in ppoints]
            ax.bar([x + i * width for x in range(len(ppoints))], values, width, label=name)
        ax.axhline(payload["gemm_tflops"], color="black", lw=1, label=f"bf16 GEMM {payload['gemm_tflops']:.0f} TFLOP/s")
        ax.set_xticks([x + width * (len(PREFILL_KERNELS) - 1) / 2 for x in range(len(ppoints))])
        ax.set_xticklabels([f"{p['requests']}x{p['chunk'] // 1024}K\n+{p['prior'] // 1024}K ctx" for p in ppoints])
        ax.set_ylabel("TFLOP/s (causal useful FLOPs)")
        ax.set_title("Prefill attention over the cache (fa2_varlen, fi_slots) vs paged kernels (page 16)")
        ax.legend(fontsize=8)
        path = out_dir / "attention_prefill_tflops.png"
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    if os.environ.get("OUT"):
        for path in written:
            Path(os.environ["OUT"], path.name).write_bytes(path.read_bytes())
    return written


# ---- main --------------------------------------------------------------------------------------------------------


def summarise_targets(payload: dict) -> dict:
    decode = [p for p in payload["decode"]["points"] if "kernels" in p]
    big = [p for p in decode if p["tokens"] >= BW_TARGET_MIN_TOKENS]
    bw = [p.get("best_nonpaged_fraction_of_copy_bw") for p in big if "best_nonpaged_fraction_of_copy_bw" in p]
    speed_all = [p["speedup_vs_best_paged"] for p in decode if "speedup_vs_best_paged" in p]
    speed_big = [p["speedup_vs_best_paged"] for p in big if "speedup_vs_best_paged" in p]
    prefill = [p["speedup_vs_paged"] for p in payload["prefill"]["points"] if "speedup_vs_paged" in p]
    vs_fi_decode = [p["triton_split_vs_fi_paged_tc"] for p in decode if "triton_split_vs_fi_paged_tc" in p]
    vs_fi_prefill = [
        p["fi_slots_vs_fi_fa3_paged"] for p in payload["prefill"]["points"] if "fi_slots_vs_fi_fa3_paged" in p
    ]

    def stats(values):
        return {"n": len(values), "min": min(values), "median": statistics.median(values)} if values else {"n": 0}

    per_kernel_bw = {}
    for name in NONPAGED:
        fr = [p["kernels"][name]["fraction_of_copy_bw"] for p in big if p["kernels"][name].get("status") == "ok"]
        per_kernel_bw[name] = stats(fr)
    return {
        "decode_bandwidth": {
            "target": f">= {BW_TARGET:.0%} of copy bandwidth (best non-paged) at every point with "
            f"B*L >= {BW_TARGET_MIN_TOKENS}",
            "best_nonpaged": stats(bw),
            "per_kernel": per_kernel_bw,
            "met": bool(bw) and len(bw) == len(big) and min(bw) >= BW_TARGET,
        },
        "decode_speedup_vs_paged": {
            "target": f">= {DECODE_SPEEDUP_TARGET}x best paged at every point",
            "all_points": stats(speed_all),
            "points_b_l_ge_64k": stats(speed_big),
            "points_meeting": sum(s >= DECODE_SPEEDUP_TARGET for s in speed_all),
            "met": bool(speed_all) and len(speed_all) == len(decode) and min(speed_all) >= DECODE_SPEEDUP_TARGET,
        },
        "decode_vs_flashinfer_paged": {
            "target": f"triton_split >= {FI_DECODE_TARGET}x fi_paged_tc at every point",
            **stats(vs_fi_decode),
            "points_meeting": sum(s >= FI_DECODE_TARGET for s in vs_fi_decode),
            "met": bool(vs_fi_decode) and len(vs_fi_decode) == len(decode) and min(vs_fi_decode) >= FI_DECODE_TARGET,
        },
        "prefill_slots_vs_flashinfer_paged": {
            "target": f"fi_slots >= {FI_PREFILL_TARGET}x fi_fa3_paged at every point",
            **stats(vs_fi_prefill),
            "met": bool(vs_fi_prefill)
            and len(vs_fi_prefill) == len(payload["prefill"]["points"])
            and min(vs_fi_prefill) >= FI_PREFILL_TARGET,
        },
        "prefill_speedup_vs_paged": {
            "target": f">= {PREFILL_SPEEDUP_TARGET}x flex_paged",
            **stats(prefill),
            "met": bool(prefill)
            and len(prefill) == len(payload["prefill"]["points"])
            and min(prefill) >= PREFILL_SPEEDUP_TARGET,
        },
    }


def autotune_choices() -> dict:
    """Configs the Triton autotuners settled on, per key (split_len, group, head dim[, page size])."""
    out = {}
    try:
        from benchmarks import triton_paged_decode
        from engine.attention import triton_decode

        for name, tuner in (
            ("triton_split", triton_decode._split_kv_autotuned),
            ("triton_paged", triton_paged_decode._paged_split_kv_autotuned),
        ):
            out[name] = {str(key[:4]): str(cfg) for key, cfg in getattr(tuner, "cache", {}).items()}
    except Exception as exc:  # noqa: BLE001 - informational only
        out["error"] = short_error(exc)
    return out


def parse_points(text: str) -> list[tuple[int, int]]:
    """``"1x1024,8x4096"`` -> ``[(1, 1024), (8, 4096)]`` (batch x context)."""
    try:
        points = [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",") if item.strip()]
    except ValueError:
        points = []
    if not points or any(len(p) != 2 or min(p) < 1 for p in points):
        raise argparse.ArgumentTypeError(f"expected BxL,... with positive integers, got {text!r}")
    return points


def make_cache(max_batch: int, max_context: int, pool_bytes: int):
    """One layer of a real ``VirtualKVCache`` with ``max_batch`` slots of ``max_context`` tokens (virtual) and a page
    pool of ``pool_bytes``; each point maps what it runs on (``Runner.fill``)."""
    from kvcache import KVCacheConfig, VirtualKVCache

    config = KVCacheConfig(
        num_layers=1,
        num_kv_heads=NUM_KV_HEADS,
        head_dim=HEAD_DIM,
        max_batch_size=max_batch,
        max_seq_len=max_context,
        dtype=DTYPE,
        device=DEVICE,
        kv_cache_memory_bytes=pool_bytes,
    )
    return VirtualKVCache(config)


def main() -> int:
    global DEVICE, DTYPE, QUICK_DECODE, QUICK_PREFILL, CHECK_LENS, NUM_HEADS, GROUP
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few points (smoke run)")
    parser.add_argument("--plot-only", type=Path, metavar="RESULT_JSON", help="write the PNGs from a result file")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=250.0,
        help="seconds after which the slow-to-compile Flex baselines are skipped",
    )
    parser.add_argument(
        "--decode-points",
        type=parse_points,
        default=None,
        metavar="BxL,...",
        help="these decode points only (e.g. 1x1024,8x4096), no prefill",
    )
    parser.add_argument("--name", default=None, help="result name (default attention_<gpu>[_gqa8][_quick])")
    parser.add_argument(
        "--gqa",
        type=int,
        default=GROUP,
        help=f"query heads per KV head ({NUM_KV_HEADS} KV heads; {GROUP}: Llama-3-8B, 8: Llama-3-70B's ratio)",
    )
    parser.add_argument(
        "--dry-run-cpu",
        type=Path,
        metavar="OUT_DIR",
        default=None,
        help="exercise every code path on CPU with tiny shapes (Triton interpreted, FA2 failing); "
        "writes the JSON and PNGs to OUT_DIR, not to results/",
    )
    args = parser.parse_args()
    GROUP, NUM_HEADS = args.gqa, args.gqa * NUM_KV_HEADS

    if args.plot_only:
        payload = json.loads(args.plot_only.read_text())
        for path in plot(payload, args.plot_only.resolve().parent):
            print(f"wrote {path}")
        return 0
    if args.dry_run_cpu:
        DEVICE = "cpu"
        os.environ["TRITON_INTERPRET"] = "1"  # before triton's first import
        patch_triton_interpreter()
        QUICK_DECODE, QUICK_PREFILL = [(2, 128), (1, 64)], [(1, 64, 64)]
        CHECK_LENS = [128, 1, 100, 17, 128, 16, 64, 99]
        DTYPE = torch.float16  # the interpreter's tl.dot is wrong on bf16 (numpy has no bf16)
        args.quick = True
    elif not torch.cuda.is_available():
        print("bench_attention needs a CUDA GPU (use --plot-only RESULT_JSON to plot a result)", file=sys.stderr)
        return 2

    start = time.perf_counter()
    torch.backends.cuda.matmul.allow_tf32 = False
    info = machine_info(DEVICE)
    gpu = info.get("gpu", "cpu")
    name = args.name or "attention_" + next(
        (tag for tag in ("h100", "h200", "a100", "b200", "cpu") if tag in gpu.lower()), "gpu"
    ) + (f"_gqa{GROUP}" if GROUP != 4 else "") + ("_quick" if args.quick else "")
    copy_gb_s = measure_copy_bandwidth(DEVICE, size_bytes=1 << 30 if DEVICE == "cuda" else 64 << 20)
    print(f"{gpu}: device copy bandwidth {copy_gb_s:.0f} GB/s (read+write)", flush=True)

    decode_points = QUICK_DECODE if args.quick else [(b, n) for b in DECODE_BATCHES for n in DECODE_CONTEXTS]
    prefill_points = QUICK_PREFILL if args.quick else PREFILL_POINTS
    if args.decode_points:
        decode_points, prefill_points = args.decode_points, []
    args.decode_grid, args.prefill_grid = decode_points, prefill_points
    token_bytes_kv = NUM_KV_HEADS * HEAD_DIM * DTYPE.itemsize * 2
    fits = [(b, n) for b, n in decode_points if b * n * token_bytes_kv <= KV_LIMIT_BYTES]
    max_batch = max([b for b, _ in fits] + [CHECK_BATCH] + [r for r, _, _ in prefill_points])
    max_context = max([n for _, n in fits] + [max(CHECK_LENS)] + [c + p for _, c, p in prefill_points])
    largest = max(
        [b * n for b, n in fits] + [CHECK_BATCH * max(CHECK_LENS)] + [r * (c + p) for r, c, p in prefill_points]
    )
    page_tokens = (2 << 20) // (token_bytes_kv // 2)  # tokens of a 2 MiB page of K (or V): whole pages per slot
    pool_bytes = (largest * token_bytes_kv // 2 + max_batch * page_tokens * token_bytes_kv // 2) * 2 + (64 << 20)
    cache = make_cache(max_batch, max_context, pool_bytes if DEVICE == "cuda" else 256 << 20)
    print(
        f"cache: {max_batch} slots x {max_context} tokens (virtual), slot stride {cache.slot_stride_tokens} rows, "
        f"a pool of {pool_bytes / 2**30:.1f} GiB mapped point by point ({time.perf_counter() - start:.1f} s)",
        flush=True,
    )

    runner = Runner(args, cache)
    runner.t0 = start
    runner.copy_gb_s = copy_gb_s
    gemm_n = 8192 if DEVICE == "cuda" else 256
    runner.gemm_tflops = measure_gemm_tflops(runner.timer, gemm_n)
    print(f"{str(DTYPE).removeprefix('torch.')} GEMM {gemm_n}^3: {runner.gemm_tflops:.0f} TFLOP/s", flush=True)

    payload = {
        "benchmark": "attention",
        "machine": info,
        "settings": {
            "num_heads": NUM_HEADS,
            "num_kv_heads": NUM_KV_HEADS,
            "head_dim": HEAD_DIM,
            "dtype": str(DTYPE),
            "page_size_tokens": PAGE_SIZE,
            "quick": args.quick,
            "budget_s": args.budget_s,
            "cache_page_size_bytes": cache.page_size_bytes,
            "slot_stride_tokens": cache.slot_stride_tokens,
            "timing": "median of CUDA-event timings per call after warm-up, L2 flushed (256 MiB) before each",
            "bytes_moved": "K+V rows read + q read + output written",
            "tolerance": f"|err| <= {REL_TOL} * max|ref| + {ABS_TOL} vs fp32 SDPA on gathered K/V",
        },
        "copy_bandwidth_gb_s": copy_gb_s,
        "gemm_tflops": runner.gemm_tflops,
    }
    print_decode_header(copy_gb_s)
    try:
        payload["decode"] = run_decode(runner, args)
    except Exception as exc:  # noqa: BLE001 - keep what the prefill part can still measure
        payload["decode"] = {"points": [], "error": short_error(exc), "traceback": traceback.format_exc()[-4000:]}
        print(f"decode part failed: {short_error(exc)}")
    free_gpu_memory()
    try:
        payload["prefill"] = run_prefill(runner, args)
    except Exception as exc:  # noqa: BLE001
        payload["prefill"] = {"points": [], "error": short_error(exc), "traceback": traceback.format_exc()[-4000:]}
        print(f"prefill part failed: {short_error(exc)}")

    payload["checks"] = runner.checks
    payload["flex_kernel_options"] = {"chosen": runner.flex_options, "attempts": runner.flex_attempts}
    payload["triton_autotune"] = autotune_choices()
    payload["failures"] = runner.failures
    payload["targets"] = summarise_targets(payload)
    payload["wall_s"] = time.perf_counter() - start
    if args.dry_run_cpu:
        args.dry_run_cpu.mkdir(parents=True, exist_ok=True)
        path = args.dry_run_cpu / f"{name}.json"
        path.write_text(json.dumps(payload, indent=2))
    else:
        path = write_result(name, payload)
    cache.close()

    t = payload["targets"]
    print("\nTargets:")
    print(
        f"  decode bandwidth  {t['decode_bandwidth']['target']}: best non-paged "
        f"{_fmt_stats(t['decode_bandwidth']['best_nonpaged'], pct=True)} -> "
        f"{'MET' if t['decode_bandwidth']['met'] else 'NOT MET'}"
    )
    print(
        f"  decode vs paged   {t['decode_speedup_vs_paged']['target']}: "
        f"{_fmt_stats(t['decode_speedup_vs_paged']['all_points'])} "
        f"({t['decode_speedup_vs_paged']['points_meeting']} points meet it) -> "
        f"{'MET' if t['decode_speedup_vs_paged']['met'] else 'NOT MET'}"
    )
    for key, label in (
        ("decode_vs_flashinfer_paged", "decode vs FlashInfer"),
        ("prefill_slots_vs_flashinfer_paged", "prefill vs FlashInfer"),
    ):
        print(f"  {label:<17} {t[key]['target']}: {_fmt_stats(t[key])} -> {'MET' if t[key]['met'] else 'NOT MET'}")
    print(
        f"  prefill vs paged  {t['prefill_speedup_vs_paged']['target']}: "
        f"{_fmt_stats(t['prefill_speedup_vs_paged'])} -> {'MET' if t['prefill_speedup_vs_paged']['met'] else 'NOT MET'}"
    )
    if runner.failures:
        print(f"{len(runner.failures)} kernel failures recorded (see 'failures' in the JSON):")
        for f in runner.failures[:12]:
            print(f"  {f['kernel']} @ {f['point']}: {f['status']}: {f['error'][:200]}")
    print(f"wrote {path} ({payload['wall_s']:.0f} s)")
    for png in plot(payload, args.dry_run_cpu or RESULTS_DIR):
        print(f"wrote {png}")
    return 0


def patch_triton_interpreter() -> None:
    """Triton 3.6's interpreter converts a loaded scalar with ``int(array_of_shape_(1,))``, which numpy >= 2.3
    refuses (loops with runtime bounds fail); the dry run indexes the single element instead."""
    import triton.runtime.interpreter as interpreter

    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched


def _fmt_stats(s: dict, pct: bool = False) -> str:
    if not s.get("n"):
        return "no data"
    f = (lambda x: f"{x:.0%}") if pct else (lambda x: f"{x:.2f}x")
    return f"min {f(s['min'])}, median {f(s['median'])} over {s['n']} points"


if __name__ == "__main__":
    sys.exit(main())
