import pytest
import torch

from engine.config import CacheConfig, ModelConfig
from engine.cuda_graph_runner import graph_buckets


def test_buckets_cover_every_batch_size():
    for largest in (1, 3, 15, 64, 256):
        buckets = graph_buckets(largest)
        assert buckets == sorted(set(buckets)) and buckets[-1] == largest
        assert all(any(b >= n for b in buckets) for n in range(1, largest + 1))


@pytest.mark.gpu
@pytest.mark.parametrize("num_seqs", [1, 5, 16])
def test_graph_decode_matches_eager(num_seqs):
    from engine.model_runner import ModelRunner

    runner = ModelRunner(ModelConfig(model="dummy:tiny-llama", device="cuda", dtype="bfloat16"),
                         CacheConfig(max_batch_size=20, max_seq_len=2048))
    try:
        assert runner.graph_runner is not None
        cache = runner.kv_cache
        gen = torch.Generator().manual_seed(num_seqs)
        prompts = [torch.randint(0, 1000, (int(n),), generator=gen).tolist()
                   for n in torch.randint(1, 300, (num_seqs,), generator=gen)]
        slots = [cache.allocate(len(p) + 2) for p in prompts]
        runner.execute(runner.build_batch([(s, p, 0) for s, p in zip(slots, prompts)]))
        decode = [(s, [7 + i], len(p)) for i, (s, p) in enumerate(zip(slots, prompts))]
        # Page mapping changes underneath do not invalidate the captured graph.
        for s, p in zip(slots, prompts):
            cache.grow(s, len(p) + 1500)
        graph_logits = runner.run(decode).clone()
        eager_logits = runner.execute(runner.build_batch(decode))
        torch.testing.assert_close(graph_logits, eager_logits, atol=2e-2, rtol=2e-2)
        assert torch.equal(graph_logits.argmax(-1), eager_logits.argmax(-1))
    finally:
        runner.close()
