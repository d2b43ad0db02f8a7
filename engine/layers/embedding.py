"""Vocabulary-parallel embedding and LM head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers.tp import CheckpointTensor, check_tp, divide, tp_all_gather_last_dim, tp_all_reduce


class VocabParallelEmbedding(nn.Module):
    """Token embedding ``[vocab, hidden]`` split along the vocabulary: rank ``r`` holds rows
    ``[r * vocab / tp, (r + 1) * vocab / tp)``; tokens of other ranks embed to zero locally and
    the all-reduce sums the one non-zero contribution. ``forward(ids [T]) -> [T, hidden]``."""

    def __init__(self, num_embeddings: int, embedding_dim: int, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        check_tp(tp_rank, tp_size)
        self.tp_rank = tp_rank
        self.tp_size = tp_size
        self.num_embeddings = num_embeddings
        self.num_embeddings_per_rank = divide(num_embeddings, tp_size, "vocab_size")
        self.vocab_start = tp_rank * self.num_embeddings_per_rank
        self.weight = nn.Parameter(torch.empty(self.num_embeddings_per_rank, embedding_dim), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded_weight: CheckpointTensor, shard_id=None) -> None:
        param.data.copy_(loaded_weight.narrow(0, self.vocab_start, self.num_embeddings_per_rank))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        in_range = (local >= 0) & (local < self.num_embeddings_per_rank)
        out = F.embedding(local.clamp(0, self.num_embeddings_per_rank - 1), self.weight)
        out = out * in_range.unsqueeze(-1).to(out.dtype)
        return tp_all_reduce(out, self.tp_size)


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection ``hidden -> vocab`` sharing the embedding's vocabulary split;
    ``forward(hidden [N, hidden]) -> logits [N, vocab]`` (gathered from all ranks)."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return tp_all_gather_last_dim(F.linear(hidden, self.weight), self.tp_size)
