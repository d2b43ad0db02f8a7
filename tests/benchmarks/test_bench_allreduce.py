import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_allreduce_benchmark_runs_a_group_of_two_on_cpu(tmp_path):
    name = tmp_path / "allreduce"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_allreduce.py"), "--device", "cpu", "--world-sizes", "2"]
        + ["--rows", "1,8", "--iters", "5", "--name", str(name)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    run = json.loads(Path(f"{name}.json").read_text())["runs"]["2"]
    assert [row["rows"] for row in run["results"]] == [1, 8]
    assert all(row["us"]["group_eager"] > 0 and row["bytes"] == row["rows"] * 4096 * 4 for row in run["results"])
