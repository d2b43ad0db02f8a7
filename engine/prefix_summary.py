"""What a replica tells the router of the prompt prefixes its KV cache holds, and what a prompt is matched with.

The cache registers each full block of computed tokens under a key chained over the blocks before it
(``engine.block_hashes``), so one key at chain position ``p`` stands for a whole ``p + 1``-block prefix. A replica
reports the keys of its cached blocks at a few positions only, growing by about 1.5x (0, 1, 2, 3, 5, 7, 11, 15, 23,
31, ...); a prompt's keys at the same positions, found among them, give the length of the prefix cached there to
within that factor. The report stays a few hundred ints, however much the cache holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.block_hashes import block_hashes

if TYPE_CHECKING:  # the ingress imports this module: no torch there for a type
    from kvcache.interface import KVCache

# Keys a summary holds at most: ~2 KiB on the wire per report.
DEFAULT_MAX_SUMMARY_KEYS = 256


def summary_positions(num_blocks: int) -> tuple[int, ...]:
    """The chain positions below ``num_blocks`` that summaries and probes use: ``2^k - 1`` and ``3 * 2^(k-1) - 1``,
    i.e. 0, 1, 2, 3, 5, 7, 11, 15, 23, 31, 47, 63, ..."""
    positions = []
    power = 1
    while power - 1 < num_blocks:
        positions.append(power - 1)
        if power >= 2 and 3 * power // 2 - 1 < num_blocks:
            positions.append(3 * power // 2 - 1)
        power *= 2
    return tuple(positions)


@dataclass(frozen=True)
class PrefixSummary:
    """A bounded summary of the prefixes one KV cache holds.

    Attributes:
        block_tokens: tokens per cached block (the unit of sharing).
        seed: the key block 0 chains from (``engine.block_hashes.prefix_seed``): a prompt's keys match only if they
            were computed from the same seed, i.e. for the same model, dtype and tensor-parallel degree.
        keys: keys of cached blocks at :func:`summary_positions`, at most ``max_keys`` of them: each position's in
            use or most recently used first, taken in turns so that no position crowds out the others.
    """

    block_tokens: int
    seed: int
    keys: tuple[int, ...]


def summarize_prefixes(
    cache: KVCache, seed: int, max_blocks: int, max_keys: int = DEFAULT_MAX_SUMMARY_KEYS
) -> PrefixSummary:
    """The summary of ``cache``'s prefix registry (``max_blocks``: the most blocks one request holds)."""
    by_position = cache.cached_keys(max_keys, summary_positions(max_blocks))
    columns = [keys for _, keys in sorted(by_position.items())]
    keys: list[int] = []
    for turn in range(max((len(c) for c in columns), default=0)):
        keys.extend(c[turn] for c in columns if turn < len(c))
        if len(keys) >= max_keys:
            break
    return PrefixSummary(cache.block_tokens, seed, tuple(keys[:max_keys]))


def prefix_probe(token_ids: Sequence[int], block_tokens: int, seed: int) -> tuple[tuple[int, int], ...]:
    """``(num_tokens, key)`` of the prompt's blocks at :func:`summary_positions`: a key found in a replica's summary
    means the prompt's first ``num_tokens`` tokens are cached there. Only the blocks the engine may reuse: a prompt
    always computes its last token, so a block that ends the prompt is never taken from the cache."""
    num_blocks = (len(token_ids) - 1) // block_tokens
    positions = summary_positions(num_blocks)
    if not positions:
        return ()
    keys = block_hashes(token_ids[: (positions[-1] + 1) * block_tokens], block_tokens, seed)
    return tuple(((p + 1) * block_tokens, keys[p]) for p in positions)


def cached_prefix_tokens(probe: Sequence[tuple[int, int]], summary_keys: frozenset[int] | set[int]) -> int:
    """Prompt tokens whose KV a replica holds (to within the probe's spacing), by its summary's keys."""
    return max((num_tokens for num_tokens, key in probe if key in summary_keys), default=0)
