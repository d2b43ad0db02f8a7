"""Helpers shared by the benchmarks: where results go, what machine produced them, and a greedy-output check."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine_info(device: str) -> dict:
    """Card (or CPU), software versions and the commit, recorded with every result."""
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    info["commit"] = current_commit()
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(torch.device(device))
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info


def current_commit() -> str:
    """The commit of the tree being measured. The device machine's copy of the tree may carry no (or a stale)
    .git: the caller passes the commit there in VATTN_COMMIT, which wins."""
    commit = os.environ.get("VATTN_COMMIT", "")
    if not commit:
        try:
            commit = subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
            ).stdout.strip()
        except OSError:
            pass
    return commit or "unknown"


def write_result(name: str, payload: dict) -> Path:
    """Writes ``results/<name>.json`` (and a copy under $OUT when run on the device machine)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    text = json.dumps(payload, indent=2)
    path.write_text(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], f"{name}.json").write_text(text)
    return path


def measure_copy_bandwidth(device: str, size_bytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    src = torch.empty(size_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1e3 / 10
    else:
        import time

        t = time.perf_counter()
        for _ in range(3):
            dst.copy_(src)
        seconds = (time.perf_counter() - t) / 3
    return 2 * size_bytes / seconds / 1e9
