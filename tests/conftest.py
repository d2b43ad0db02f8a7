import pytest
import torch

from deployments.serve_mode import use_serve_env

# The Serve tests deploy the app on the data path it is deployed on (deployments.serve_mode), set before any test
# module imports ray.serve.
use_serve_env()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
