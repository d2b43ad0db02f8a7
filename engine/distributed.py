"""The tensor-parallel process group: one per process, set up by the executor (rank 0) or a ``TPWorker``.

Layers call ``torch.distributed`` collectives on the default group (``engine.layers.tp``); this module
creates and tears it down. NCCL on GPU, gloo on CPU.
"""

from __future__ import annotations

import datetime
import logging
import os
import random
import socket

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

DEFAULT_TP_TIMEOUT_S = 300.0
# NVLink SHARP (NVLS) / symmetric-memory multicast are not usable on the machines we run on (and hang
# NCCL init where the fabric manager does not support them): keep them off in every rank's process.
TP_ENV_VARS = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_tp_group(
    init_method: str, rank: int, world_size: int, device: torch.device, timeout_s: float = DEFAULT_TP_TIMEOUT_S
) -> None:
    """Join the tensor-parallel group (blocks until all ``world_size`` ranks joined ``init_method``).

    Args:
        init_method: ``tcp://host:port`` rendezvous, served by rank 0.
        rank, world_size: this process's rank and the tensor-parallel size.
        device: this rank's device (``cuda:0`` inside a Ray actor that sees one GPU, or ``cpu``).
        timeout_s: how long a collective may wait for the other ranks before raising; bounds how long a
            rank hangs when a peer died in the middle of a step.

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


def destroy_tp_group() -> None:
    """Leave the group (no-op without one) so that a later engine in this process can create another."""
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a peer may be gone already; nothing left to clean up then
            logger.exception("destroying the tensor-parallel group failed")


def abort_tp_group() -> None:
    """Abort in-flight collectives (a peer died): a rank blocked in an all-reduce raises instead of waiting
    for the timeout. Best effort; backends or versions without abort support fall back to the timeout."""
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
