"""Chained hashes of full token blocks: the keys of the KV cache's prefix registry, and of the router's prefix
affinity.

Block ``i``'s key hashes the key of block ``i - 1`` with the block's own tokens, so equal keys mean equal token
prefixes. Block 0 chains from a seed naming everything else that changes the KV (model, revision, dtype, tensor
parallel degree). blake2b, not Python's ``hash``: the keys must agree across processes (replicas, the router).
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence


def prefix_seed(*parts: object) -> int:
    """The key block 0 chains from, for a cache whose KV depends on ``parts``."""
    return _digest(b"\x00".join(str(p).encode() for p in parts))


def _digest(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def extend_block_hashes(hashes: list[int], tokens: Sequence[int], block_tokens: int, seed: int) -> list[int]:
    """Appends to ``hashes`` (the keys of a sequence's first blocks) the keys of the full blocks of ``tokens``,
    the sequence's tokens that follow those blocks; returns ``hashes``."""
    previous = hashes[-1] if hashes else seed
    for start in range(0, len(tokens) - block_tokens + 1, block_tokens):
        block = array("q", tokens[start : start + block_tokens])
        previous = _digest(previous.to_bytes(8, "little") + block.tobytes())
        hashes.append(previous)
    return hashes


def block_hashes(token_ids: Sequence[int], block_tokens: int, seed: int) -> list[int]:
    """The keys of every full block of ``token_ids``."""
    return extend_block_hashes([], token_ids, block_tokens, seed)
