"""Tensor-parallel pieces that need no second process: shape checks, dummy-weight sharding (the replay of rank 0's
cache changes is tested with the cache, tests/kvcache). The ranks themselves (gloo through Ray actors) are tested in
tests/deployments/test_tp_workers.py."""

import pytest
import torch

from engine.model import LlamaForCausalLM
from engine.tp_executor import check_tp_shapes
from engine.weights import resolve_model
from engine.weights.dummy_loader import DummyWeightLoader


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


def test_dummy_weights_at_tp2_are_shards_of_tp1_weights():
    config = resolve_model("dummy:tiny-llama").hf_config  # 4 heads, 2 KV heads, head_dim 16
    full = LlamaForCausalLM(config)
    DummyWeightLoader(seed=3).load_into(full)
    ranks = []
    for rank in range(2):
        model = LlamaForCausalLM(config, "sdpa", rank, 2)
        DummyWeightLoader(seed=3).load_into(model)
        ranks.append(dict(model.named_parameters()))
    p = dict(full.named_parameters())
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
    q, k, v = p["model.layers.0.self_attn.qkv_proj.weight"].split([64, 32, 32])
    for rank, r in enumerate(ranks):
        local = r["model.layers.0.self_attn.qkv_proj.weight"]
        assert torch.equal(local[:32], q[32 * rank : 32 * (rank + 1)])
        assert torch.equal(local[32:48], k[16 * rank : 16 * (rank + 1)])
        assert torch.equal(local[48:], v[16 * rank : 16 * (rank + 1)])
        gate, up = p["model.layers.1.mlp.gate_up_proj.weight"].chunk(2)
        gate_up = r["model.layers.1.mlp.gate_up_proj.weight"]
        assert torch.equal(gate_up, cat([gate[64 * rank : 64 * (rank + 1)], up[64 * rank : 64 * (rank + 1)]]))
        assert torch.equal(r["model.norm.weight"], p["model.norm.weight"])
