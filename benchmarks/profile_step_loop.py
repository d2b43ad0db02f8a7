"""Where the engine's host time goes: one workload through ``engine.step()`` under cProfile, per engine.

    python benchmarks/profile_step_loop.py                                  # GPU: Llama-3-8B shapes, bf16
    python benchmarks/profile_step_loop.py --model dummy:tiny-llama --device cpu --requests 64

For each engine of ``--engines`` (``bench_engine_gpu.layout_engines``): the workload's wall time, the device's idle
share over the run on a GPU (1 - summed forward GPU time / wall), and the functions with the most own time. With
asynchronous scheduling the host prepares step n + 1 while the device runs step n, so host time per step beyond the
step's GPU time is device idle time; the functions listed say whose it is.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_engine_gpu import StepRecorder, layout_engines, workload  # noqa: E402
from engine.config import EngineConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default="token_major,paged")
    parser.add_argument("--model", default="dummy:llama-3-8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=1024)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument(
        "--callers",
        default=r"cache.py:.*\((_map_tail|_unmap_tail)\)|_get_device_attr|synchronize",
        help="regex of functions whose callers are listed (pstats print_callers); '' for none",
    )
    parser.add_argument("--engine-kwargs", default="{}", help="JSON merged into the engine config")
    args = parser.parse_args()

    values = {
        "model": args.model,
        "device": args.device,
        "max_batch_size": 256,
        "max_seq_len": 2048,
        "max_num_batched_tokens": 8192,
    }
    if args.device == "cuda":
        values.update(dtype="bfloat16", kv_cache_memory_fraction=0.85)
    values.update(json.loads(args.engine_kwargs))
    config = EngineConfig.from_dict(values)
    engines = layout_engines(config)
    vocab = 128256 if "llama-3" in args.model else 1000
    for name in args.engines.split(","):
        engine = engines[name]()
        recorder = StepRecorder(engine) if args.device == "cuda" else None
        engine.generate([[1] * 64] * 4, None)  # warm-up: kernels, graphs
        requests = workload(args.requests, args.input_len, args.output_len, vocab, seed=3)
        profile = cProfile.Profile()
        t = time.perf_counter()
        if recorder is not None:
            profile.enable()
            r = recorder.run(requests)
            profile.disable()
            busy = sum(s["gpu_s"] for s in r["steps"])
            print(
                f"\n== {name}: {r['seconds']:.1f} s, {r['output_tok_s']:.0f} output tok/s, "
                f"device idle {1 - busy / r['seconds']:.1%} of the run, {len(r['steps'])} steps"
            )
        else:
            from engine.sampling_params import SamplingParams

            for i, (prompt, n) in enumerate(requests):
                engine.add_request(f"p{i}", prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
            profile.enable()
            steps = 0
            while engine.has_unfinished():
                engine.step()
                steps += 1
            profile.disable()
            print(f"\n== {name}: {time.perf_counter() - t:.1f} s, {steps} steps")
        out = io.StringIO()
        stats = pstats.Stats(profile, stream=out).strip_dirs().sort_stats("tottime")
        stats.print_stats(args.top)
        print("\n".join(line for line in out.getvalue().splitlines()[6:] if line.strip()))
        out = io.StringIO()
        cumulative = pstats.Stats(profile, stream=out).strip_dirs().sort_stats("cumulative")
        cumulative.print_stats(r"(scheduler|llm_engine|cache|model_runner|cuda_graph_runner|flashinfer)\.py", 30)
        print("-- cumulative, engine and cache functions:")
        print("\n".join(line for line in out.getvalue().splitlines()[6:] if line.strip()))
        if args.callers:
            out = io.StringIO()
            pstats.Stats(profile, stream=out).strip_dirs().sort_stats("tottime").print_callers(args.callers)
            print("\n".join(line for line in out.getvalue().splitlines() if line.strip() and "Ordered by" not in line))
        engine.shutdown()
        del engine, recorder
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
