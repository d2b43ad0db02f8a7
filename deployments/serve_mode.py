"""The Ray Serve data path the app is deployed on: Serve's HAProxy ingress and its throughput-optimized mode.

``RAY_SERVE_ENABLE_HA_PROXY=1`` puts HAProxy (C) in front of the ingress replicas instead of Serve's Python HTTP proxy,
which then serve HTTP themselves (direct ingress); ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` moves calls between
deployments onto gRPC and runs each replica's user code and routers on its main event loop. On 4 x H200 with one
Llama-3-8B replica at saturation they took the served path from 0.82x to 0.98x the offline engine in the same run,
the ingress's CPU per output token from 0.99 to 0.23 ms (``benchmarks/results/served_vs_offline_h200*.json``).

Serve reads these switches from the environment when ``ray.serve`` is first imported, in every Ray process: they
belong in the environment of ``ray start`` on every node (``cluster.yaml``, the Makefile's ``serve``), or of a
process that starts its own cluster with ``ray.init`` (the tests, the benchmarks), set before it imports
``ray.serve``. ``RAY_SERVE_ENABLE_HA_PROXY=0 RAY_SERVE_THROUGHPUT_OPTIMIZED=0`` there gives Serve's default path.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

from engine.distributed import free_port

SERVE_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}


def use_serve_env(own_cluster: bool = False) -> None:
    """Put ``SERVE_ENV`` in this process's environment where it is unset, before ``ray.serve`` is imported.

    ``own_cluster``: this process starts a local cluster of its own (the tests, a benchmark), which may run beside
    another one on the machine (``make serve``, a second run). HAProxy's files and ports are the same for every
    cluster of a machine unless set, and a second HAProxy would take over the first one's admin socket: they go under
    a directory of this process's and on free ports instead."""
    for name, value in SERVE_ENV.items():
        os.environ.setdefault(name, value)
    if not own_cluster:
        return
    base = tempfile.mkdtemp(prefix="vattn-haproxy-")
    atexit.register(shutil.rmtree, base, ignore_errors=True)
    private = {
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": f"{base}/haproxy.cfg",
        "RAY_SERVE_HAPROXY_SOCKET_PATH": f"{base}/admin.sock",
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": f"{base}/metrics.sock",
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": base,
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": f"{base}/server-state",
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port("")),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port("")),
    }
    for name, value in private.items():
        os.environ.setdefault(name, value)


def sync_handle(deployment_name: str, app_name: str):
    """A handle to ``deployment_name`` to call from synchronous code (a test, a benchmark's driver): its router runs
    in an event loop of its own, which the throughput-optimized mode leaves to the caller's loop by default."""
    from ray import serve

    handle = serve.get_deployment_handle(deployment_name, app_name=app_name)  # one per deployment and process
    if not handle.is_initialized:
        handle._init(_run_router_in_separate_loop=True)
    elif not handle.init_options._run_router_in_separate_loop:
        raise RuntimeError(
            f"the handle to {deployment_name} was first used inside an event loop, whose router it keeps: "
            "call it from that loop"
        )
    return handle
