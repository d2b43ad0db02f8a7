"""End-to-end engine figures on one GPU, each beside its hardware limit or baseline (one process, one run).

    python benchmarks/bench_engine_gpu.py            # H100, Llama-3-8B-shaped dummy model, bf16

1. Limits measured first: device copy bandwidth, bf16 GEMM rate.
2. Baseline: transformers ``generate`` (random weights, same shapes, batch 64) and the engine on the same
   64 x (1024 in / 128 out) requests.
3. Offline throughput (vLLM ``bench throughput`` style, random token ids, ``ignore_eos``): 1000 x (1024 / 128) and
   a decode-heavy 512 x (256 / 1024). Per step: decode step time at batch >= 64 against its floor (weight bytes +
   KV bytes read, over the copy bandwidth), prefill model FLOPs utilisation against the GEMM rate, and host
   overhead per decode step (step wall time not covered by the forward's GPU time). Then 256 x (256 / 512) with
   asynchronous scheduling and again without (each step's tokens processed before the next step is launched).
4. Page mapping hidden: 128 requests whose decode crosses a 1024-token page boundary in lockstep, run on a cold
   cache (every page mapped on demand, while the GPU computes) and again on the pages the first run left mapped
   (deferred reclamation: nothing to map). Decode-loop times compared (and whole runs, and median decode steps).
5. The paged baseline: the same engine over a vLLM-style block pool with block tables, the paged twin of the
   decode kernel and FlashInfer's paged prefill where importable (``benchmarks/paged_kv.py``), on the decode-heavy
   and the default throughput workloads.

``--layouts`` runs only the two workloads on the engines named by ``--engines`` (KV layouts, the prefill kernel, the
paged mode with or without FlashInfer), one after the other, into ``results/<--name>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine_info, measure_copy_bandwidth, write_result  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.greedy_check import greedy_shortfall  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402

MODEL = "dummy:llama-3-8b"


def gemm_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * 8192**3 * 10 / (start.elapsed_time(end) / 1e3) / 1e12


def workload(num: int, input_len: int, output_len: int, vocab: int, seed: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(100, vocab - 100) for _ in range(input_len)], output_len) for _ in range(num)]


def hf_baseline(requests, batch_size: int) -> dict:
    from transformers import LlamaForCausalLM

    from engine.weights.resolve import _dummy_config

    config = _dummy_config("llama-3-8b")
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    tokens = 0
    torch.cuda.synchronize()
    t = time.perf_counter()
    for i in range(0, len(requests), batch_size):
        chunk = requests[i : i + batch_size]
        ids = torch.tensor([p for p, _ in chunk], device="cuda")  # equal prompt lengths: no padding needed
        new = max(n for _, n in chunk)
        with torch.inference_mode():
            model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new, do_sample=False
            )
        tokens += sum(n for _, n in chunk)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return {"output_tok_s": tokens / seconds, "seconds": seconds, "requests": len(requests)}


class StepRecorder:
    """Wraps the runner's forward to record each step's shape and the forward's GPU time."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.records: list[dict] = []
        self._run = engine.runner.run
        engine.runner.run = self._recorded_run

    def _recorded_run(self, seqs, *args):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        logits = self._run(seqs, *args)
        end.record()
        self.records.append(
            {
                "num_seqs": len(seqs),
                "num_tokens": sum(len(t) for _, t, _ in seqs),
                "decode": all(len(t) == 1 for _, t, _ in seqs),
                "kv_tokens": sum(p + len(t) for _, t, p in seqs),
                "events": (start, end),
            }
        )
        return logits

    def run(self, requests) -> dict:
        engine = self.engine
        self.records = []
        for i, (prompt, n) in enumerate(requests):
            engine.add_request(
                f"r{i}-{time.monotonic_ns()}", prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
            )
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        output_tokens = 0
        while engine.has_unfinished():
            before = len(self.records)
            t = time.perf_counter()
            outputs = engine.step()
            wall = time.perf_counter() - t
            if len(self.records) > before:
                self.records[-1]["wall_s"] = wall
            output_tokens += sum(len(o.new_token_ids) for o in outputs)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        for rec in self.records:
            start, end = rec.pop("events")
            rec["gpu_s"] = start.elapsed_time(end) / 1e3
        prompt_tokens = sum(len(p) for p, _ in requests)
        return {
            "seconds": seconds,
            "output_tok_s": output_tokens / seconds,
            "total_tok_s": (output_tokens + prompt_tokens) / seconds,
            "steps": list(self.records),
        }


def summarize(
    steps: list[dict], bandwidth_gb_s: float, gemm: float, weight_bytes: int, params: int, kv_bytes_per_token: int
) -> dict:
    decode = [s for s in steps if s["decode"] and s["num_seqs"] >= 64]
    prefill = [s for s in steps if not s["decode"] and s["num_tokens"] >= 1024]
    out = {"decode_seconds": sum(s["wall_s"] for s in steps if s["decode"])}
    if decode:
        floors = [(weight_bytes + s["kv_tokens"] * kv_bytes_per_token) / (bandwidth_gb_s * 1e9) for s in decode]
        ratios = [s["wall_s"] / f for s, f in zip(decode, floors)]
        overhead = [max(0.0, 1 - s["gpu_s"] / s["wall_s"]) for s in decode]
        out["decode_gpu_over_floor_median"] = statistics.median(s["gpu_s"] / f for s, f in zip(decode, floors))
        # The device's idle share over all decode steps (per-step figures can't see a host that runs ahead).
        out["decode_host_overhead_total"] = max(
            0.0, 1 - sum(s["gpu_s"] for s in decode) / sum(s["wall_s"] for s in decode)
        )
        out["decode_steps"] = len(decode)
        out["decode_step_ms_median"] = statistics.median(s["wall_s"] for s in decode) * 1e3
        out["decode_floor_ms_median"] = (
            statistics.median(
                (weight_bytes + s["kv_tokens"] * kv_bytes_per_token) / (bandwidth_gb_s * 1e9) for s in decode
            )
            * 1e3
        )
        out["decode_step_over_floor_median"] = statistics.median(ratios)
        out["decode_host_overhead_median"] = statistics.median(overhead)
        out["decode_batch_median"] = statistics.median(s["num_seqs"] for s in decode)
    if prefill:
        mfu = [2 * params * s["num_tokens"] / s["gpu_s"] / 1e12 / gemm for s in prefill]
        out["prefill_steps"] = len(prefill)
        out["prefill_mfu_vs_gemm_median"] = statistics.median(mfu)
    return out


def finish(result: dict) -> None:
    """Each target beside its limit, printed and written (again, when the paged part completes)."""
    baseline = result["hf_baseline"].get("output_tok_s")
    same = result["same_as_baseline"]["output_tok_s"]
    result["targets"] = {
        "decode_step_over_floor_at_batch_ge_64": {
            "figure": result["decode_heavy_256_1024"].get("decode_step_over_floor_median"),
            "limit": 1.3,
        },
        "prefill_mfu_vs_gemm": {
            "figure": result["throughput_1024_128"].get("prefill_mfu_vs_gemm_median"),
            "limit": 0.5,
        },
        "host_overhead_per_decode_step": {
            "figure": result["decode_heavy_256_1024"].get("decode_host_overhead_median"),
            "limit": 0.10,
        },
        "async_over_sync_scheduling_output_tok_s": {
            "figure": result["decode_256_512_async"]["output_tok_s"] / result["decode_256_512_sync"]["output_tok_s"],
            "baseline": 1.0,
        },
        "mapping_overhead_vs_premapped": {"figure": result.get("mapping_overhead"), "limit": 0.02},
        "engine_vs_transformers_same_workload": {"figure": same / baseline if baseline else None, "baseline": baseline},
    }
    if "paged_decode_heavy_256_1024" in result:
        result["targets"]["vattention_over_paged_decode_heavy"] = {
            "figure": result["decode_heavy_256_1024"]["output_tok_s"]
            / result["paged_decode_heavy_256_1024"]["output_tok_s"],
            "limit": 1.15,
        }
        result["targets"]["vattention_over_paged_throughput_1024_128"] = {
            "figure": result["throughput_1024_128"]["output_tok_s"]
            / result["paged_throughput_1024_128"]["output_tok_s"],
            "baseline": 1.0,
        }
    print("\ntarget                                   figure    limit/baseline")
    for name, t in result["targets"].items():
        fig = t["figure"]
        ref = t.get("limit", t.get("baseline"))
        print(f"{name:<40} {fig if fig is None else round(fig, 3)!s:>8}  {ref if ref is None else round(ref, 3)!s:>8}")
    for name in ("throughput_1024_128", "decode_heavy_256_1024"):
        r = result[name]
        print(f"{name}: {r['output_tok_s']:.0f} output tok/s, {r['total_tok_s']:.0f} total tok/s")
    write_result("engine_h100" if "H100" in result["machine"].get("gpu", "") else "engine_gpu", result)


def layout_engines(config: EngineConfig) -> dict:
    """The engines ``--layouts`` can compare, by name -> a builder. Each layout and attention backend named
    explicitly (the engine's GPU default is the token-major cache with ``attention_backend="auto"``: FlashInfer's
    prefill where it is importable)."""
    from benchmarks.paged_kv import build_paged_engine

    def vattention(layout: str, backend: str = "auto"):
        cache = dataclasses.replace(config.cache, kv_cache_layout=layout)
        model = dataclasses.replace(config.model, attention_backend=backend)
        return lambda: LLMEngine(dataclasses.replace(config, cache=cache, model=model))

    return {
        "layer_major": vattention("layer_major"),
        "token_major": vattention("token_major"),
        "token_major_fa2": vattention("token_major", "triton_flash"),  # torch's FA2 varlen for prefill rows
        "paged": lambda: build_paged_engine(config),  # FlashInfer's paged prefill where importable
        "paged_gather": lambda: build_paged_engine(config, prefill_kernel="gather"),
    }


def compare_layouts(
    config: EngineConfig, result: dict, bandwidth: float, gemm: float, scale: int, names: list[str], out_name: str
) -> None:
    """The decode-heavy and default workloads on each engine of ``names`` (``layout_engines``), one after the
    other in this process. Each engine's greedy outputs are first checked against the model itself (teacher-forced).
    Writes ``results/<out_name>.json``."""
    engines = layout_engines(config)
    unknown = sorted(set(names) - set(engines))
    if unknown:
        raise SystemExit(f"unknown engines {unknown}; choose from {sorted(engines)}")
    builders = {name: engines[name] for name in names}
    for name, build in builders.items():
        engine = None
        try:
            t = time.perf_counter()
            engine = build()
            entry = result[name] = {"start_s": time.perf_counter() - t}
            backend = engine.runner.model.attn_backend
            entry["attention_backend"] = backend.name
            stats = engine.stats()
            entry["kv_pool_bytes"] = stats.num_total_pages * stats.page_size_bytes
            entry["max_batch_size"] = stats.max_batch_size
            model = engine.runner.model
            params = sum(p.numel() for p in model.parameters())
            weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            kv_bytes_per_token = engine.kv_cache.token_bytes * engine.kv_cache.num_buffers
            check = workload(4, 200, 32, 128256, seed=11)
            outs = engine.generate(
                [p for p, _ in check], SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
            )
            entry["greedy_shortfall_max"] = max(
                greedy_shortfall(engine, p, o.token_ids) for (p, _), o in zip(check, outs)
            )
            recorder = StepRecorder(engine)
            for label, requests in (
                ("decode_heavy_256_1024", workload(512 // scale, 256, 1024, 128256, seed=3)),
                ("throughput_1024_128", workload(1000 // scale, 1024, 128, 128256, seed=2)),
            ):
                preemptions = engine.stats().num_preemptions
                r = recorder.run(requests)
                entry[label] = {
                    "requests": len(requests),
                    "seconds": r["seconds"],
                    "output_tok_s": r["output_tok_s"],
                    "total_tok_s": r["total_tok_s"],
                    "preemptions": engine.stats().num_preemptions - preemptions,
                    **summarize(r["steps"], bandwidth, gemm, weight_bytes, params, kv_bytes_per_token),
                }
                print(
                    name,
                    label,
                    {k: (round(v, 4) if isinstance(v, float) else v) for k, v in entry[label].items()},
                    flush=True,
                )
            planner = getattr(backend, "prefill_planner", None)  # made at the first prefill that uses it
            entry["prefill_kernel"] = f"flashinfer {planner.kernel}" if planner is not None else "torch fa2 varlen"
            del recorder, model, backend, planner
        except Exception as e:  # one engine's failure must not cost the others
            result.setdefault(name, {})["error"] = repr(e)
            print(name, "failed:", repr(e), flush=True)
        if engine is not None:
            engine.shutdown()
            del engine
        gc.collect()
        torch.cuda.empty_cache()
        write_result(out_name, result)
    print("\nengine           prefill kernel     decode-heavy tok/s  default tok/s  preemptions  greedy shortfall")
    for name in builders:
        e = result.get(name, {})
        if "error" in e or "throughput_1024_128" not in e:
            print(f"{name:<16} failed: {e.get('error')}")
            continue
        d, t = e["decode_heavy_256_1024"], e["throughput_1024_128"]
        print(
            f"{name:<16} {e['prefill_kernel']:<18} {d['output_tok_s']:>18.0f} {t['output_tok_s']:>14.0f} "
            f"{d['preemptions'] + t['preemptions']:>12} {e['greedy_shortfall_max']:>17.4f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small workloads (smoke run)")
    parser.add_argument(
        "--layouts",
        action="store_true",
        help="only compare engines (KV layouts, prefill kernels, the paged-KV mode; see --engines); writes "
        "results/<--name>.json",
    )
    parser.add_argument(
        "--engines",
        default="token_major,paged,layer_major",
        help="with --layouts: comma-separated engines, run one after the other (layer_major, token_major, "
        "token_major_fa2, paged, paged_gather)",
    )
    parser.add_argument("--name", default="engine_layouts_h100", help="with --layouts: the result's name")
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=256,
        help="request slots (256: the setting of the figures so far); 0 = the engine's default, sized from the KV "
        "pool (1024 on an H100; decode batches above 512 run without CUDA graphs)",
    )
    args = parser.parse_args()
    scale = 8 if args.quick else 1
    torch.manual_seed(0)
    bandwidth = measure_copy_bandwidth("cuda")
    gemm = gemm_tflops()
    print(f"copy bandwidth {bandwidth:.0f} GB/s, bf16 GEMM {gemm:.0f} TFLOP/s", flush=True)
    result = {"machine": machine_info("cuda"), "model": MODEL, "copy_gb_s": bandwidth, "gemm_tflops": gemm}
    config = EngineConfig.from_dict(
        {
            "model": MODEL,
            "device": "cuda",
            "dtype": "bfloat16",
            "max_batch_size": args.max_batch_size or None,
            "max_seq_len": 2048,
            "max_num_batched_tokens": 8192,
            "kv_cache_memory_fraction": 0.85,
        }
    )
    if args.layouts:
        compare_layouts(config, result, bandwidth, gemm, scale, args.engines.split(","), args.name)
        return

    base_requests = workload(64 // scale, 1024, 128, 128256, seed=1)
    try:
        result["hf_baseline"] = hf_baseline(base_requests, batch_size=64)
        print(f"transformers generate: {result['hf_baseline']['output_tok_s']:.0f} output tok/s", flush=True)
    except Exception as e:  # the baseline must not cost the rest of the run
        result["hf_baseline"] = {"error": repr(e)}
        print("baseline failed:", repr(e), flush=True)

    t = time.perf_counter()
    engine = LLMEngine(config)
    result["engine_start_s"] = time.perf_counter() - t
    recorder = StepRecorder(engine)
    model = engine.runner.model
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv = engine.kv_cache
    kv_bytes_per_token = kv.token_bytes * kv.num_buffers  # read per token per decode step, all layers K and V
    stats = engine.stats()
    print(
        f"engine up in {result['engine_start_s']:.0f} s: {params / 1e9:.2f} B params, {stats.num_total_pages} KV "
        f"pages of {stats.page_size_bytes >> 20} MiB, {stats.tokens_per_page:.0f} tokens/page",
        flush=True,
    )
    current = {"engine": engine, "recorder": recorder}

    def measure(name, requests):
        engine, recorder = current["engine"], current["recorder"]
        preemptions = engine.stats().num_preemptions
        r = recorder.run(requests)
        summary = summarize(r["steps"], bandwidth, gemm, weight_bytes, params, kv_bytes_per_token)
        stats = engine.stats()
        result[name] = {
            "requests": len(requests),
            "kv_pool_bytes": stats.num_total_pages * stats.page_size_bytes,
            "seconds": r["seconds"],
            "output_tok_s": r["output_tok_s"],
            "total_tok_s": r["total_tok_s"],
            "preemptions": engine.stats().num_preemptions - preemptions,
            **summary,
        }
        print(name, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in result[name].items()}, flush=True)

    measure("warmup", workload(16, 128, 16, 128256, seed=9))
    measure("same_as_baseline", base_requests)
    measure("throughput_1024_128", workload(1000 // scale, 1024, 128, 128256, seed=2))
    measure("decode_heavy_256_1024", workload(512 // scale, 256, 1024, 128256, seed=3))

    # The same decode workload with each step's tokens processed before the next step is launched.
    decode_mix = workload(256 // scale, 256, 512, 128256, seed=5)
    measure("decode_256_512_async", decode_mix)
    engine.async_scheduling = False
    measure("decode_256_512_sync", decode_mix)
    engine.async_scheduling = True

    # Mapping hidden: prompts end just before a page boundary, decode crosses it.
    cross = workload(128, 960, 256 // (4 if args.quick else 1), 128256, seed=4)
    engine.kv_cache.reclaim()
    measure("mapping_on_demand", cross)
    measure("mapping_premapped", cross)
    on, pre = result["mapping_on_demand"], result["mapping_premapped"]
    # The whole decode loop, not the median step: pages mapped in a burst at the boundary stall a few steps only.
    # (The cold run also maps every request's first pages at admission, before its prefill: in whole-run seconds.)
    result["mapping_overhead"] = on["decode_seconds"] / pre["decode_seconds"] - 1
    result["mapping_overhead_whole_run"] = on["seconds"] / pre["seconds"] - 1
    if "decode_step_ms_median" in on and "decode_step_ms_median" in pre:
        result["mapping_overhead_median_step"] = on["decode_step_ms_median"] / pre["decode_step_ms_median"] - 1
    engine.shutdown()
    del engine, recorder, model, kv, current["engine"], current["recorder"]
    gc.collect()
    torch.cuda.empty_cache()
    finish(result)  # kept if the paged part below never returns

    # 6. The same engine over a vLLM-style paged KV cache (16-token blocks, block tables) and the paged twin of the
    # decode kernel, same config and workloads.
    try:
        from benchmarks.paged_kv import build_paged_engine

        t = time.perf_counter()
        paged = build_paged_engine(config)
        result["paged_engine_start_s"] = time.perf_counter() - t
        current.update(engine=paged, recorder=StepRecorder(paged))
        measure("paged_warmup", workload(16, 128, 16, 128256, seed=9))
        measure("paged_decode_heavy_256_1024", workload(512 // scale, 256, 1024, 128256, seed=3))
        measure("paged_throughput_1024_128", workload(1000 // scale, 1024, 128, 128256, seed=2))
        paged.shutdown()
    except Exception as e:  # the baseline must not cost the rest of the run
        result["paged_error"] = repr(e)
        print("paged engine failed:", repr(e), flush=True)

    finish(result)


if __name__ == "__main__":
    main()
