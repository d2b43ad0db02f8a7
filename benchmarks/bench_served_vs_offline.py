"""The served path against the offline engine, in one run on the same device(s) and the same requests.

1. offline: one engine in a fresh Ray worker process (one GPU on ``--device cuda``) adds every request at once and
   steps until all finish (``LLMEngine.generate``'s loop, with a time stamp per step and per output);
2. served: the Serve app (ingress -> page-aware router -> ``R`` engine replicas, one GPU each) deployed for each
   ``R`` of ``--num-replicas``, and ``R`` times as many requests (the offline requests, repeated with fresh ids)
   streamed over HTTP all at once.

Printed next to each other: output tok/s per replica against the offline engine's (served/offline), p50/p99 TPOT
against the offline TPOT and the offline decode step, and the CPU seconds per output token of the ingress, the
engine replicas (their Serve actors and, with ``engine_process``, their engine core processes), Serve's proxy actor
and the HAProxy it runs, read from ``/proc`` through psutil. ``--profile-dir`` also records a py-spy profile of each
of those Python processes during the served run (collapsed stacks, read by ``--summarize``). Serve runs on the app's
data path (``deployments.serve_mode``) unless ``RAY_SERVE_ENABLE_HA_PROXY=0 RAY_SERVE_THROUGHPUT_OPTIMIZED=0``.

    python benchmarks/bench_served_vs_offline.py --out benchmarks/results/served_vs_offline_cpu.json   # 2-core CPU
    python benchmarks/bench_served_vs_offline.py --device cuda --model dummy:llama-3-8b --num-replicas 1,2 \\
        --engine-kwargs '{"max_batch_size": 256, "kv_cache_memory_fraction": 0.85, "max_num_batched_tokens": 8192}' \\
        --num-prompts 300 --long-input-len 4000 --long-output-len 600 --short-input-len 300 --short-output-len 150
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.bench_serving import (  # noqa: E402
    RequestSpec,
    add_skewed_args,
    deploy,
    make_workload,
    print_summary,
    run_load,
    skewed_lengths,
    start_local_ray,
    summarize,
)
from benchmarks.common import current_commit  # noqa: E402

# Unique on the machine: the served processes are found by their titles, which carry it.
APP_NAME = f"served{os.getpid()}"
CPU_ENGINE_KWARGS = {
    "max_batch_size": 16,
    "max_seq_len": 1024,
    "kv_cache_memory_bytes": 256 << 20,
    "max_num_batched_tokens": 512,
}


# ---- offline ----------------------------------------------------------------------------------------


def offline_run(engine_config: dict, specs: list[RequestSpec]) -> dict:
    """Every request added at once, stepped to the end; per-step times and per-request token times."""
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig.from_dict(dict(engine_config)))
    warm = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    engine.generate([s.prompt_token_ids[:16] for s in specs[:2]], warm)  # first forwards allocate buffers
    decode_only: list[bool] = []
    schedule = engine.scheduler.schedule

    def recording_schedule():  # whether each launched plan is decode only (one token per request)
        plan = schedule()
        if not plan.is_empty:
            decode_only.append(plan.num_batched_tokens == len(plan.scheduled))
        return plan

    engine.scheduler.schedule = recording_schedule
    start = time.perf_counter()
    for i, spec in enumerate(specs):
        params = SamplingParams(max_tokens=spec.max_tokens, temperature=0, ignore_eos=True)
        engine.add_request(f"offline-{i}", spec.prompt_token_ids, params)
    step_s, step_decode_only = [], []
    first_s: dict[str, float] = {}
    last_s: dict[str, float] = {}
    num_out: dict[str, int] = {}
    while engine.has_unfinished():
        num_plans = len(decode_only)
        t0 = time.perf_counter()
        outputs = engine.step()
        now = time.perf_counter()
        step_s.append(now - t0)
        step_decode_only.append(len(decode_only) > num_plans and all(decode_only[num_plans:]))
        for out in outputs:
            if out.new_token_ids:
                first_s.setdefault(out.request_id, now - start)
                last_s[out.request_id] = now - start
                num_out[out.request_id] = out.num_output_tokens
    duration_s = time.perf_counter() - start
    engine.shutdown()
    tpot = [(last_s[r] - first_s[r]) / (num_out[r] - 1) for r in num_out if num_out[r] > 1]
    decode_steps = [s for s, d in zip(step_s, step_decode_only) if d]
    out_tokens = sum(num_out.values())
    return {
        "num_requests": len(specs),
        "duration_s": duration_s,
        "output_tokens": out_tokens,
        "output_throughput_tok_s": out_tokens / duration_s,
        "num_steps": len(step_s),
        "median_step_ms": float(np.median(step_s) * 1e3),
        "num_decode_only_steps": len(decode_steps),
        "median_decode_step_ms": float(np.median(decode_steps) * 1e3) if decode_steps else None,
        "p50_tpot_ms": float(np.percentile(tpot, 50) * 1e3),
        "p99_tpot_ms": float(np.percentile(tpot, 99) * 1e3),
        "p50_ttft_ms": float(np.percentile(list(first_s.values()), 50) * 1e3),
        "num_preemptions": engine.scheduler.num_preemptions,
    }


# ---- served -----------------------------------------------------------------------------------------


def app_args(args: argparse.Namespace, num_replicas: int, engine_process: str = "default") -> dict:
    """The app's args; ``engine_process`` "on" / "off" sets it, "default" leaves the config's default per device."""
    on_gpu = args.device == "cuda"
    engine_kwargs = dict(CPU_ENGINE_KWARGS if args.engine_kwargs is None else json.loads(args.engine_kwargs))
    if engine_process != "default":
        engine_kwargs["engine_process"] = engine_process == "on"
    return {
        "model": args.model,
        "device": args.device,
        "engine_kwargs": engine_kwargs,
        "engine": {
            "num_replicas": num_replicas,
            "num_cpus": 1 if on_gpu else 0,
            "num_gpus": 1 if on_gpu else 0,
            "max_ongoing_requests": args.max_ongoing_requests,
            "max_queued_requests": -1,
        },
        "ingress": {
            "num_replicas": args.ingress_replicas,
            "num_cpus": 0,
            "max_ongoing_requests": 4096,
            "max_queued_requests": -1,
        },
    }


def serving_processes(app_name: str) -> dict[str, list[int]]:
    """PIDs of the app's processes by role: ingress, engine replica actors, their children (engine cores), proxy
    (Serve's proxy actor) and, with ``RAY_SERVE_ENABLE_HA_PROXY=1``, the HAProxy it runs. Found by the titles Ray
    gives its actor processes (``ray::ServeReplica:<app>:<deployment>``)."""
    import psutil

    from deployments.app import ENGINE_DEPLOYMENT_NAME, INGRESS_DEPLOYMENT_NAME

    roles: dict[str, list[int]] = collections.defaultdict(list)
    for proc in psutil.process_iter(["pid", "cmdline", "name"]):
        title = " ".join(proc.info["cmdline"] or ())
        if title.startswith(f"ray::ServeReplica:{app_name}:{INGRESS_DEPLOYMENT_NAME}"):
            roles["ingress"].append(proc.pid)
        elif title.startswith(f"ray::ServeReplica:{app_name}:{ENGINE_DEPLOYMENT_NAME}"):
            roles["replica"].append(proc.pid)
            roles["engine_core"] += [c.pid for c in proc.children(recursive=True)]
        elif title.startswith("ray::ProxyActor") and _in_this_cluster(proc):
            roles["proxy"].append(proc.pid)
        elif proc.info["name"] == "haproxy" and _in_this_cluster(proc):
            roles["haproxy"].append(proc.pid)
    return dict(roles)


def _in_this_cluster(proc) -> bool:
    """Whether ``proc`` descends from this driver's raylet (other clusters may run on the machine)."""
    import psutil
    import ray

    raylet_pid = ray._private.worker.global_worker.node.all_processes["raylet"][0].process.pid
    try:
        return any(parent.pid == raylet_pid for parent in proc.parents())
    except psutil.Error:
        return False


def cpu_seconds(pids: list[int]) -> float:
    import psutil

    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def start_profilers(roles: dict[str, list[int]], profile_dir: Path) -> list[subprocess.Popen]:
    py_spy = Path(sys.executable).with_name("py-spy")
    procs = []
    profile_dir.mkdir(parents=True, exist_ok=True)
    for role, pids in roles.items():
        if role == "haproxy":  # not a Python process
            continue
        for i, pid in enumerate(pids):
            out = profile_dir / f"{role}{i}.txt"
            cmd = [str(py_spy), "record", "--pid", str(pid), "--format", "raw", "--threads", "--rate", "50"]
            procs.append(subprocess.Popen([*cmd, "--output", str(out)], stdout=subprocess.DEVNULL))
    return procs


def stop_profilers(procs: list[subprocess.Popen]) -> None:
    import signal

    for proc in procs:
        proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
    for proc in procs:
        proc.wait(timeout=60)


def served_run(args: argparse.Namespace, specs: list[RequestSpec], num_replicas: int, engine_process: str) -> dict:
    from ray import serve

    base = deploy(app_args(args, num_replicas, engine_process), args.http_port, APP_NAME)
    asyncio.run(run_load(base, args.model, specs[: 2 * num_replicas], float("inf"), args.seed, None))  # warm-up
    roles = serving_processes(APP_NAME)
    profile_dir = Path(args.profile_dir or ".") / f"r{num_replicas}-{engine_process}"
    profilers = start_profilers(roles, profile_dir) if args.profile_dir else []
    cpu_before = {role: cpu_seconds(pids) for role, pids in roles.items()}
    served_specs = specs * num_replicas
    results, duration = asyncio.run(run_load(base, args.model, served_specs, float("inf"), args.seed, None))
    cpu_after = {role: cpu_seconds(pids) for role, pids in roles.items()}
    stop_profilers(profilers)
    summary = summarize(results, duration)
    tokens = max(1, summary["output_tokens"])
    summary["cpu_s_per_output_token"] = {role: (cpu_after[role] - cpu_before[role]) / tokens for role in roles}
    summary["cpu_s"] = {role: cpu_after[role] - cpu_before[role] for role in roles}
    summary["num_processes"] = {role: len(pids) for role, pids in roles.items()}
    serve.delete(APP_NAME)
    serve.shutdown()
    time.sleep(2.0)
    return summary


# ---- report -----------------------------------------------------------------------------------------


def compare(offline: dict, served: dict, num_replicas: int) -> dict:
    per_replica = served["output_throughput_tok_s"] / num_replicas
    decode_ms = offline["median_decode_step_ms"] or offline["median_step_ms"]
    return {
        "served_over_offline": per_replica / offline["output_throughput_tok_s"],
        "served_output_tok_s_per_replica": per_replica,
        "p50_tpot_over_offline_decode_step": (served["p50_tpot_ms"] or 0.0) / decode_ms,
        "p50_tpot_over_offline_p50_tpot": (served["p50_tpot_ms"] or 0.0) / offline["p50_tpot_ms"],
    }


def print_report(offline: dict, runs: dict) -> None:
    print(f"{'=' * 20} offline engine (one device) {'=' * 20}")
    print(
        f"output tok/s {offline['output_throughput_tok_s']:.1f}; median step {offline['median_step_ms']:.1f} ms, "
        f"median decode-only step {offline['median_decode_step_ms'] or float('nan'):.1f} ms "
        f"({offline['num_decode_only_steps']} of {offline['num_steps']}); "
        f"TPOT p50 {offline['p50_tpot_ms']:.1f} / p99 {offline['p99_tpot_ms']:.1f} ms"
    )
    for name, run in runs.items():
        served, c = run["served"], run["comparison"]
        print_summary(f"served, {name}", served)
        print(
            f"served/offline {c['served_over_offline']:.2f} "
            f"({c['served_output_tok_s_per_replica']:.1f} vs {offline['output_throughput_tok_s']:.1f} tok/s per device); "
            f"p50 TPOT {served['p50_tpot_ms']:.1f} ms = {c['p50_tpot_over_offline_decode_step']:.2f}x the offline "
            f"decode step, {c['p50_tpot_over_offline_p50_tpot']:.2f}x the offline p50 TPOT"
        )
        per_token = ", ".join(f"{role} {s * 1e3:.2f} ms" for role, s in served["cpu_s_per_output_token"].items())
        print(f"CPU per output token: {per_token}")


def summarize_profiles(profile_dir: Path, top: int = 25) -> None:
    """Self and inclusive sample shares of the top functions in each collapsed-stack file under ``profile_dir``."""
    for path in sorted(profile_dir.rglob("*.txt")):
        inclusive: collections.Counter = collections.Counter()
        own: collections.Counter = collections.Counter()
        threads: collections.Counter = collections.Counter()
        total = 0
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack:
                continue
            n = int(count)
            frames = stack.split(";")
            total += n
            threads[frames[0]] += n
            for frame in set(frames[1:]):
                inclusive[frame] += n
            own[frames[-1]] += n
        print(f"## {path.relative_to(profile_dir)}: {total} samples")
        for thread, n in threads.most_common(6):
            print(f"  thread {n / total:6.1%}  {thread[:100]}")
        for frame, n in own.most_common(top // 2):
            print(f"  self   {n / total:6.1%}  {frame[:140]}")
        for frame, n in inclusive.most_common(top):
            print(f"  incl   {n / total:6.1%}  {frame[:140]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--engine-kwargs", default=None, help=f"JSON EngineConfig fields; CPU default {CPU_ENGINE_KWARGS}")
    p.add_argument(
        "--engine-process",
        default="default",
        help="comma-separated, one served run each: on, off, default (the config's default for the device)",
    )
    p.add_argument("--num-replicas", default="1", help="comma-separated replica counts, one served run each")
    p.add_argument("--max-ongoing-requests", type=int, default=256, help="per engine replica")
    p.add_argument("--ingress-replicas", type=int, default=1, help="ingress replicas (each one Python process)")
    p.add_argument("--num-prompts", type=int, default=48, help="offline requests; served: this x replicas")
    add_skewed_args(p)
    p.add_argument("--http-port", type=int, default=8012)
    p.add_argument("--profile-dir", default=None, help="record py-spy profiles of the served processes here")
    p.add_argument("--summarize", default=None, metavar="DIR", help="only print the profiles under DIR")
    p.add_argument("--skip-offline", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.summarize:
        summarize_profiles(Path(args.summarize))
        return

    import ray

    start_local_ray(None, os.cpu_count())
    specs = make_workload("skewed", args.num_prompts, args.seed, **skewed_lengths(args))
    engine_config = {"model": args.model, "device": args.device, **app_args(args, 1)["engine_kwargs"]}
    offline = None
    if not args.skip_offline:
        task = ray.remote(num_gpus=1 if args.device == "cuda" else 0, num_cpus=0, max_calls=1)(offline_run)
        offline = ray.get(task.remote(engine_config, specs))
    record = {
        "benchmark": "bench_served_vs_offline",
        "commit": current_commit(),
        "workload": {
            "kind": "skewed",
            "num_prompts_offline": args.num_prompts,
            "long_fraction": args.long_fraction,
            "long": [args.long_input_len, args.long_output_len],
            "short": [args.short_input_len, args.short_output_len],
            "seed": args.seed,
            "arrivals": "all at once",
            "ignore_eos": True,
            "temperature": 0,
        },
        "machine": _machine(args.device),
        # Serve's mode switches (e.g. RAY_SERVE_ENABLE_HA_PROXY, RAY_SERVE_THROUGHPUT_OPTIMIZED), read at Ray's start
        "serve_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("RAY_SERVE_")},
        "offline": offline,
        "served": {},
    }
    for num_replicas in (int(r) for r in args.num_replicas.split(",")):
        for engine_process in args.engine_process.split(","):
            served = served_run(args, specs, num_replicas, engine_process)
            record["served"][f"{num_replicas} replica(s), engine_process {engine_process}"] = {
                "app_args": app_args(args, num_replicas, engine_process),
                "served": served,
                "comparison": compare(offline, served, num_replicas) if offline else None,
            }
            if args.out:  # after each run: a run cut short by a time limit keeps what it measured
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps(record, indent=2, default=str) + "\n")
    ray.shutdown()
    if offline:
        print_report(offline, record["served"])
    if args.out:
        print(f"wrote {args.out}")


def _machine(device: str) -> dict:
    import torch

    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0]}
    machine["torch"] = torch.__version__
    if device == "cuda":  # nvidia-smi, not torch.cuda: a CUDA context here would take memory from the engines
        query = ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"]
        machine["gpus"] = subprocess.run(query, capture_output=True, text=True).stdout.strip().splitlines()
    return machine


if __name__ == "__main__":
    main()
