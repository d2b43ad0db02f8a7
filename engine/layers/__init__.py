"""Model building blocks, tensor-parallel aware (each takes ``tp_rank, tp_size``; weights are
sharded at load time by rank through each parameter's ``weight_loader``)."""

from engine.layers.activation import SiluAndMul
from engine.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from engine.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from engine.layers.rms_norm import RMSNorm
from engine.layers.rotary_embedding import RotaryEmbedding, apply_rotary, get_rope

__all__ = [
    "SiluAndMul",
    "ParallelLMHead",
    "VocabParallelEmbedding",
    "ColumnParallelLinear",
    "MergedColumnParallelLinear",
    "QKVParallelLinear",
    "RowParallelLinear",
    "RMSNorm",
    "RotaryEmbedding",
    "apply_rotary",
    "get_rope",
]
