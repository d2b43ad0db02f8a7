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

import os

SERVE_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}


def use_serve_env() -> None:
    """Put ``SERVE_ENV`` in this process's environment where it is unset, before ``ray.serve`` is imported."""
    for name, value in SERVE_ENV.items():
        os.environ.setdefault(name, value)


def sync_handle(deployment_name: str, app_name: str):
    """A handle to ``deployment_name`` to call from synchronous code (a test, a benchmark's driver): its router runs
    in an event loop of its own, which the throughput-optimized mode leaves to the caller's loop by default."""
    from ray import serve

    handle = serve.get_deployment_handle(deployment_name, app_name=app_name)
    if not handle.is_initialized:  # Serve hands out one handle per deployment and process
        handle._init(_run_router_in_separate_loop=True)
    return handle
