import os

import pytest
import torch

from deployments.serve_mode import use_serve_env

# The Serve tests deploy the app on the data path it is deployed on (deployments.serve_mode), set before any test
# module imports ray.serve.
use_serve_env(own_cluster=True)
# Direct ingress holds each ingress replica at shutdown for 30 s so that external load balancers deregister it; the
# tests' clusters have none, and each teardown would wait that long.
os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "0")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
