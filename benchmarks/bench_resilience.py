"""Replicas coming and going under load, over HTTP on the app's own data path: what a client sees.

Four scenarios, each on a freshly deployed app, under a closed loop of streaming completions:
  * ``autoscale``: ``num_replicas: auto`` from one replica; load that needs more than one; then a trickle. Reports the
    time from the load's start to a second replica running and to its first answer, the time back down to one
    replica once the load drops, and every failed request in each phase (the target: none).
  * ``kill_replica``: ``--num-replicas`` fixed; one engine replica's actor is killed while it streams. Reports how
    its streams ended (in-band OpenAI error events, never a hung connection), whether any request sent after the
    kill reached it or failed, and the time until Serve runs the full count again.
  * ``kill_tp_worker``: a tensor-parallel replica loses its rank-1 worker process. The replica's streams must end
    with an in-band error, its health check fail, and Serve replace it; requests meanwhile are answered
    (by other replicas) or refused with 503, never left hanging.
  * ``stall_engine``: one replica's engine core process is stopped (SIGSTOP), as a hung kernel stops it: it raises
    nothing and closes nothing. The engine's watchdog (``step_timeout_s`` in ``--engine-kwargs``) must fail its
    streams in-band, kill the core and fail the health check, and Serve replace the replica; requests meanwhile are
    answered or refused, never left hanging.

  python benchmarks/bench_resilience.py --device cpu --scenarios autoscale,kill_replica \\
      --out benchmarks/results/resilience_cpu.json
  python benchmarks/bench_resilience.py --device cuda --model dummy:llama-3-8b --num-replicas 2 \\
      --tensor-parallel-size 2 --input-len 512 --output-len 256 --concurrency 48 --out .../resilience_h200x2.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.bench_serving import RequestResult, RequestSpec, deploy, send_one, start_local_ray  # noqa: E402
from benchmarks.common import current_commit, machine_info  # noqa: E402
from engine.distributed import free_port  # noqa: E402

APP_NAME = "resilience"


@dataclass
class Sent:
    """One request of the closed loop: when it was sent and ended (seconds from the scenario's start)."""

    sent_s: float
    ended_s: float
    result: RequestResult

    @property
    def outcome(self) -> str:
        """ok; rejected (a clean 503/429 before any token); in_band_error (a stream ended by an error event);
        other (a connection or server failure: what must never happen)."""
        r = self.result
        if r.ok:
            return "ok"
        if r.in_band_error:
            return "in_band_error"
        if r.status in (503, 429):
            return "rejected"
        return "other"


class ClosedLoop:
    """``concurrency`` clients, each sending its next streaming completion as soon as the last ended; ``active``
    of them send at any moment (the rest wait), so a scenario can lower the load without ending it."""

    def __init__(self, base_url: str, model: str, args: argparse.Namespace, t0: float) -> None:
        self.base_url, self.model, self.args, self.t0 = base_url, model, args, t0
        self.active = args.concurrency
        self.records: list[Sent] = []
        self.in_flight: dict[int, str] = {}  # client -> replica streaming its current request ("" before headers)
        self._stop = asyncio.Event()
        self._rng = random.Random(args.seed)

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def _spec(self) -> RequestSpec:
        ids = [self._rng.randint(1000, 30000) for _ in range(self.args.input_len)]
        return RequestSpec(ids, self.args.output_len, "closed_loop")

    async def _client(self, k: int, http: httpx.AsyncClient) -> None:
        while not self._stop.is_set():
            if k >= self.active:
                await asyncio.sleep(0.05)
                continue
            sent = self.now()
            self.in_flight[k] = ""
            result = await send_one(http, self.base_url, self.model, self._spec(), on_headers=self._seen(k))
            self.in_flight.pop(k, None)
            self.records.append(Sent(sent, self.now(), result))
            if not result.ok:
                await asyncio.sleep(0.2)  # a refused client backs off, as the OpenAI client does

    def _seen(self, k: int):
        def note(replica: str) -> None:
            self.in_flight[k] = replica

        return note

    async def run(self) -> None:
        limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
        async with httpx.AsyncClient(timeout=httpx.Timeout(self.args.request_timeout_s), limits=limits) as http:
            await asyncio.gather(*(self._client(k, http) for k in range(self.args.concurrency)))

    def stop(self) -> None:
        self._stop.set()


def engine_replicas() -> tuple[str, int]:
    """The engine deployment's status and its RUNNING replica count."""
    from ray import serve

    from deployments.app import ENGINE_DEPLOYMENT_NAME

    status = serve.status().applications[APP_NAME].deployments[ENGINE_DEPLOYMENT_NAME]
    return getattr(status.status, "value", str(status.status)), int(status.replica_states.get("RUNNING", 0))


async def wait_replicas(
    want: int,
    timeout_s: float,
    timeline: list,
    clock,
    replaced: tuple[str, set[str]] | None = None,
    at_least: bool = False,
) -> float | None:
    """Poll Serve until ``want`` (``at_least``: or more) engine replicas run and the deployment is healthy; the time
    it happened (by ``clock``), or None at the timeout. With ``replaced`` (a replica and the replicas there were before it was
    killed): also until it is gone and a new replica is among them (Serve's status counts a dead replica as running
    until its health check fails). Each change goes into ``timeline``."""
    from deployments.app import replica_actor_names

    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        status, running = await asyncio.to_thread(engine_replicas)
        done = (running >= want if at_least else running == want) and status == "HEALTHY"
        state = [running, status]
        if replaced is not None:
            victim, before = replaced
            names = set(await asyncio.to_thread(replica_actor_names))
            state += [victim in names, len(names - before)]
            done = done and victim not in names and bool(names - before)
        if not timeline or timeline[-1][1:] != state:
            timeline.append([round(clock(), 2), *state])
        if done:
            return clock()
        await asyncio.sleep(0.25)
    return None


async def first_token_from_a_new_replica(loop: ClosedLoop, before: set[str], timeout_s: float) -> float | None:
    """When a replica not in ``before`` first streamed to the closed loop (its response headers come with the
    first token), by the loop's clock; None at the timeout."""
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        if any(replica and replica not in before for replica in loop.in_flight.values()) or any(
            s.result.replica and s.result.replica not in before for s in loop.records
        ):
            return loop.now()
        await asyncio.sleep(0.1)
    return None


def outcomes(records: list[Sent]) -> dict:
    counts: dict[str, int] = {}
    for s in records:
        counts[s.outcome] = counts.get(s.outcome, 0) + 1
    by_replica: dict[str, int] = {}
    for s in records:
        by_replica[s.result.replica or "-"] = by_replica.get(s.result.replica or "-", 0) + 1
    errors = sorted({f"{s.result.status}: {s.result.error[:120]}" for s in records if not s.result.ok})
    return {"requests": len(records), "outcomes": counts, "by_replica": by_replica, "error_samples": errors[:4]}


def replica_actor_name(replica: str) -> str:
    """The Serve actor name of the engine replica whose tag is ``replica``."""
    from deployments.app import replica_actor_names

    names = replica_actor_names()
    if replica not in names:
        raise RuntimeError(f"no live engine replica {replica!r} among {sorted(names)}")
    return names[replica]


def kill_actor(name: str, namespace: str = "serve") -> None:
    import ray

    ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)


def kill_tp_worker(replica: str) -> str:
    """Kill ``replica``'s rank-1 tensor-parallel worker, a named Ray actor (``<tag>-tp-rank1``, see tp_workers)."""
    import ray

    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"] == f"{replica}-tp-rank1":
            kill_actor(actor["name"], actor["namespace"])
            return actor["name"]
    raise RuntimeError(f"replica {replica!r} has no tensor-parallel worker actor")


def stall_engine_core(replica: str) -> str:
    """Stop ``replica``'s engine core process (SIGSTOP; this machine's: the benchmark's Ray cluster is local). Its pid
    comes from the replica's ``engine_stats``, asked through a handle until the victim answers."""
    import signal

    from deployments.app import ENGINE_DEPLOYMENT_NAME
    from deployments.serve_mode import sync_handle

    handle = sync_handle(ENGINE_DEPLOYMENT_NAME, APP_NAME)
    for _ in range(100):
        stats = handle.engine_stats.remote().result(timeout_s=30)
        if stats["replica"] == replica:
            if stats["core_pid"] == stats["pid"]:
                raise RuntimeError(f"replica {replica!r} steps its engine in a thread (engine_process: false?)")
            os.kill(stats["core_pid"], signal.SIGSTOP)
            return f"{replica_actor_name(replica)}: engine core pid {stats['core_pid']}"
    raise RuntimeError(f"replica {replica!r} did not answer engine_stats")


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, ended and not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# ---- scenarios ----------------------------------------------------------------------------------------------


async def scenario_autoscale(args: argparse.Namespace, base_url: str) -> dict:
    t0 = time.perf_counter()
    loop = ClosedLoop(base_url, args.served_model_name, args, t0)
    timeline: list = []
    runner = asyncio.create_task(loop.run())
    second_running_s = await wait_replicas(2, args.scale_timeout_s, timeline, loop.now, at_least=True)
    max_running_s = await wait_replicas(args.max_replicas, args.scale_timeout_s, timeline, loop.now, at_least=True)
    await asyncio.sleep(args.hold_s)
    drop_s = loop.now()
    loop.active = 1
    down_s = await wait_replicas(1, args.scale_timeout_s, timeline, loop.now)
    await asyncio.sleep(2.0)
    loop.stop()
    await runner
    up = [s for s in loop.records if s.sent_s < drop_s]
    down = [s for s in loop.records if s.sent_s >= drop_s]
    served = sorted((s for s in up if s.result.ttft_s is not None), key=lambda s: s.sent_s)
    first = served[0].result.replica if served else None
    # When a replica other than the one serving from the start sent its first token.
    second_first_token_s = min((s.sent_s + s.result.ttft_s for s in served if s.result.replica != first), default=None)
    return {
        "second_replica_running_s": second_running_s,
        "second_replica_first_token_s": second_first_token_s,
        "max_replicas_running_s": max_running_s,
        "load_dropped_at_s": drop_s,
        "back_to_one_replica_s": None if down_s is None else down_s - drop_s,
        "under_load": outcomes(up),
        "after_the_load": outcomes(down),
        "replicas_timeline": timeline,
    }


async def _kill_under_load(args: argparse.Namespace, base_url: str, kill, num_replicas: int) -> dict:
    """Closed loop; after ``warmup_s`` the replica streaming the most requests loses a process (``kill(replica)``);
    load goes on until Serve runs ``num_replicas`` again and ``after_s`` more."""
    t0 = time.perf_counter()
    loop = ClosedLoop(base_url, args.served_model_name, args, t0)
    timeline: list = []
    runner = asyncio.create_task(loop.run())
    await asyncio.sleep(args.warmup_s)
    busy: dict[str, int] = {}
    for replica in loop.in_flight.values():
        if replica:
            busy[replica] = busy.get(replica, 0) + 1
    if not busy:
        loop.stop()
        await runner
        raise RuntimeError(f"no stream in flight after {args.warmup_s} s: {outcomes(loop.records)}")
    victim = max(busy, key=busy.get)
    from deployments.app import replica_actor_names

    before = set(await asyncio.to_thread(replica_actor_names))
    kill_s = loop.now()  # before the kill: a stream that fails while it happens counts as failed by it
    killed_what = await asyncio.to_thread(kill, victim)
    # Recovered once a replica that was not there before the kill streams a first token: Serve's own status counts
    # the dead replica as running until its health check fails, and names the replacement while it still starts.
    recovered_s, serve_s = await asyncio.gather(
        first_token_from_a_new_replica(loop, before, args.recover_timeout_s),
        wait_replicas(num_replicas, args.recover_timeout_s, timeline, loop.now, replaced=(victim, before)),
    )
    await asyncio.sleep(args.after_s)
    loop.stop()
    await runner
    on_victim = [s for s in loop.records if s.sent_s < kill_s < s.ended_s and s.result.replica == victim]
    others_in_flight = [s for s in loop.records if s.sent_s < kill_s < s.ended_s and s.result.replica != victim]
    after = [s for s in loop.records if s.sent_s >= kill_s]
    replacement = [s.ended_s for s in after if s.result.ok and s.result.replica not in before]
    return {
        "killed": killed_what,
        "victim_streams_at_kill": busy[victim],
        "streams_by_replica_at_kill": busy,
        "ended_before_kill": outcomes([s for s in loop.records if s.ended_s <= kill_s]),
        "killed_at_s": kill_s,
        "on_victim_in_flight": outcomes(on_victim),
        "longest_victim_stream_end_after_kill_s": max((s.ended_s - kill_s for s in on_victim), default=None),
        "others_in_flight": outcomes(others_in_flight),
        "sent_after_kill": outcomes(after),
        "sent_after_kill_routed_to_victim": sum(1 for s in after if s.result.replica == victim),
        "recovered_s": None if recovered_s is None else recovered_s - kill_s,
        "serve_status_recovered_s": None if serve_s is None else serve_s - kill_s,
        "replacement_first_answer_s": None if not replacement else min(replacement) - kill_s,
        "replicas_timeline": timeline,
    }


async def scenario_kill_replica(args: argparse.Namespace, base_url: str) -> dict:
    def kill(victim: str) -> str:
        name = replica_actor_name(victim)
        kill_actor(name)
        return name

    return await _kill_under_load(args, base_url, kill, args.num_replicas)


async def scenario_kill_tp_worker(args: argparse.Namespace, base_url: str) -> dict:
    return await _kill_under_load(args, base_url, kill_tp_worker, args.num_replicas_tp)


async def scenario_stall_engine(args: argparse.Namespace, base_url: str) -> dict:
    result = await _kill_under_load(args, base_url, stall_engine_core, args.num_replicas)
    pid = int(result["killed"].rsplit(" ", 1)[1])
    result["stalled_core_ended"] = not _pid_alive(pid)  # killed by the watchdog: its device memory is free
    if not result["stalled_core_ended"]:
        import signal

        os.kill(pid, signal.SIGKILL)
    return result


SCENARIOS = {
    "autoscale": scenario_autoscale,
    "kill_replica": scenario_kill_replica,
    "kill_tp_worker": scenario_kill_tp_worker,
    "stall_engine": scenario_stall_engine,
}


def app_args_for(args: argparse.Namespace, scenario: str) -> dict:
    on_gpu = args.device == "cuda"
    tp = args.tensor_parallel_size if scenario == "kill_tp_worker" else 1
    engine: dict = {
        "num_cpus": 1 if on_gpu else 0,
        "num_gpus": 1 if on_gpu and tp == 1 else 0,
        "max_ongoing_requests": args.max_ongoing_requests,
        "max_queued_requests": 4 * args.concurrency,
        "health_check_period_s": args.health_check_period_s,
        "router": args.router,
    }
    if scenario == "autoscale":
        engine["num_replicas"] = "auto"
        engine["autoscaling_config"] = {
            "min_replicas": 1,
            "initial_replicas": 1,
            "max_replicas": args.max_replicas,
            "target_ongoing_requests": args.target_ongoing_requests,
            "upscale_delay_s": args.upscale_delay_s,
            "downscale_delay_s": args.downscale_delay_s,
            "metrics_interval_s": 0.5,
            "look_back_period_s": 2.0,
        }
    else:
        engine["num_replicas"] = args.num_replicas_tp if scenario == "kill_tp_worker" else args.num_replicas
    return {
        "model": args.model,
        "served_model_name": args.served_model_name,
        "device": args.device,
        "tensor_parallel_size": tp,
        "engine_kwargs": json.loads(args.engine_kwargs),
        "engine": engine,
        "ingress": {"num_replicas": args.ingress_replicas, "num_cpus": 0, "max_queued_requests": 8 * args.concurrency},
    }


def run_scenario(args: argparse.Namespace, scenario: str) -> dict:
    import ray
    from ray import serve

    start_local_ray(None, num_cpus=args.num_cpus)
    try:
        app_args = app_args_for(args, scenario)
        started = time.perf_counter()
        base_url = deploy(app_args, free_port("127.0.0.1"), name=APP_NAME)
        deploy_s = time.perf_counter() - started
        wanted = args.num_replicas_tp if scenario == "kill_tp_worker" else args.num_replicas
        if (
            scenario != "autoscale"
            and asyncio.run(wait_replicas(wanted, args.recover_timeout_s, [], time.perf_counter)) is None
        ):
            raise RuntimeError(f"{wanted} engine replicas did not come up within {args.recover_timeout_s} s")
        result = asyncio.run(SCENARIOS[scenario](args, base_url))
        return {"app_args": app_args, "deploy_s": round(deploy_s, 1), **result}
    finally:
        serve.shutdown()
        ray.shutdown()


def verdicts(scenario: str, r: dict) -> dict[str, bool]:
    """What the run must show (printed as PASS/FAIL beside the figures)."""
    if scenario == "autoscale":
        return {
            "a second replica served under load": r["second_replica_first_token_s"] is not None,
            "back to one replica after the load": r["back_to_one_replica_s"] is not None,
            "no request failed under load": set(r["under_load"]["outcomes"]) <= {"ok"},
            "no request failed after the load": set(r["after_the_load"]["outcomes"]) <= {"ok"},
        }
    others = set(r["others_in_flight"]["outcomes"]) <= {"ok"}
    # Without another replica to take them, requests sent while a replica fails are refused (503) until it is back.
    refusable = scenario in ("kill_tp_worker", "stall_engine")
    after_ok = set(r["sent_after_kill"]["outcomes"]) <= ({"ok", "rejected"} if refusable else {"ok"})
    checks = {
        "the victim's streams ended in-band": r["on_victim_in_flight"]["requests"] > 0
        and set(r["on_victim_in_flight"]["outcomes"]) <= {"in_band_error", "ok"},
        "no other replica's stream failed": others,
        "requests after the kill answered" + (" or refused" if refusable else ""): after_ok,
        "a new replica took the victim's place": r["recovered_s"] is not None,
    }
    if scenario == "stall_engine":
        checks["the stalled core process was killed"] = r["stalled_core_ended"]
    return checks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", default="autoscale,kill_replica")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--served-model-name", default="model")
    p.add_argument("--engine-kwargs", default='{"max_batch_size": 16}', help="JSON")
    p.add_argument("--router", default="page_aware", choices=["page_aware", "power_of_two"])
    p.add_argument("--num-replicas", type=int, default=2, help="engine replicas of kill_replica")
    p.add_argument("--tensor-parallel-size", type=int, default=2, help="of kill_tp_worker's replicas")
    p.add_argument("--num-replicas-tp", type=int, default=1, help="tensor-parallel replicas of kill_tp_worker")
    p.add_argument("--max-replicas", type=int, default=2, help="autoscale's max_replicas")
    p.add_argument("--target-ongoing-requests", type=int, default=4)
    p.add_argument("--upscale-delay-s", type=float, default=2.0)
    p.add_argument("--downscale-delay-s", type=float, default=10.0)
    p.add_argument("--max-ongoing-requests", type=int, default=16)
    p.add_argument("--ingress-replicas", type=int, default=1)
    p.add_argument("--health-check-period-s", type=float, default=2.0)
    p.add_argument("--concurrency", type=int, default=12, help="clients of the closed loop")
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=48)
    p.add_argument("--warmup-s", type=float, default=8.0, help="load before a kill")
    p.add_argument("--after-s", type=float, default=5.0, help="load after the replica count is back")
    p.add_argument("--hold-s", type=float, default=10.0, help="load once max_replicas run, before it drops")
    p.add_argument("--scale-timeout-s", type=float, default=240.0)
    p.add_argument("--recover-timeout-s", type=float, default=240.0)
    p.add_argument("--request-timeout-s", type=float, default=300.0)
    p.add_argument("--num-cpus", type=int, default=None, help="Ray's CPUs (default: this machine's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.num_cpus is None:
        args.num_cpus = os.cpu_count() or 2
    record: dict = {
        "commit": current_commit(),
        "machine": machine_info(args.device),
        "settings": vars(args),
        "runs": {},
    }
    for scenario in args.scenarios.split(","):
        try:
            run = run_scenario(args, scenario)
            run["verdicts"] = verdicts(scenario, run)
        except Exception as exc:  # noqa: BLE001 - a scenario that could not run is reported, the others still run
            run = {"error": repr(exc), "traceback": traceback.format_exc()}
        record["runs"][scenario] = run
        print(f"\n== {scenario}")
        print(json.dumps({k: v for k, v in run.items() if k not in ("app_args", "verdicts")}, indent=1, default=str))
        for what, ok in run.get("verdicts", {}).items():
            print(f"  {'PASS' if ok else 'FAIL'}  {what}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=1, default=str) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
