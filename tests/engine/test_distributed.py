"""``free_port``: the ports servers and process groups start on; on 2 GPUs, the all-reduce over peer memory."""

import random
import socket
import time

import pytest

import engine.distributed as distributed
from engine.distributed import ephemeral_port_range, free_port


@pytest.mark.skipif(ephemeral_port_range()[0] < 21000, reason="no room below this host's ephemeral range")
def test_free_port_is_bindable_and_outside_the_ephemeral_range():
    low, _ = ephemeral_port_range()
    rng = random.Random(0)
    for _ in range(20):
        port = free_port("127.0.0.1", rng)
        assert 20000 <= port < low  # never one an outgoing connection may take as its source port meanwhile
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", port))


def test_free_port_skips_a_port_in_use():
    rng = random.Random(7)
    first = free_port("127.0.0.1", random.Random(7))
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", first))
        held.listen()
        assert free_port("127.0.0.1", rng) != first  # the same draw, taken: the next one


def test_free_port_falls_back_to_the_kernels_pick_without_room_below_the_ephemeral_range(monkeypatch):
    monkeypatch.setattr(distributed, "ephemeral_port_range", lambda: (20500, 60999))
    port = free_port("127.0.0.1")
    assert port > 0
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", port))


def _peer_rank(rank: int, port: int, queue) -> None:
    """A rank of a 2-GPU group: sums over peer memory, eagerly and from a CUDA graph; then rank 1 dies without
    leaving, and rank 0's next all-reduce (which waits for it) ends once the group is aborted."""
    import os

    import torch

    from engine.distributed import abort_tp_group, destroy_tp_group, init_tp_group, peer_all_reduce

    device = torch.device("cuda", rank)
    init_tp_group(f"tcp://127.0.0.1:{port}", rank, 2, device, timeout_s=60)
    peer = peer_all_reduce()
    out = {"rank": rank, "peer": peer is not None}
    if peer is not None:
        x = torch.arange(64 * 4096, device=device, dtype=torch.float32).view(64, 4096) * (rank + 1)
        expected = torch.arange(64 * 4096, device=device, dtype=torch.float32).view(64, 4096) * 3
        out["fits"] = peer.fits(x) and not peer.fits(torch.empty(4096, 4096, device=device))  # 64 MiB: NCCL's
        out["eager"] = torch.equal(peer.all_reduce(x.clone()), expected)
        y = torch.ones(8, 4096, device=device, dtype=torch.bfloat16)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            peer.all_reduce(y.clone())  # warm-up before capture
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(3):
                peer.all_reduce(y)
        graph.replay()
        torch.cuda.synchronize(device)
        out["graph"] = bool((y == 8).all())  # 1 + 1, three times over: 2, 4, 8
        dist_barrier(device)
        if rank == 1:
            queue.put(out)
            os._exit(0)  # dies in the group: rank 0's next all-reduce waits for it
        time.sleep(2)
        z = torch.ones(8, 4096, device=device, dtype=torch.bfloat16)
        peer.all_reduce(z)
        done = torch.cuda.Event()
        done.record()
        time.sleep(2)
        out["waited_for_the_dead_rank"] = not done.query()
        abort_tp_group()
        deadline = time.time() + 20
        while not done.query() and time.time() < deadline:
            time.sleep(0.01)
        out["released"] = done.query()
        if out["released"]:
            destroy_tp_group()
    queue.put(out)


def dist_barrier(device) -> None:
    import torch
    import torch.distributed as dist

    dist.all_reduce(torch.zeros(1, device=device))
    torch.cuda.synchronize(device)


@pytest.mark.gpu
def test_peer_all_reduce_sums_eagerly_and_in_graphs_and_is_released_when_a_peer_dies():
    import torch
    import torch.multiprocessing as mp

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port("127.0.0.1")
    procs = [ctx.Process(target=_peer_rank, args=(rank, port, queue)) for rank in range(2)]
    for p in procs:
        p.start()
    try:
        results = {}
        deadline = time.time() + 120
        while len(results) < 2 and time.time() < deadline:
            if not queue.empty():
                out = queue.get()
                results[out["rank"]] = out
            else:
                time.sleep(0.1)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert set(results) == {0, 1}, f"a rank did not report: {results}"
    for out in results.values():
        assert out["peer"], "no all-reduce over peer memory on this machine"
        assert out["fits"] and out["eager"] and out["graph"], out
    assert results[0]["waited_for_the_dead_rank"], "the barrier did not wait for the missing peer: nothing tested"
    assert results[0]["released"], "an all-reduce waiting for a dead peer still ran 20 s after the abort"
