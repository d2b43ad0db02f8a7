"""The tensor-parallel process group: one per process, set up by the executor (rank 0) or a ``TPWorker``.

Layers call ``torch.distributed`` collectives on the default group (``engine.layers.tp``); this module
creates and tears it down. NCCL on GPU, gloo on CPU. On GPU the group also holds a :class:`PeerAllReduce`: the
step's all-reduces up to a few MiB (every decode step's, small prefills') sum over peer memory instead of NCCL.
"""

from __future__ import annotations

import datetime
import logging
import os
import random
import socket
import threading

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

DEFAULT_TP_TIMEOUT_S = 300.0
# NVLink SHARP (NVLS) / symmetric-memory multicast are not usable on the machines we run on (and hang
# NCCL init where the fabric manager does not support them): keep them off in every rank's process.
TP_ENV_VARS = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
# The largest all-reduce summed over peer memory; larger ones (long prefill chunks) go to NCCL, as fast there.
PEER_ALL_REDUCE_MAX_BYTES = 8 << 20


class PeerAllReduce:
    """Sums a tensor over the group through memory every rank maps (PyTorch's symmetric memory, two-shot: each
    rank reduces its share of the ranks' buffers and writes it into all of them, between two barriers), launched
    as one kernel that a CUDA graph replays. At a decode step's sizes it takes about half of NCCL's time on H200s
    (``benchmarks/bench_allreduce.py``). The tensor is copied into this rank's buffer and the sum back out of it.

    The barriers spin on flags in peer memory with no timeout: a rank waiting for a peer that died never returns
    by itself. :meth:`release_waits` (from ``abort_tp_group``) sets the flags that the dead peers would have set
    until the group is destroyed, so that the queued work ends (with sums that are not used) and rank 0's
    device can be waited for and its cache unmapped.
    """

    DTYPES = (torch.bfloat16, torch.float32)  # the two-shot kernel's

    def __init__(self, device: torch.device, group_name: str, max_bytes: int = PEER_ALL_REDUCE_MAX_BYTES) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        self.max_bytes = max_bytes
        self._group_name = group_name
        self._buffer = symm_mem.empty(max_bytes, dtype=torch.uint8, device=device)
        self._handle = symm_mem.rendezvous(self._buffer, group_name)
        self._rank, self._world = self._handle.rank, self._handle.world_size
        self._op = torch.ops.symm_mem.two_shot_all_reduce_
        self._releasing: threading.Thread | None = None
        self._stop = threading.Event()

    def fits(self, x: torch.Tensor) -> bool:
        nbytes = x.numel() * x.element_size()
        return (
            x.dtype in self.DTYPES
            and x.is_contiguous()
            and 0 < nbytes <= self.max_bytes
            and nbytes % (16 * self._world) == 0  # 16-byte vectors, an equal share per rank
        )

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` (see :meth:`fits`) over the group, in place."""
        flat = x.view(-1)
        buf = self._buffer.view(x.dtype)[: flat.numel()]
        buf.copy_(flat)
        self._op(buf, "sum", self._group_name)
        flat.copy_(buf)
        return x

    def release_waits(self) -> None:
        """From now until :meth:`close`, every barrier of this rank's all-reduces passes without its peers: a
        thread keeps setting the flags the other ranks would set (this rank's pad, their columns) and clearing
        those this rank sets in theirs (its column), on a stream of its own, every millisecond. This rank's own
        flags are left alone. Idempotent."""
        if self._releasing is not None:
            return
        device = self._buffer.device
        mine = self._flags(self._rank)
        others = [r for r in range(self._world) if r != self._rank]
        theirs = [self._flags(r) for r in others]
        stream = torch.cuda.Stream(device)

        def run() -> None:
            with torch.cuda.stream(stream):
                while not self._stop.wait(0.001):
                    for r, pad in zip(others, theirs):
                        mine[:, r].fill_(1)
                        pad[:, self._rank].fill_(0)

        self._releasing = threading.Thread(target=run, name="peer-all-reduce-release", daemon=True)
        self._releasing.start()
        logger.warning("tensor-parallel all-reduces over peer memory now pass without the other ranks")

    def _flags(self, rank: int) -> torch.Tensor:
        """``rank``'s signal pad as ``[blocks, world]``: the flag that rank ``j`` reached a barrier in block ``b``
        of ``rank``'s kernel is ``[b, j]``."""
        pad = self._handle.get_signal_pad(rank, dtype=torch.int32)
        return pad[: pad.numel() - pad.numel() % self._world].view(-1, self._world)

    def close(self) -> None:
        """Stops :meth:`release_waits`; the buffer is freed with the last reference to it."""
        self._stop.set()
        if self._releasing is not None:
            self._releasing.join(timeout=5)


_peer_all_reduce: PeerAllReduce | None = None


def peer_all_reduce() -> PeerAllReduce | None:
    """This process's :class:`PeerAllReduce`, if its group has one."""
    return _peer_all_reduce


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_tp_group(
    init_method: str,
    rank: int,
    world_size: int,
    device: torch.device,
    timeout_s: float = DEFAULT_TP_TIMEOUT_S,
    peer_all_reduce: bool = True,
) -> None:
    """Join the tensor-parallel group (blocks until all ``world_size`` ranks joined ``init_method``).

    Args:
        init_method: ``tcp://host:port`` rendezvous, served by rank 0.
        rank, world_size: this process's rank and the tensor-parallel size.
        device: this rank's device (``cuda:0`` inside a Ray actor that sees one GPU, or ``cpu``).
        timeout_s: how long a collective may wait for the other ranks before raising; bounds how long a
            rank hangs when a peer died in the middle of a step.
        peer_all_reduce: on GPU, set up a :class:`PeerAllReduce` for small all-reduces (every rank must pass the
            same); without it, or where it cannot be set up on some rank, NCCL sums everything.

    Raises:
        RuntimeError: a group already exists in this process (one tensor-parallel engine per process).
    """
    if dist.is_initialized():
        raise RuntimeError(
            "a torch.distributed process group already exists in this process: one tensor-parallel engine per process"
        )
    for name, value in TP_ENV_VARS.items():
        os.environ.setdefault(name, value)
    kwargs = {}
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        kwargs["device_id"] = device
    dist.init_process_group(
        backend=backend_for(device),
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        **kwargs,
    )
    logger.info(
        "joined tensor-parallel group %s as rank %d of %d (%s)", init_method, rank, world_size, backend_for(device)
    )
    if device.type == "cuda" and world_size > 1 and peer_all_reduce:
        _init_peer_all_reduce(device)


def _init_peer_all_reduce(device: torch.device) -> None:
    """Every rank tries; all use it only if all could (else NCCL does every all-reduce)."""
    global _peer_all_reduce
    peer = None
    try:
        peer = PeerAllReduce(device, dist.group.WORLD.group_name)
    except Exception:  # noqa: BLE001 - no peer memory here (driver, platform, PyTorch build): NCCL does it all
        logger.warning("no all-reduce over peer memory on this rank; NCCL sums everything", exc_info=True)
    everyone = torch.tensor([peer is not None], dtype=torch.int32, device=device)
    dist.all_reduce(everyone, op=dist.ReduceOp.MIN)
    if everyone.item() == 1:
        _peer_all_reduce = peer
        logger.info("all-reduces up to %d MiB sum over peer memory", PEER_ALL_REDUCE_MAX_BYTES >> 20)


def destroy_tp_group() -> None:
    """Leave the group (no-op without one) so that a later engine in this process can create another. The device
    must be idle (no kernel of the group's left)."""
    global _peer_all_reduce
    if _peer_all_reduce is not None:
        _peer_all_reduce.close()
        _peer_all_reduce = None
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a peer may be gone already; nothing left to clean up then
            logger.exception("destroying the tensor-parallel group failed")


def abort_tp_group() -> None:
    """Abort in-flight collectives (a peer died): a rank blocked in an all-reduce raises instead of waiting
    for the timeout, and all-reduces over peer memory pass without the peers (:meth:`PeerAllReduce.release_waits`).
    Best effort; backends or versions without abort support fall back to the timeout."""
    if _peer_all_reduce is not None:
        _peer_all_reduce.release_waits()
    if not dist.is_initialized():
        return
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
    if abort is None:
        return
    try:
        abort()
    except Exception:  # noqa: BLE001 - gloo raises on the dead peer's closed socket anyway
        logger.warning("aborting the tensor-parallel group failed", exc_info=True)


# Ports the kernel hands to outgoing connections (Linux's default; read from /proc where there is one). A port picked
# there can be taken as the source port of any connection (Ray opens many) before the server binds it.
_EPHEMERAL_DEFAULT = (32768, 60999)
# Below Ray's worker ports (10002-19999 by default) and above the well-known ones.
_SERVER_PORTS_FROM = 20000


def ephemeral_port_range() -> tuple[int, int]:
    """The kernel's range of ports for outgoing connections, inclusive."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(v) for v in f.read().split())
        return low, high
    except (OSError, ValueError):
        return _EPHEMERAL_DEFAULT


def server_port_range() -> tuple[int, int]:
    """``(low, high)``: where this project's servers take ports (see :func:`free_port`)."""
    return _SERVER_PORTS_FROM, ephemeral_port_range()[0] - 1


def free_port(host: str, rng: random.Random | None = None) -> int:
    """A TCP port free now on ``host`` (this node), for a process group's rendezvous or a server: taken at random
    between 20000 and the start of the kernel's ephemeral range, where no outgoing connection takes it in the
    meantime (the kernel's own pick, port 0, comes from that range). Another server may still take it before it is
    bound again; callers that start servers on it retry or own the machine. Falls back to the kernel's pick when
    that range is too small or full."""
    rng = rng or random.Random()
    low, high = server_port_range()
    for _ in range(64 if high - low >= 1000 else 0):
        port = rng.randint(low, high)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
