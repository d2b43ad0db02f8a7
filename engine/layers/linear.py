"""Tensor-parallel linear layers (Megatron style).

Every parameter carries a ``weight_loader(param, loaded_weight, shard_id=None)`` that copies
the rank's shard out of a full checkpoint tensor, so checkpoints are sharded at load time. ``loaded_weight`` is a
:class:`~engine.layers.tp.CheckpointTensor`: a ``torch.Tensor``, or a tensor still in its file, of which a rank
reads only the slice it keeps; the copy into the parameter casts to its dtype and moves it to its device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers.tp import CheckpointTensor, check_tp, divide, load_whole, tp_all_reduce


class _ParallelLinear(nn.Module):
    def __init__(self, input_size: int, output_size: int, bias: bool, tp_rank: int, tp_size: int) -> None:
        super().__init__()
        check_tp(tp_rank, tp_size)
        self.tp_rank = tp_rank
        self.tp_size = tp_size
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded_weight: CheckpointTensor, shard_id=None) -> None:
        raise NotImplementedError


class ColumnParallelLinear(_ParallelLinear):
    """``y = x W^T + b`` with ``W: [output_size, input_size]`` split along the output dim:
    each rank holds ``output_size / tp_size`` rows and outputs its slice ``[T, output_size / tp]``."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, tp_rank: int = 0, tp_size: int = 1):
        super().__init__(input_size, divide(output_size, tp_size, "output_size"), bias, tp_rank, tp_size)

    def weight_loader(self, param: nn.Parameter, loaded_weight: CheckpointTensor, shard_id=None) -> None:
        shard = param.shape[0]
        param.data.copy_(loaded_weight.narrow(0, self.tp_rank * shard, shard))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input fused into one GEMM (e.g. the MLP's
    gate and up). Checkpoint tensor ``shard_id = i`` goes to the i-th block of each rank's rows."""

    def __init__(
        self, input_size: int, output_sizes: list[int], bias: bool = False, tp_rank: int = 0, tp_size: int = 1
    ):
        self.output_sizes = list(output_sizes)
        super().__init__(input_size, sum(output_sizes), bias, tp_rank, tp_size)

    def weight_loader(self, param: nn.Parameter, loaded_weight: CheckpointTensor, shard_id: int) -> None:
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        size = self.output_sizes[shard_id] // self.tp_size
        param.data.narrow(0, offset, size).copy_(loaded_weight.narrow(0, self.tp_rank * size, size))


class QKVParallelLinear(ColumnParallelLinear):
    """Fused Q, K, V projection. Each rank holds its ``num_heads / tp`` query heads and
    ``num_kv_heads / tp`` KV heads (KV heads are replicated when ``num_kv_heads < tp_size``).
    Output per rank: ``[T, (q_heads + 2 * kv_heads) * head_dim]`` laid out ``[q | k | v]``."""

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool = False,
        tp_rank: int = 0,
        tp_size: int = 1,
    ):
        check_tp(tp_rank, tp_size)
        self.head_dim = head_dim
        self.num_heads = divide(num_heads, tp_size, "num_attention_heads")
        if num_kv_heads >= tp_size:
            self.num_kv_heads = divide(num_kv_heads, tp_size, "num_key_value_heads")
            self.kv_replicas = 1
        else:
            self.num_kv_heads = 1
            self.kv_replicas = divide(tp_size, num_kv_heads, "tp_size over num_key_value_heads")
        output_size = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp_size
        super().__init__(hidden_size, output_size, bias, tp_rank, tp_size)

    def weight_loader(self, param: nn.Parameter, loaded_weight: CheckpointTensor, shard_id: str) -> None:
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        if shard_id == "q":
            offset, size, src_index = 0, q_size, self.tp_rank
        elif shard_id in ("k", "v"):
            offset = q_size if shard_id == "k" else q_size + kv_size
            size, src_index = kv_size, self.tp_rank // self.kv_replicas
        else:
            raise ValueError(f"shard_id must be 'q', 'k' or 'v', got {shard_id!r}")
        param.data.narrow(0, offset, size).copy_(loaded_weight.narrow(0, src_index * size, size))


class RowParallelLinear(_ParallelLinear):
    """``y = x W^T + b`` with ``W`` split along the input dim; each rank takes its input slice
    ``[T, input_size / tp]`` and the partial outputs are summed across ranks (bias added once)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, tp_rank: int = 0, tp_size: int = 1):
        super().__init__(divide(input_size, tp_size, "input_size"), output_size, bias, tp_rank, tp_size)

    def weight_loader(self, param: nn.Parameter, loaded_weight: CheckpointTensor, shard_id=None) -> None:
        if param.dim() == 1:  # bias: not split
            load_whole(param, loaded_weight)
            return
        shard = param.shape[1]
        param.data.copy_(loaded_weight.narrow(1, self.tp_rank * shard, shard))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias if self.tp_rank == 0 else None
        return tp_all_reduce(F.linear(x, self.weight, bias), self.tp_size)
