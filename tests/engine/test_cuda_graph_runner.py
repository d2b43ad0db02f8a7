import pytest
import torch

from engine.config import CacheConfig, ModelConfig
from engine.cuda_graph_runner import graph_buckets


@pytest.mark.gpu
def test_no_graphs_for_a_backend_that_reads_host_lists():
    """sdpa (float32 on the GPU) loops over the batch's host lists: a captured graph would replay the capture's."""
    from engine.model_runner import ModelRunner

    runner = ModelRunner(
        ModelConfig(model="dummy:tiny-llama", device="cuda", dtype="float32"),
        CacheConfig(max_batch_size=4, max_seq_len=256, kv_cache_memory_bytes=64 << 20),
    )
    try:
        assert runner.attention_backend == "sdpa" and runner.graph_runner is None
    finally:
        runner.close()


def test_buckets_cover_every_batch_size():
    for largest in (1, 3, 15, 64, 256):
        buckets = graph_buckets(largest)
        assert buckets == sorted(set(buckets)) and buckets[-1] == largest
        assert all(any(b >= n for b in buckets) for n in range(1, largest + 1))


@pytest.mark.gpu
@pytest.mark.parametrize("num_seqs", [1, 5, 16])
def test_graph_decode_matches_eager(num_seqs):
    """A replayed decode gives the eager logits and writes each sequence's new K/V in its own row, as eager does,
    and nowhere else: every other mapped row of the decoding slots and of a bystander slot is left as it was."""
    from engine.model_runner import ModelRunner

    runner = ModelRunner(
        ModelConfig(model="dummy:tiny-llama", device="cuda", dtype="bfloat16"),
        CacheConfig(max_batch_size=20, max_seq_len=2048),
    )
    try:
        assert runner.graph_runner is not None
        cache = runner.kv_cache
        num_layers = len(cache.k)
        gen = torch.Generator().manual_seed(num_seqs)
        prompts = [
            torch.randint(0, 1000, (int(n),), generator=gen).tolist()
            for n in torch.randint(1, 300, (num_seqs,), generator=gen)
        ]
        slots = [cache.allocate(len(p) + 2) for p in prompts]
        runner.execute(runner.build_batch([(s, p, 0) for s, p in zip(slots, prompts)]))
        bystander = cache.allocate(1000)
        for layer in range(num_layers):
            cache.k[layer][bystander, :1000] = 3.0
            cache.v[layer][bystander, :1000] = -3.0
        decode = [(s, [7 + i], len(p)) for i, (s, p) in enumerate(zip(slots, prompts))]
        # Page mapping changes underneath do not invalidate the captured graph.
        for s, p in zip(slots, prompts):
            cache.grow(s, len(p) + 1500)
        torch.cuda.synchronize()

        def mapped_rows():
            """Every row mapped now in the decoding slots and the bystander, per layer, K and V."""
            rows = {s: cache.capacity_tokens(s) for s in [*slots, bystander]}
            return {
                (layer, kv, s): t[layer][s, :n].clone()
                for layer in range(num_layers)
                for kv, t in (("k", cache.k), ("v", cache.v))
                for s, n in rows.items()
            }

        before = mapped_rows()
        graph_logits = runner.run(decode).clone()
        torch.cuda.synchronize()
        after_graph = mapped_rows()
        eager_logits = runner.execute(runner.build_batch(decode))
        torch.cuda.synchronize()
        after_eager = mapped_rows()

        torch.testing.assert_close(graph_logits, eager_logits, atol=2e-2, rtol=2e-2)
        assert torch.equal(graph_logits.argmax(-1), eager_logits.argmax(-1))
        new_row = {s: len(p) for s, p in zip(slots, prompts)}
        for key, old in before.items():
            _, _, slot = key
            changed = (after_graph[key] != old).flatten(1).any(dim=1).nonzero().flatten().tolist()
            assert changed == ([new_row[slot]] if slot in new_row else []), (key, changed)
            if slot in new_row:
                row = new_row[slot]
                torch.testing.assert_close(after_graph[key][row], after_eager[key][row], atol=2e-2, rtol=2e-2)
    finally:
        runner.close()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_placeholder_inputs_are_read_from_the_previous_steps_device_ids(device):
    """Asynchronous scheduling: a decode token the host has not seen yet is a placeholder, filled on the device from
    the previous step's sampled ids, on the graph path (decode batch) and the eager one (mixed with a prefill)."""
    from engine.model_runner import ModelRunner
    from engine.request import PLACEHOLDER_TOKEN_ID

    # bfloat16 on the GPU: the backend there (triton_flash) replays decode from CUDA graphs.
    dtype = "bfloat16" if device == "cuda" else "float32"
    runner = ModelRunner(
        ModelConfig(model="dummy:tiny-llama", device=device, dtype=dtype),
        CacheConfig(max_batch_size=8, max_seq_len=512, kv_cache_memory_bytes=64 << 20),
    )
    try:
        assert (runner.graph_runner is not None) == (device == "cuda")
        cache = runner.kv_cache
        prompts = [[5 + i] * (20 + 7 * i) for i in range(3)]
        slots = [cache.allocate(len(p) + 1) for p in prompts]
        runner.execute(runner.build_batch([(s, p, 0) for s, p in zip(slots, prompts)]))
        new_ids = [11, 12, 13]
        prev_token_ids = torch.tensor([99, *reversed(new_ids)], device=device)  # row 3 - i holds sequence i's
        known = [(s, [t], len(p)) for s, t, p in zip(slots, new_ids, prompts)]
        held = [(s, [PLACEHOLDER_TOKEN_ID], len(p)) for s, p in zip(slots, prompts)]
        prev_rows = [3, 2, 1]
        expected = runner.run(known).clone()
        assert torch.equal(runner.run(held, prev_token_ids, prev_rows), expected)

        prefill_slot = cache.allocate(9)
        mixed_known = known[:2] + [(prefill_slot, list(range(30, 39)), 0)]
        mixed_held = held[:2] + [(prefill_slot, list(range(30, 39)), 0)]
        expected = runner.run(mixed_known).clone()
        assert torch.equal(runner.run(mixed_held, prev_token_ids, prev_rows[:2] + [-1]), expected)
    finally:
        runner.close()
