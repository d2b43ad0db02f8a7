"""Tensor-parallel pieces that need no second process: shape checks, weight sharding (dummy and checkpoint) (the replay of rank 0's
cache changes is tested with the cache, tests/kvcache). The ranks themselves (gloo through Ray actors) are tested in
tests/deployments/test_tp_workers.py."""

import pytest
import torch

from engine.model import LlamaForCausalLM
from engine.tp_executor import check_tp_shapes
from engine.weights import resolve_model
from engine.weights.dummy_loader import DummyWeightLoader
from engine.weights.safetensors_loader import SafetensorsTensor, SafetensorsWeightLoader
from tests.engine.tiny_checkpoints import save_tiny_checkpoint


def test_shapes_that_do_not_split_are_rejected_by_name():
    smollm2 = resolve_model("dummy:smollm2-135m").hf_config  # 9 query heads, 3 KV heads
    with pytest.raises(ValueError, match=r"tensor_parallel_size \(2\) must divide num_attention_heads \(9\)"):
        check_tp_shapes(smollm2, 2)
    check_tp_shapes(smollm2, 3)
    llama = resolve_model("dummy:llama-3-8b").hf_config  # 32 heads, 8 KV heads
    check_tp_shapes(llama, 2)
    check_tp_shapes(llama, 16)  # KV heads replicated: each held by 2 ranks
    with pytest.raises(ValueError, match="num_key_value_heads"):
        check_tp_shapes(llama, 12)


def _weights_per_rank(config, make_loader, tp_size: int) -> list[dict[str, torch.Tensor]]:
    ranks = []
    for rank in range(tp_size):
        model = LlamaForCausalLM(config, "sdpa", rank, tp_size)
        make_loader().load_into(model)
        ranks.append(dict(model.named_parameters()))
    return ranks


@pytest.mark.parametrize("source", ["dummy", "safetensors"])
def test_rank_weights_are_shards_of_tp1_weights(tmp_path, source):
    if source == "dummy":
        config = resolve_model("dummy:tiny-llama").hf_config

        def make_loader():
            return DummyWeightLoader(seed=3)
    else:
        save_tiny_checkpoint(tmp_path, "llama", max_shard_size="100KB")
        config = resolve_model(str(tmp_path)).hf_config

        def make_loader():
            return SafetensorsWeightLoader(tmp_path, show_progress=False)

    full = LlamaForCausalLM(config)
    make_loader().load_into(full)
    p = dict(full.named_parameters())
    ranks = _weights_per_rank(config, make_loader, 2)
    cat = torch.cat
    assert torch.equal(cat([r["model.embed_tokens.weight"] for r in ranks]), p["model.embed_tokens.weight"])
    assert torch.equal(cat([r["lm_head.weight"] for r in ranks]), p["lm_head.weight"])
    assert torch.equal(
        cat([r["model.layers.1.self_attn.o_proj.weight"] for r in ranks], 1),
        p["model.layers.1.self_attn.o_proj.weight"],
    )
    assert torch.equal(
        cat([r["model.layers.0.mlp.down_proj.weight"] for r in ranks], 1), p["model.layers.0.mlp.down_proj.weight"]
    )
    q_size, kv_size = 64, 32  # 4 heads, 2 KV heads, head_dim 16
    q, k, v = p["model.layers.0.self_attn.qkv_proj.weight"].split([q_size, kv_size, kv_size])
    inter = config.intermediate_size // 2
    for rank, r in enumerate(ranks):
        local = r["model.layers.0.self_attn.qkv_proj.weight"]
        assert torch.equal(local[:32], q[32 * rank : 32 * (rank + 1)])
        assert torch.equal(local[32:48], k[16 * rank : 16 * (rank + 1)])
        assert torch.equal(local[48:], v[16 * rank : 16 * (rank + 1)])
        gate, up = p["model.layers.1.mlp.gate_up_proj.weight"].chunk(2)
        gate_up = r["model.layers.1.mlp.gate_up_proj.weight"]
        assert torch.equal(
            gate_up, cat([gate[inter * rank : inter * (rank + 1)], up[inter * rank : inter * (rank + 1)]])
        )
        assert torch.equal(r["model.norm.weight"], p["model.norm.weight"])


def test_each_rank_reads_only_its_shard_of_the_checkpoint(tmp_path, monkeypatch):
    """Under tensor parallelism a rank reads its slice of each checkpoint tensor, not the whole tensor: the two ranks
    of TP=2 read the checkpoint once between them, plus the weights every rank holds whole (norms)."""
    from safetensors.torch import load_file

    save_tiny_checkpoint(tmp_path, "llama", max_shard_size="100KB")
    config = resolve_model(str(tmp_path)).hf_config
    checkpoint = {}
    for shard in tmp_path.glob("*.safetensors"):
        checkpoint.update(load_file(str(shard)))
    total = sum(t.numel() for t in checkpoint.values())
    whole = sum(t.numel() for name, t in checkpoint.items() if "norm" in name)

    read = []
    narrow = SafetensorsTensor.narrow

    def counting_narrow(self, dim, start, length):
        out = narrow(self, dim, start, length)
        read[-1] += out.numel()
        return out

    monkeypatch.setattr(SafetensorsTensor, "narrow", counting_narrow)
    for rank in range(2):
        read.append(0)
        model = LlamaForCausalLM(config, "sdpa", rank, 2)
        SafetensorsWeightLoader(tmp_path, show_progress=False).load_into(model)
    assert read == [(total - whole) // 2 + whole] * 2
