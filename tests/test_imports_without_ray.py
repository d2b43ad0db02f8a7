"""The engine, the KV cache and the test harness import without Ray: the GPU suite runs on machines that have
torch but not Ray, and only ``deployments/``'s Serve modules may need it."""

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

BLOCK_RAY = """
import importlib.abc, sys

class NoRay(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
        return None

sys.meta_path.insert(0, NoRay())
"""


def test_engine_kvcache_and_the_test_harness_import_without_ray():
    code = (
        BLOCK_RAY
        + "import kvcache, engine.llm_engine, engine.distributed, benchmarks.paged_kv\n"
        + ("import deployments.serve_mode\nimport tests.conftest\nprint('imported')\n")
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "imported" in done.stdout, done.stderr[-3000:]
    # The blocker itself works: a module that needs Ray fails under it.
    needs_ray = subprocess.run(
        [sys.executable, "-c", BLOCK_RAY + "import deployments.tp_workers"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert needs_ray.returncode != 0 and "blocked by the test" in needs_ray.stderr
