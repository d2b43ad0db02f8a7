"""How the bound on the cached pages a step's admissions map (``engine.scheduler.CACHED_PAGES_PER_STEP``) trades the
shared-prompt burst against multi-turn traffic: bench_prefix's two engine-mode workloads, caching on, once per bound,
on one engine, with where the host time went (the scheduler's phases, the forward launches, the allocations).

    python benchmarks/sweep_prefix_admission.py --factors 1,4,8,inf                     # GPU: Llama-3-8B shapes
    python benchmarks/sweep_prefix_admission.py --model smollm2 --device cpu --factors 1,inf \
        --system-tokens 256 --num-requests 16 --num-conversations 4 --max-seq-len 1024      # CPU, ~1 min

Options it does not name are bench_prefix's (workload sizes, engine settings).

Each bound runs on fresh prompts (its own seed), so no bound finds another's prefixes cached. Too small a bound
spreads a burst of hits over many eager steps (a step that admits prefill rows replays no graph); too large a one
maps every hit before the first launch. The workloads' TTFT with caching off is bench_prefix's.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import benchmarks.bench_prefix as bench_prefix  # noqa: E402
import engine.scheduler as scheduler_module  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402


def time_calls(obj: object, name: str, totals: dict[str, list[float]]) -> None:
    """Wraps ``obj.name`` to add each call's seconds and count to ``totals[name]``."""
    fn = getattr(obj, name)
    totals[name] = [0.0, 0]

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[name][0] += time.perf_counter() - start
            totals[name][1] += 1

    setattr(obj, name, timed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--factors", default="1,4,8,inf", help="CACHED_PAGES_PER_STEP values; inf: unbounded")
    p.add_argument("--model", default="dummy:llama-3-8b")
    p.add_argument("--device", default="cuda")
    a, rest = p.parse_known_args()
    # bench_prefix's workloads and engine settings; its other options (e.g. --system-tokens) pass through.
    args = bench_prefix.parse_args(["--mode", "engine", "--model", a.model, "--device", a.device, *rest])
    engine = LLMEngine(bench_prefix.engine_config(args, True))
    totals: dict[str, list[float]] = {}
    for obj, name in [
        (engine.scheduler, "schedule"),
        (engine.executor, "run"),
        (engine.scheduler, "on_launched"),
        (engine.scheduler, "update_from_output"),
        (engine.kv_cache, "allocate"),
    ]:
        time_calls(obj, name, totals)
    engine.generate([[1] * 64] * 4, None)  # warm-up: kernels, graphs
    vocab = len(bench_prefix.load_tokenizer(bench_prefix.resolve_model(args.model)))
    default = scheduler_module.CACHED_PAGES_PER_STEP
    try:
        for n, factor in enumerate(a.factors.split(",")):
            scheduler_module.CACHED_PAGES_PER_STEP = float("inf") if factor == "inf" else float(factor)
            for seed, workload in ((11 + 2 * n, "shared_prompt"), (12 + 2 * n, "multi_turn")):
                args.seed = seed
                conversations = bench_prefix.make_workloads(args, vocab)[workload]
                for total in totals.values():
                    total[:] = [0.0, 0]
                steps = engine.num_steps
                r = bench_prefix.run_engine_workload(engine, conversations, float("inf"), seed)
                print(
                    f"x{factor:<4} {workload:<14} TTFT p50 {r['p50_ttft_ms']:7.0f} ms, p99 {r['p99_ttft_ms']:7.0f} ms, "
                    f"{r['output_tok_s']:6.0f} output tok/s, hit rate {r['hit_rate']:.3f}, "
                    f"{engine.num_steps - steps} steps ({r['elapsed_s']:.1f} s)"
                )
                print("      host s / calls: " + ", ".join(f"{k} {s:.2f}/{c}" for k, (s, c) in totals.items()))
    finally:
        scheduler_module.CACHED_PAGES_PER_STEP = default
        engine.shutdown()


if __name__ == "__main__":
    main()
