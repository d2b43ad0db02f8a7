"""Tensor-parallel collectives and checkpoint shards. With ``tp_size == 1`` the collectives are no-ops, so nothing
here needs ``torch.distributed`` to be initialised on a single device."""

from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn


class CheckpointTensor(Protocol):
    """A checkpoint tensor as a parameter's ``weight_loader`` sees it: a ``torch.Tensor``, or one not read yet
    (``engine.weights.safetensors_loader.SafetensorsTensor``) whose ``narrow`` reads only the slice asked for, so
    that a tensor-parallel rank reads its shard, not the whole tensor."""

    @property
    def shape(self) -> torch.Size: ...

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor: ...


def load_whole(param: nn.Parameter, loaded_weight: CheckpointTensor) -> None:
    """Copy all of ``loaded_weight`` into ``param`` (a weight every rank holds whole: norms, a row-parallel bias),
    cast to its dtype and moved to its device."""
    param.data.copy_(loaded_weight.narrow(0, 0, loaded_weight.shape[0]))


def tp_all_reduce(x: torch.Tensor, tp_size: int) -> torch.Tensor:
    """Sum ``x`` over the tensor-parallel group (in place)."""
    if tp_size > 1:
        dist.all_reduce(x)
    return x


def tp_all_gather_last_dim(x: torch.Tensor, tp_size: int) -> torch.Tensor:
    """Concatenate each rank's ``[..., d]`` into ``[..., tp_size * d]``."""
    if tp_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(tp_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)


def check_tp(tp_rank: int, tp_size: int) -> None:
    if tp_size < 1:
        raise ValueError(f"tp_size must be >= 1, got {tp_size}")
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank must be in [0, {tp_size}), got {tp_rank}")


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator != 0:
        raise ValueError(f"{what} ({numerator}) must be divisible by tp_size ({denominator})")
    return numerator // denominator
