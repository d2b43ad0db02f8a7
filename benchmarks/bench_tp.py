"""Tensor parallelism: TP=2 (or each of ``--tp-sizes``) against TP=1 on the same seeded weights, in the same run.

    RAY_AUTH_MODE=disabled python benchmarks/bench_tp.py                       # 2 GPUs, dummy:llama-3-8b bf16
    RAY_AUTH_MODE=disabled python benchmarks/bench_tp.py --tp-sizes 2,4        # 4 GPUs
    RAY_AUTH_MODE=disabled python benchmarks/bench_tp.py --tp-sizes 4 --model dummy:yi-34b --skip-correctness
    python benchmarks/bench_tp.py --num-prompts 8 --input-len 64 --output-len 16 --skip-serve   # quick look

Parts (each in its own try/except; a failure is recorded in the result and the next part still runs):
  1. correctness: greedy tokens of ``--check-prompts`` prompts (``--check-tokens`` new tokens) at TP=1 and
     each TP size; dummy weights are generated at TP=1 shapes from ``--seed`` and then sharded, so both runs hold the
     same model. Reported: exact matches and the common prefix per prompt (bf16 reductions run in another
     order at TP=2, so a near-tie may flip late; ``--check-dtype float32`` makes the comparison exact).
  2. throughput: ``--num-prompts`` requests of ``--input-len`` random tokens, ``--output-len`` greedy tokens
     each (ignore_eos), all at once, at TP=1 and at each TP size: output tokens/s, total tokens/s, speedup, the
     decode floor (weights bytes per rank / measured copy bandwidth) and the host time of the step's parts.
  3. serve: a Serve app with ``tensor_parallel_size`` the largest TP size (a STRICT_PACK placement group of one
     GPU bundle per rank, serve_config.gpu.yaml-like args) answers an HTTP chat request.

Every engine runs inside a Ray actor holding one GPU (rank 0); ranks 1.. are ``TPWorkerActor`` s in the same
placement group, exactly as in a Serve replica. Writes ``results/<--name>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import ray  # noqa: E402
from ray.util.placement_group import placement_group, remove_placement_group  # noqa: E402
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy  # noqa: E402

from benchmarks.common import machine_info, write_result  # noqa: E402
from deployments.serve_mode import sync_handle, use_serve_env  # noqa: E402


@ray.remote
class EngineRank0:
    """An ``LLMEngine`` in its own process: rank 0 of a TP group (or the whole engine at TP=1)."""

    def __init__(self, engine_config: dict) -> None:
        from deployments.tp_workers import make_executor_factory
        from engine.config import EngineConfig
        from engine.llm_engine import LLMEngine

        start = time.perf_counter()
        self.engine = LLMEngine(EngineConfig.from_dict(engine_config), executor_factory=make_executor_factory())
        self.load_s = time.perf_counter() - start

    def info(self) -> dict:
        stats = self.engine.stats()
        runner = self.engine.runner
        weight_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
        return {
            "load_s": round(self.load_s, 1),
            "num_total_pages": stats.num_total_pages,
            "tokens_per_page": stats.tokens_per_page,
            "weight_bytes_per_rank": weight_bytes,
            "num_kv_heads_per_rank": self.engine.kv_cache.config.num_kv_heads,
            "attention_backend": runner.attention_backend,
            "cuda_graphs": runner.graph_runner is not None,
        }

    def greedy(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        from engine.sampling_params import SamplingParams

        outs = self.engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
        return [list(o.token_ids) for o in outs]

    def throughput(self, prompts: list[list[int]], output_len: int, profile_steps: int = 0) -> dict:
        from engine.sampling_params import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
        # Warm-up at the run's own shapes (the prefill chunks and every decode batch: kernels are compiled or tuned
        # for them on first use), on reversed prompts so that no prefix of the timed prompts is cached. The
        # profiler, if asked for, watches the warm-up's decode steps: the timed run carries none of its cost.
        profile = self._profile_steps(first=40, count=profile_steps) if profile_steps else None
        self.engine.generate([p[::-1] for p in prompts], params)
        profiled = profile() if profile is not None else None
        steps_before = self.engine.num_steps
        preemptions_before = self.engine.scheduler.num_preemptions
        spent, step_s = self._time_step_parts()
        start = time.perf_counter()
        outs = self.engine.generate(prompts, params)  # ends with a sampled token on the host: synchronized
        elapsed = time.perf_counter() - start
        out_tokens = sum(len(o.token_ids) for o in outs)
        in_tokens = sum(len(p) for p in prompts)
        durations = sorted(step_s)
        median = durations[len(durations) // 2]
        result = {
            "elapsed_s": round(elapsed, 2),
            "output_tokens": out_tokens,
            "output_tok_s": round(out_tokens / elapsed, 1),
            "total_tok_s": round((out_tokens + in_tokens) / elapsed, 1),
            "steps": self.engine.num_steps - steps_before,
            "num_preemptions": self.engine.scheduler.num_preemptions - preemptions_before,
            # Host time inside each part of the step loop (seconds over the run): where a TP step's time goes.
            "host_s": {k: round(v, 3) for k, v in spent.items()},
            # The median step is a decode step of the whole batch; the steps over 3x it are the prefill chunks and
            # the first decode step (launched behind the last chunk, under asynchronous scheduling).
            "step_ms_p50": round(median * 1e3, 2),
            "long_steps_s": round(sum(d for d in durations if d > 3 * median), 3),
            "num_long_steps": sum(d > 3 * median for d in durations),
        }
        if profiled is not None:
            result["profile"] = profiled
        return result

    def _time_step_parts(self) -> tuple[dict, list[float]]:
        """Wraps the step loop's parts on this engine to add their host time to the returned dict: the whole
        step, the executor's run; under TP, the push of the step to the workers and rank 0's own forward (its
        launches; the all-reduces wait on the GPU). Also returns the list each step's wall time is appended to."""
        spent: dict = {}
        step_s: list[float] = []

        def timed(owner, name: str, key: str, each: list | None = None) -> None:
            inner = getattr(owner, name)

            def wrapper(*a, **k):
                start = time.perf_counter()
                try:
                    return inner(*a, **k)
                finally:
                    took = time.perf_counter() - start
                    spent[key] = spent.get(key, 0.0) + took
                    if each is not None:
                        each.append(took)

            setattr(owner, name, wrapper)

        executor = self.engine.executor
        if hasattr(executor, "workers"):
            timed(executor, "_send", "send_to_workers")
            timed(executor.runner, "run", "rank0_forward_launch")
        timed(executor, "run", "executor_run")
        timed(self.engine, "step", "step", step_s)
        return spent, step_s

    def _profile_steps(self, first: int, count: int):
        """Runs the torch profiler over steps ``first + 1 .. first + count`` of this engine from now on (its own
        schedule, stepped after each engine step); returns a function that ends it and gives its summary (kernel
        and host time by operator, as text)."""
        import torch

        profiler = torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA],
            schedule=torch.profiler.schedule(wait=first - 1, warmup=1, active=count, repeat=1),
        )
        inner = self.engine.step

        def step(*a, **k):
            try:
                return inner(*a, **k)
            finally:
                profiler.step()

        self.engine.step = step
        profiler.start()

        def summary() -> dict:
            self.engine.step = inner
            profiler.stop()
            steps = min(count, max(0, profiler.step_num - first))
            if not steps:
                return {"steps": 0}
            averages = profiler.key_averages()
            return {
                "steps": steps,
                "by_self_cuda": averages.table(sort_by="self_cuda_time_total", row_limit=12),
                "by_self_cpu": averages.table(sort_by="self_cpu_time_total", row_limit=18),
            }

        return summary

    def copy_bandwidth_gbs(self) -> float:
        from benchmarks.common import measure_copy_bandwidth

        return round(measure_copy_bandwidth(str(self.engine.device), 1 << 28), 1)

    def shutdown(self) -> None:
        self.engine.shutdown()


def start_engine(args, tp: int, dtype: str, max_batch_size: int, max_seq_len: int):
    """(actor, placement group) of an engine with ``tp`` ranks, rank 0 in bundle 0."""
    gpus = 1 if args.device == "cuda" else 0
    pg = placement_group([{"GPU": 1, "CPU": 1} if gpus else {"CPU": 1}] * tp, strategy="STRICT_PACK")
    ray.get(pg.ready(), timeout=120)
    config = {
        "model": args.model,
        "device": args.device,
        "dtype": dtype,
        "tensor_parallel_size": tp,
        "seed": args.seed,
        "max_batch_size": max_batch_size,
        "max_seq_len": max_seq_len,
        "kv_cache_memory_fraction": args.kv_cache_memory_fraction,
        "enforce_eager": args.enforce_eager,
        "max_num_batched_tokens": args.max_num_batched_tokens,
    }
    actor = EngineRank0.options(
        num_gpus=gpus,
        num_cpus=1,
        scheduling_strategy=PlacementGroupSchedulingStrategy(
            pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True
        ),
    ).remote(config)
    return actor, pg


def stop_engine(actor, pg) -> bool:
    """Shut the engine down (ended by force after 30 s); whether it shut down by itself."""
    try:
        ray.get(actor.shutdown.remote(), timeout=30)
        clean = True
    except Exception:  # noqa: BLE001 - killing it below frees everything anyway
        clean = False
    ray.kill(actor)
    remove_placement_group(pg)
    time.sleep(2)  # let the GPUs' memory go back before the next engine sizes its KV pool
    return clean


def run_engine_part(args, tp: int, dtype: str, max_batch_size: int, max_seq_len: int, work) -> dict:
    """``work(actor)``'s results with the engine's info and the wall time of each phase (start: processes, weights,
    cache, CUDA graphs; work; stop: the engine's shutdown, the processes and GPUs released)."""
    start = time.perf_counter()
    actor, pg = start_engine(args, tp, dtype, max_batch_size, max_seq_len)
    phases = {}
    try:
        info = ray.get(actor.info.remote(), timeout=args.timeout_s)
        phases["start_s"] = round(time.perf_counter() - start, 1)
        result = {"info": info, "phase_s": phases}
        start = time.perf_counter()
        result.update(work(actor))
        phases["work_s"] = round(time.perf_counter() - start, 1)
        return result
    finally:
        start = time.perf_counter()
        phases["stopped_cleanly"] = stop_engine(actor, pg)
        phases["stop_s"] = round(time.perf_counter() - start, 1)
        print(f"TP={tp} engine phases (s): {phases}", flush=True)


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 100) for _ in range(length)] for _ in range(n)]


def part_correctness(args, result: dict) -> None:
    prompts = random_prompts(args.check_prompts, 32, 32000, args.seed + 1)
    tokens = {}
    for tp in (1, *args.tp_sizes):
        part = run_engine_part(
            args,
            tp,
            args.check_dtype,
            max(8, args.check_prompts),
            512,
            lambda a: {"tokens": ray.get(a.greedy.remote(prompts, args.check_tokens), timeout=args.timeout_s)},
        )
        tokens[tp] = part["tokens"]
        result[f"tp{tp}_info_check"] = part["info"]
    result["correctness"] = {"dtype": args.check_dtype, "prompts": len(prompts), "new_tokens": args.check_tokens}
    for tp in args.tp_sizes:
        prefixes = []
        for a, b in zip(tokens[1], tokens[tp]):
            n = 0
            while n < min(len(a), len(b)) and a[n] == b[n]:
                n += 1
            prefixes.append(n)
        result["correctness"][f"tp{tp}"] = {
            "exact_matches": sum(a == b for a, b in zip(tokens[1], tokens[tp])),
            "common_prefix_tokens": prefixes,
            "match": tokens[1] == tokens[tp],
            "first_tokens": [t[:8] for t in tokens[tp]],
        }
    result["correctness"]["tp1_first_tokens"] = [t[:8] for t in tokens[1]]


def part_throughput(args, result: dict) -> None:
    prompts = random_prompts(args.num_prompts, args.input_len, 32000, args.seed)
    max_seq_len = args.input_len + args.output_len + 16
    for tp in (1, *args.tp_sizes):

        def work(actor):
            run = actor.throughput.remote(prompts, args.output_len, args.profile_steps)
            out = {"throughput": ray.get(run, timeout=args.timeout_s)}
            out["copy_bandwidth_gbs"] = ray.get(actor.copy_bandwidth_gbs.remote(), timeout=args.timeout_s)
            return out

        part = run_engine_part(args, tp, args.dtype, args.max_batch_size, max_seq_len, work)
        # Weights read once per step at the copy's rate (its GB/s count the bytes read and written: bytes moved).
        floor_ms = part["info"]["weight_bytes_per_rank"] / (part["copy_bandwidth_gbs"] * 1e9) * 1e3
        part["decode_floor_ms_per_step"] = round(floor_ms, 2)
        result[f"tp{tp}"] = part
        write_result(args.name, result)  # each size as it comes: a run cut short keeps what it measured
    t1 = result["tp1"]["throughput"]["output_tok_s"]
    result["speedup_output_tok_s"] = {
        f"tp{tp}": round(result[f"tp{tp}"]["throughput"]["output_tok_s"] / t1, 2) for tp in args.tp_sizes
    }


def part_serve(args, result: dict) -> None:
    import httpx
    from ray import serve

    from deployments.app import ENGINE_DEPLOYMENT_NAME, build_app

    port = 8000 + random.Random().randrange(1000)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app_args = {
        "model": args.model,
        "served_model_name": "tp-model",
        "dtype": args.dtype,
        "device": args.device,
        "tensor_parallel_size": max(args.tp_sizes),
        "engine_kwargs": {
            "max_batch_size": args.max_batch_size,
            "max_seq_len": max(2048, args.input_len + args.output_len + 16),
            "kv_cache_memory_fraction": args.kv_cache_memory_fraction,
            "max_num_batched_tokens": args.max_num_batched_tokens,
            "seed": args.seed,
            "enforce_eager": args.enforce_eager,
        },
        "engine": {"num_replicas": 1, "num_cpus": 1 if args.device == "cuda" else 0, "router": "page_aware"},
        "ingress": {"num_replicas": 1, "num_cpus": 0},
    }
    start = time.perf_counter()
    serve.run(build_app(app_args), name="tp", route_prefix="/", blocking=False)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + args.timeout_s
    while time.time() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=10).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(2)
    ready_s = time.perf_counter() - start
    body = {
        "model": "tp-model",
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 16,
        "temperature": 0,
    }
    r = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=120)
    result["serve"] = {
        "tensor_parallel_size": max(args.tp_sizes),
        "ready_s": round(ready_s, 1),
        "status_code": r.status_code,
        "completion_tokens": r.json().get("usage", {}).get("completion_tokens") if r.status_code == 200 else None,
        "body": r.text[:500],
    }
    if r.status_code == 200 and args.serve_prompts:
        result["serve"]["load"] = http_load(base, args)
    stats = sync_handle(ENGINE_DEPLOYMENT_NAME, "tp").engine_stats.remote().result(timeout_s=30)
    result["serve"]["engine_stats"] = {
        k: stats[k] for k in ("num_total_pages", "num_free_pages", "tokens_per_page") if k in stats
    }
    serve.delete("tp")
    serve.shutdown()


def http_load(base: str, args) -> dict:
    """``--serve-prompts`` completions of ``--input-len`` random token ids and ``--output-len`` tokens each
    (ignore_eos), all sent at once over HTTP, after the same load once on reversed prompts: output tokens/s from the
    first request sent to the last answer."""
    import asyncio

    import httpx

    prompts = random_prompts(args.serve_prompts, args.input_len, 32000, args.seed + 2)

    async def one(client: httpx.AsyncClient, prompt: list[int]) -> int:
        body = {
            "model": "tp-model",
            "prompt": prompt,
            "max_tokens": args.output_len,
            "temperature": 0,
            "ignore_eos": True,
        }
        r = await client.post(f"{base}/v1/completions", json=body)
        return r.json()["usage"]["completion_tokens"] if r.status_code == 200 else -r.status_code

    async def run(batch: list[list[int]]) -> list[int]:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(timeout=args.timeout_s, limits=limits) as client:
            return await asyncio.gather(*(one(client, p) for p in batch))

    asyncio.run(run([p[::-1] for p in prompts]))  # warm-up at the same shapes, on other prefixes
    start = time.perf_counter()
    got = asyncio.run(run(prompts))
    elapsed = time.perf_counter() - start
    ok = [n for n in got if n >= 0]
    return {
        "requests": len(prompts),
        "ok": len(ok),
        "failed_status": sorted(-n for n in got if n < 0),
        "elapsed_s": round(elapsed, 2),
        "output_tok_s": round(sum(ok) / elapsed, 1),
    }


def print_table(result: dict, tp_sizes: list[int]) -> None:
    print()
    corr = result.get("correctness")
    for tp in tp_sizes if corr else ():
        if f"tp{tp}" in corr:
            c = corr[f"tp{tp}"]
            print(
                f"correctness ({corr['dtype']}, {corr['prompts']} prompts x {corr['new_tokens']} tokens): "
                f"TP={tp} == TP=1: {c['match']} ({c['exact_matches']} exact; common prefixes "
                f"{c['common_prefix_tokens']})"
            )
    keys = [k for k in ("tp1", *(f"tp{tp}" for tp in tp_sizes)) if k in result]
    if keys:
        print(
            f"{'':8}{'output tok/s':>14}{'total tok/s':>14}{'elapsed s':>11}{'steps':>7}{'preempt':>9}"
            f"{'step ms p50':>13}{'floor ms/step':>15}{'long steps s':>14}{'weights/rank GB':>17}{'speedup':>9}"
        )
        for key in keys:
            part = result[key]
            t = part["throughput"]
            speedup = result.get("speedup_output_tok_s", {}).get(key, 1.0 if key == "tp1" else "")
            print(
                f"{key.upper():8}{t['output_tok_s']:>14}{t['total_tok_s']:>14}{t['elapsed_s']:>11}{t['steps']:>7}"
                f"{t['num_preemptions']:>9}{t.get('step_ms_p50', ''):>13}{part['decode_floor_ms_per_step']:>15}"
                f"{t.get('long_steps_s', ''):>14}"
                f"{part['info']['weight_bytes_per_rank'] / 1e9:>17.2f}{speedup:>9}"
            )
            host = t.get("host_s")
            if host:
                print(f"{'':8}host s: " + ", ".join(f"{k} {v}" for k, v in host.items()))
    if "serve" in result:
        s = result["serve"]
        print(
            f"serve (TP={s['tensor_parallel_size']} replica): HTTP {s['status_code']}, {s['completion_tokens']} "
            f"tokens, ready in {s['ready_s']} s"
        )
        if "load" in s:
            load = s["load"]
            print(
                f"serve load: {load['ok']}/{load['requests']} requests x {result['settings']['input_len']}/"
                f"{result['settings']['output_len']} tokens over HTTP at once: {load['output_tok_s']} output tok/s"
            )
    for name, error in result.get("errors", {}).items():
        print(f"FAILED {name}: {error.splitlines()[-1] if error else ''}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dummy:llama-3-8b")
    parser.add_argument(
        "--tp-sizes",
        type=lambda text: sorted({int(t) for t in text.split(",")}),
        default=[2],
        help="comma-separated TP sizes, each compared with TP=1",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--check-prompts", type=int, default=4)
    parser.add_argument("--check-tokens", type=int, default=32)
    parser.add_argument("--check-dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--dtype", default="bfloat16", help="throughput and serve parts")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a smoke test of the script")
    parser.add_argument("--kv-cache-memory-fraction", type=float, default=0.8)
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (both TP=1 and TP=2)")
    parser.add_argument(
        "--profile-steps",
        type=int,
        default=0,
        help="the torch profiler's summary of that many decode steps of the warm-up run, each size",
    )
    parser.add_argument(
        "--serve-prompts", type=int, default=0, help="serve part: that many --input-len/--output-len requests at once"
    )
    parser.add_argument("--skip-correctness", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-serve", action="store_true")
    parser.add_argument("--timeout-s", type=float, default=900.0, help="per Ray call (model load, a whole run)")
    parser.add_argument("--name", default="tp_h100x2")
    args = parser.parse_args()

    import torch

    num_gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    if args.device == "cuda" and num_gpus < max(args.tp_sizes):
        print(f"needs {max(args.tp_sizes)} GPUs, found {num_gpus}")
        return 2
    env_vars = {
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p),
        "RAY_AUTH_MODE": "disabled",
        "NCCL_NVLS_ENABLE": "0",
        "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    }
    use_serve_env(own_cluster=True)
    ray.init(
        num_gpus=num_gpus,
        num_cpus=max(os.cpu_count() or 1, 2 * max(args.tp_sizes) + 2),
        include_dashboard=False,
        runtime_env={"env_vars": env_vars},
        logging_level="WARNING",
    )
    result: dict = {"machine": machine_info(args.device), "settings": vars(args), "errors": {}}
    for name, part, skip in (
        ("correctness", part_correctness, args.skip_correctness),
        ("throughput", part_throughput, args.skip_throughput),
        ("serve", part_serve, args.skip_serve),
    ):
        if skip:
            continue
        start = time.perf_counter()
        try:
            part(args, result)
        except Exception:  # noqa: BLE001 - report and go on with the next part
            result["errors"][name] = traceback.format_exc()
            traceback.print_exc()
        result.setdefault("part_seconds", {})[name] = round(time.perf_counter() - start, 1)
        write_result(args.name, result)  # keep what we have if a later part hangs
    path = write_result(args.name, result)
    for tp in (1, *args.tp_sizes):
        profile = result.get(f"tp{tp}", {}).get("throughput", {}).get("profile")
        if profile and profile["steps"]:
            print(f"\nTP={tp}, {profile['steps']} decode steps of the warm-up run profiled on rank 0:")
            print(profile["by_self_cuda"])
            print(profile["by_self_cpu"])
    print_table(result, args.tp_sizes)
    print(f"wrote {path}")
    ray.shutdown()
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
