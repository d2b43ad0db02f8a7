"""A real local Ray cluster running the Serve app, for the deployment tests (one per test module).

``served_app(args)`` starts ``ray.init`` + ``serve.run(build_app(args))`` on free ports and yields a
``ServedApp`` once ``/health`` answers; it tears everything down afterwards. Helpers read every engine
replica's stats through the engine deployment's handle.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import httpx  # noqa: E402
import ray  # noqa: E402
from ray import serve  # noqa: E402

from deployments.app import ENGINE_DEPLOYMENT_NAME, build_app  # noqa: E402
from deployments.serve_mode import sync_handle  # noqa: E402
from engine.distributed import free_port  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
APP_NAME = "llm"
MODEL = "smollm2"


@dataclass
class ServedApp:
    base_url: str
    num_engine_replicas: int
    headers: dict[str, str]

    def engine_handle(self):
        return sync_handle(ENGINE_DEPLOYMENT_NAME, APP_NAME)

    def engine_stats_by_replica(self, timeout_s: float = 30.0) -> dict[str, dict]:
        """Stats of every engine replica (handle calls land on random replicas: poll until all seen)."""
        handle = self.engine_handle()
        seen: dict[str, dict] = {}
        deadline = time.time() + timeout_s
        while len(seen) < self.num_engine_replicas and time.time() < deadline:
            stats = handle.engine_stats.remote().result(timeout_s=timeout_s)
            seen[stats["replica"]] = stats
        return seen

    def wait_engines_idle(self, timeout_s: float = 30.0) -> dict[str, dict]:
        """Stats once no replica runs, queues or holds a request (or the last stats at the timeout)."""
        deadline = time.time() + timeout_s
        while True:
            stats = self.engine_stats_by_replica()
            idle = len(stats) == self.num_engine_replicas and all(
                s["num_running"] == 0 and s["num_waiting"] == 0 and s["num_inflight"] == 0 for s in stats.values()
            )
            if idle or time.time() > deadline:
                return stats
            time.sleep(0.3)


@contextlib.contextmanager
def served_app(
    app_args: dict[str, Any], *, headers: dict[str, str] | None = None, env_vars: dict[str, str] | None = None
) -> Iterator[ServedApp]:
    """Start a fresh local cluster with the app of ``app_args``; ``headers`` go with the health probe."""
    metrics_port = free_port("127.0.0.1")
    http_port = free_port("127.0.0.1")
    ray.init(
        address="local",  # a fresh cluster even if `make serve` runs one
        num_cpus=2,
        include_dashboard=False,
        _metrics_export_port=metrics_port,
        _system_config={"metrics_report_interval_ms": 1000},
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT), "RAY_AUTH_MODE": "disabled", **(env_vars or {})}},
        logging_level="WARNING",
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        serve.run(build_app(app_args), name=APP_NAME, route_prefix="/")
        base = f"http://127.0.0.1:{http_port}"
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=15).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError("app did not become healthy")
            time.sleep(0.5)
        num_replicas = app_args.get("engine", {}).get("num_replicas", 2)
        yield ServedApp(base, num_replicas, dict(headers or {}))
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
