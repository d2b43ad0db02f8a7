"""All-reduce latency at the tensor-parallel step's message sizes: NCCL against one-shot and two-shot all-reduces
over peer memory (``torch.distributed._symmetric_memory``), each replayed from a CUDA graph as the decode step does.

A TP=4 decode step of Llama-3-8B at batch 64 runs 65 all-reduces of 64 x 4,096 bf16 (512 KiB); NCCL's ring (LL
protocol, NVLink SHARP off as the device machines require) took ~14 us each on 4 x H200, a quarter of the step
(``results/tp_h200x4_profile.json``). This measures what another all-reduce would take there, before the engine
uses one.

    python benchmarks/bench_allreduce.py --world-sizes 2,4              # GPUs; writes results/allreduce_<gpu>.json
    python benchmarks/bench_allreduce.py --device cpu --world-sizes 2   # gloo: a smoke test of the script

Per world size and message (rows x hidden, bf16): microseconds per all-reduce for the process group's (NCCL) called
eagerly (``group_eager``) and replayed from a CUDA graph (``group_graph``), and the peer-memory all-reduces replayed
from a graph (``one_shot_graph``, ``two_shot_graph``); each result checked against the float32 sum (within bf16's rounding of it); the
bus bandwidth (2 (n-1)/n x bytes / time) beside the peer copy bandwidth between two of the GPUs measured in the run.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from benchmarks.common import machine_info, write_result  # noqa: E402

# Rows of the step's hidden states: one sequence, decode batches, a prefill chunk.
DEFAULT_ROWS = (1, 8, 64, 256, 8192)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Timed here, not with bench_attention's Timer: it picks its number of calls from a first estimate, which differs
# between ranks, and every rank of a collective must make the same calls.
def _us_per_call(run, device, calls: int, repeats: int = 5) -> float:
    """Microseconds per call: ``run()`` makes ``calls`` calls; timed over ``repeats`` runs after one untimed."""
    run()
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        return (time.perf_counter() - start) * 1e6 / (repeats * calls)
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        run()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) * 1e3 / (repeats * calls)


def _time_eager(fn, device, iters: int) -> float:
    def run() -> None:
        for _ in range(iters):
            fn()

    return _us_per_call(run, device, iters)


def _time_graph(fn, device, iters: int) -> float:
    """``iters`` calls of ``fn`` captured in one CUDA graph, replayed."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    try:
        return _us_per_call(graph.replay, device, iters)
    finally:
        graph.reset()  # before the group goes: a graph that captured a collective holds NCCL's communicator


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, queue) -> None:
    cuda = args.device == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    group_name = dist.group.WORLD.group_name
    dtype = torch.bfloat16 if cuda else torch.float32
    results = []
    symm = None
    if cuda:
        try:
            import torch.distributed._symmetric_memory as symm_mem

            largest = max(args.rows) * args.hidden
            symm = symm_mem.empty(largest, dtype=dtype, device=device)
            symm_mem.rendezvous(symm, group_name)
        except Exception:  # noqa: BLE001 - reported per message below
            symm = traceback.format_exc().strip().splitlines()[-1]
    try:
        for rows in args.rows:
            numel = rows * args.hidden
            g = torch.Generator(device="cpu").manual_seed(rank * 1000 + rows)
            data = torch.randn(numel, generator=g).to(dtype).to(device)
            expected = data.clone()
            dist.all_reduce(expected)
            exact = data.float()  # the sum without bf16 rounding: what each result is checked against
            dist.all_reduce(exact)
            nccl_error = (expected.float() - exact).abs().max().item()
            # A bf16 rounding per addend at the sum's largest magnitude: any order of summing stays within it.
            bound = max(2 * nccl_error, world * 2**-8 * exact.abs().max().item())
            row = {"rows": rows, "bytes": numel * data.element_size(), "us": {}, "errors": {}}
            work = data.clone()

            def nccl() -> None:
                dist.all_reduce(work)

            row["us"]["group_eager"] = round(_time_eager(nccl, device, args.iters), 2)
            if cuda:
                row["us"]["group_graph"] = round(_time_graph(nccl, device, args.iters), 2)
            if isinstance(symm, torch.Tensor):
                buf = symm[:numel]
                out = torch.empty_like(data)

                def one_shot() -> None:
                    buf.copy_(data)
                    torch.ops.symm_mem.one_shot_all_reduce_out(buf, "sum", group_name, out)

                def two_shot() -> None:
                    buf.copy_(data)
                    torch.ops.symm_mem.two_shot_all_reduce_(buf, "sum", group_name)

                for name, fn, result in (("one_shot", one_shot, out), ("two_shot", two_shot, buf)):
                    try:
                        fn()
                        torch.cuda.synchronize(device)
                        # Rounded in another order than NCCL's sum, but no further from the exact sum.
                        error = (result.float() - exact).abs().max().item()
                        if error > bound:
                            raise AssertionError(f"{error} from the exact sum (NCCL's: {nccl_error}; bound {bound})")
                        row["max_error"] = {"group": nccl_error, **row.get("max_error", {}), name: error}
                        row["us"][f"{name}_graph"] = round(_time_graph(fn, device, args.iters), 2)
                    except Exception as exc:  # noqa: BLE001 - one method failing leaves the others measured
                        row["errors"][name] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
            elif symm is not None:
                row["errors"]["symmetric_memory"] = symm
            results.append(row)
        if rank == 0:
            queue.put({"results": results, "peer_copy_gbs": _peer_copy_gbs(device, world) if cuda else None})
    except Exception:  # noqa: BLE001 - the parent reports it
        if rank == 0:
            queue.put({"error": traceback.format_exc()})
    finally:
        dist.destroy_process_group()


def _peer_copy_gbs(device: torch.device, world: int) -> float | None:
    """GPU 0 -> GPU 1 copy bandwidth (GB/s of bytes copied): one NVLink direction, the all-reduce's limit."""
    if world < 2:
        return None
    peer = torch.device("cuda", 1)
    src = torch.empty(1 << 28, dtype=torch.uint8, device=device)
    dst = torch.empty(1 << 28, dtype=torch.uint8, device=peer)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize(device)
    torch.cuda.synchronize(peer)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize(device)
    return round(10 * src.numel() / (start.elapsed_time(end) / 1e3) / 1e9, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-sizes", default="2,4", help="comma-separated")
    parser.add_argument("--rows", default=",".join(map(str, DEFAULT_ROWS)), help="rows of the hidden states")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--iters", type=int, default=65, help="all-reduces per timed graph (a decode step's count)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--name", default=None, help="results/<name>.json (default allreduce_<gpu>)")
    args = parser.parse_args()
    args.rows = [int(r) for r in args.rows.split(",")]
    sizes = [int(w) for w in args.world_sizes.split(",")]
    if args.device == "cuda" and max(sizes) > torch.cuda.device_count():
        parser.error(f"--world-sizes {args.world_sizes} needs {max(sizes)} GPUs, {torch.cuda.device_count()} seen")
    info = machine_info(args.device)
    report = {"machine": info, "settings": {**vars(args), "world_sizes": sizes}, "runs": {}}
    ctx = mp.get_context("spawn")
    for world in sizes:
        queue = ctx.SimpleQueue()
        procs = mp.start_processes(
            _worker, args=(world, _free_port(), args, queue), nprocs=world, join=False, start_method="spawn"
        )
        report["runs"][str(world)] = queue.get()  # before joining: rank 0 blocks until its report is read
        while not procs.join():
            pass
    gpu = (info.get("gpu") or args.device).lower().replace("nvidia ", "").replace(" ", "_")
    path = write_result(args.name or f"allreduce_{gpu}", report)
    for world, run in report["runs"].items():
        if "error" in run:
            print(f"world size {world}: FAILED\n{run['error']}")
            continue
        limit = run.get("peer_copy_gbs")
        backend = "NCCL" if args.device == "cuda" else "gloo"
        copy = f"; GPU 0 -> 1 copy: {limit} GB/s" if limit else ""
        print(f"\nworld size {world} (group_*: {backend} all_reduce{copy})")
        for row in run["results"]:
            w = int(world)
            cells = ", ".join(
                f"{name} {us} us ({2 * (w - 1) / w * row['bytes'] / (us * 1e-6) / 1e9:.0f} GB/s bus)"
                for name, us in row["us"].items()
            )
            print(f"  {row['rows']:>5} x {args.hidden} ({row['bytes'] >> 10} KiB): {cells}")
            for name, error in row["errors"].items():
                print(f"        {name}: {error}")
    print(f"wrote {path}")
    return 0 if all("error" not in run for run in report["runs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
