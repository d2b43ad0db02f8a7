"""KV cache benchmark: page map/unmap costs and mapping bandwidth, and (on CUDA) hidden vs inline mapping.

    python benchmarks/bench_kvcache.py --device cpu
    python benchmarks/bench_kvcache.py --device cuda      # on the H100

Part 1 times the physical backend alone: page-at-a-time and batched map/unmap, and handle creation (why the
pool is made up front). Part 2 times the cache's grow path, bookkeeping included. Part 3 (CUDA) runs a
decode-like loop of 256 requests over a Llama-3-8B-shaped cache (32 layers, 8 KV heads, d=128, bf16), with
requests crossing page boundaries, three ways: pages mapped inline before each step, mapping overlapped with the
step's GPU work (``map_ahead`` after launch), and a fully pre-mapped cache (the floor).
The paper's need for Llama-3-8B is at most 750 MB/s of allocation: the margin is printed beside each bandwidth.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine_info, write_result  # noqa: E402
from kvcache import KVCacheConfig, VirtualKVCache, make_physical_memory  # noqa: E402

NEED_MB_S = 750.0  # vAttention paper: peak allocation bandwidth Llama-3-8B needs


def bench_backend(device: str, num_pages: int) -> dict:
    memory = make_physical_memory(device)
    page = memory.granularity_bytes
    try:
        base = memory.reserve(num_pages * page)
        t = time.perf_counter()
        memory.create_pool(num_pages, page)
        create_s = time.perf_counter() - t
        memory.as_tensor(base, num_pages * page)
        rows = {"page_size_bytes": page, "pages": num_pages, "create_us_per_page": create_s / num_pages * 1e6}
        for batch in (1, 64):
            t = time.perf_counter()
            for first in range(0, num_pages, batch):
                memory.map(base + first * page, list(range(first, first + batch)))
            map_s = time.perf_counter() - t
            t = time.perf_counter()
            for first in range(0, num_pages, batch):
                memory.unmap(base + first * page, batch)
            unmap_s = time.perf_counter() - t
            rows[f"map_us_per_page_batch{batch}"] = map_s / num_pages * 1e6
            rows[f"unmap_us_per_page_batch{batch}"] = unmap_s / num_pages * 1e6
            rows[f"map_gb_s_batch{batch}"] = num_pages * page / map_s / 1e9
        return rows
    finally:
        memory.close()


def bench_cache_grow(device: str) -> dict:
    """Pages mapped per second through ``VirtualKVCache.grow``, Llama-3-8B shapes on CUDA, SmolLM2 on CPU."""
    if torch.device(device).type == "cuda":
        shape = dict(num_layers=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16)
        slots, seq = 16, 8192
    else:
        shape = dict(num_layers=30, num_kv_heads=3, head_dim=64, dtype=torch.float32)
        slots, seq = 16, 4096
    config = KVCacheConfig(**shape, max_batch_size=slots, max_seq_len=seq, device=device)
    with VirtualKVCache(config) as cache:
        tpp = int(cache.tokens_per_page)
        ids = [cache.allocate(1) for _ in range(slots)]
        steps = min(4, seq // tpp)
        t = time.perf_counter()
        for step in range(1, steps):
            for slot in ids:
                cache.grow(slot, step * tpp + 1)
        seconds = time.perf_counter() - t
        pages = (steps - 1) * slots * cache.num_buffers
        return {
            "pages": pages,
            "us_per_page": seconds / pages * 1e6,
            "gb_s": pages * cache.page_size_bytes / seconds / 1e9,
            "shape": {k: str(v) for k, v in shape.items()},
        }


def bench_decode_overlap(device: str, num_requests: int = 256, steps: int = 256) -> dict:
    """Per-step time of a Llama-3-8B-shaped decode loop whose requests cross page boundaries, three ways."""
    config = KVCacheConfig(
        num_layers=32,
        num_kv_heads=8,
        head_dim=128,
        dtype=torch.bfloat16,
        max_batch_size=num_requests,
        max_seq_len=4096,
        device=device,
        kv_cache_memory_fraction=0.6,
    )
    dev = torch.device(device)
    # Device work of one Llama-3-8B decode step over the cache, layer by layer: QKV projection, this step's K/V
    # written in place, FlashAttention-2 varlen reading every request's K/V from the virtual tensors, output
    # projection and MLP. One layer's weights (436 MB, far beyond L2) serve all 32 layers.
    hidden, heads, kv_heads, head_dim, inter = 4096, 32, 8, 128, 14336
    bf16 = dict(device=dev, dtype=torch.bfloat16)
    w_qkv = torch.randn(hidden, (heads + 2 * kv_heads) * head_dim, **bf16) * 0.02
    w_o = torch.randn(heads * head_dim, hidden, **bf16) * 0.02
    w_gate_up = torch.randn(hidden, 2 * inter, **bf16) * 0.02
    w_down = torch.randn(inter, hidden, **bf16) * 0.02
    x = torch.randn(num_requests, hidden, **bf16)
    cu_q = torch.arange(num_requests + 1, dtype=torch.int32, device=dev)

    def device_work(cache, slots_t, lengths_t):
        rows = slots_t * cache.slot_stride_tokens + lengths_t - 1
        cu_k = torch.cat([slots_t * cache.slot_stride_tokens, slots_t[:1] * 0]).to(torch.int32)
        lens32 = lengths_t.to(torch.int32)
        h = x
        for layer in range(32):
            q, k, v = (h @ w_qkv).split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
            cache.k_flat[layer].index_copy_(0, rows, k.reshape(-1, kv_heads, head_dim))
            cache.v_flat[layer].index_copy_(0, rows, v.reshape(-1, kv_heads, head_dim))
            attn = torch.ops.aten._flash_attention_forward(
                q.reshape(-1, heads, head_dim),
                cache.k_flat[layer],
                cache.v_flat[layer],
                cu_q,
                cu_k,
                1,
                cache.config.max_seq_len,
                0.0,
                True,
                False,
                seqused_k=lens32,
            )[0]
            h = h + attn.reshape(-1, heads * head_dim) @ w_o
            gate, up = (h @ w_gate_up).chunk(2, dim=-1)
            h = h + (torch.nn.functional.silu(gate) * up) @ w_down
        return h

    results = {}
    for mode in ("premapped", "inline", "overlapped"):
        with VirtualKVCache(config) as cache:
            tpp = int(cache.tokens_per_page)
            # Stagger starting lengths over a page so that a quarter of the requests cross a boundary per 256 steps.
            start = [1 + (i * tpp) // num_requests for i in range(num_requests)]
            slots = [cache.allocate(n) for n in start]
            if mode == "premapped":
                for slot, n in zip(slots, start):
                    cache.grow(slot, n + steps + 1)
            slots_t = torch.tensor(slots, device=dev)
            lengths = list(start)
            for _ in range(3):
                device_work(cache, slots_t, torch.tensor(lengths, device=dev))
            torch.cuda.synchronize()
            mapped_before = cache.stats().mapped_pages
            map_seconds = 0.0
            t0 = time.perf_counter()
            for _ in range(steps):
                lengths = [n + 1 for n in lengths]
                tm = time.perf_counter()
                for slot, n in zip(slots, lengths):
                    cache.grow(slot, n)  # inline: maps here when crossing; otherwise finds pages mapped
                map_seconds += time.perf_counter() - tm if mode == "inline" else 0.0
                device_work(cache, slots_t, torch.tensor(lengths, device=dev))
                if mode == "overlapped":
                    tm = time.perf_counter()
                    cache.map_ahead({slot: n + 1 for slot, n in zip(slots, lengths)})
                    map_seconds += time.perf_counter() - tm
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - t0
            mapped = cache.stats().mapped_pages - mapped_before
            results[mode] = {
                "ms_per_step": elapsed / steps * 1e3,
                "pages_mapped": mapped,
                "map_ms_total": map_seconds * 1e3,
                "map_gb_s": (mapped * cache.page_size_bytes / map_seconds / 1e9) if map_seconds else None,
            }
    floor = results["premapped"]["ms_per_step"]
    for mode in ("inline", "overlapped"):
        results[mode]["overhead_vs_premapped"] = results[mode]["ms_per_step"] / floor - 1
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--pages", type=int, default=None, help="pages in the backend microbenchmark")
    args = parser.parse_args()
    is_cuda = torch.device(args.device).type == "cuda"
    pages = args.pages or (512 if is_cuda else 4096)

    backend = bench_backend(args.device, pages)
    grow = bench_cache_grow(args.device)
    result = {"machine": machine_info(args.device), "device": args.device, "backend": backend, "cache_grow": grow}
    print(f"\n== physical backend ({args.device}, {backend['page_size_bytes'] >> 10} KiB pages, {pages} pages)")
    print(f"create (pool, up front): {backend['create_us_per_page']:8.1f} us/page")
    for batch in (1, 64):
        gbs = backend[f"map_gb_s_batch{batch}"]
        print(
            f"map   batch {batch:>2}: {backend[f'map_us_per_page_batch{batch}']:8.1f} us/page  "
            f"{gbs:8.2f} GB/s  ({gbs * 1e3 / NEED_MB_S:6.1f}x the {NEED_MB_S:.0f} MB/s Llama-3-8B needs)"
        )
        print(f"unmap batch {batch:>2}: {backend[f'unmap_us_per_page_batch{batch}']:8.1f} us/page")
    print(
        f"\n== cache grow path (bookkeeping included): {grow['us_per_page']:.1f} us/page, {grow['gb_s']:.2f} GB/s "
        f"({grow['gb_s'] * 1e3 / NEED_MB_S:.1f}x the need)"
    )
    if is_cuda:
        overlap = bench_decode_overlap(args.device)
        result["decode_overlap"] = overlap
        print("\n== decode-like growth, 256 requests x 32 layers (Llama-3-8B KV shape), 256 steps")
        print(f"{'mode':<11} {'ms/step':>8} {'vs premapped':>13} {'pages mapped':>13} {'map ms':>8} {'map GB/s':>9}")
        for mode in ("premapped", "inline", "overlapped"):
            r = overlap[mode]
            over = f"{r['overhead_vs_premapped'] * 100:+.2f}%" if "overhead_vs_premapped" in r else "floor"
            gbs = f"{r['map_gb_s']:.2f}" if r["map_gb_s"] else "-"
            print(
                f"{mode:<11} {r['ms_per_step']:8.3f} {over:>13} {r['pages_mapped']:>13} {r['map_ms_total']:8.1f} "
                f"{gbs:>9}"
            )
    card = result["machine"].get("gpu", "cpu")
    name = "h100" if "H100" in card else "h200" if "H200" in card else "gpu" if is_cuda else "cpu"
    path = write_result(f"kvcache_{name}", result)
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
