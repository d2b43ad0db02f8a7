"""Our rotary embedding against transformers' LlamaRotaryEmbedding (default, linear, llama3, dynamic, yarn)."""

import math

import pytest
import torch

from engine.layers.rotary_embedding import apply_rotary, get_rope


def hf_cos_sin(config, positions):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rope = LlamaRotaryEmbedding(config)
    x = torch.zeros(1, positions.numel(), 8)
    cos, sin = rope(x, positions.unsqueeze(0))
    return cos[0], sin[0]


@pytest.mark.parametrize(
    "rope_parameters",
    [
        {"rope_type": "default", "rope_theta": 10000.0},
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
        {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        # dynamic NTK changes nothing up to max_position_embeddings, the engine's limit
        {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0},
        # Qwen2.5's long-context setting
        {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0, "original_max_position_embeddings": 32768},
        {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "original_max_position_embeddings": 4096,
            "beta_fast": 16,
            "beta_slow": 2,
            "attention_factor": 1.3,
        },
    ],
)
def test_cos_sin_match_transformers(rope_parameters):
    from transformers import LlamaConfig

    config = LlamaConfig(
        hidden_size=4096, num_attention_heads=32, max_position_embeddings=131072, rope_parameters=rope_parameters
    )
    positions = torch.tensor([0, 1, 7, 100, 4095, 8191, 8192, 20000, 131071])
    cos, sin = get_rope(config, 128)(positions)
    ref_cos, ref_sin = hf_cos_sin(config, positions)
    # transformers returns cat(freqs, freqs) over the head dim; we keep one half.
    torch.testing.assert_close(cos, ref_cos[:, :64], atol=1e-5, rtol=0)
    torch.testing.assert_close(sin, ref_sin[:, :64], atol=1e-5, rtol=0)


def test_llama3_scaling_changes_only_low_frequencies():
    from transformers import LlamaConfig

    base = {"rope_type": "default", "rope_theta": 500000.0}
    scaled = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    inv_base = get_rope(LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_parameters=base), 128).inv_freq
    inv_scaled = get_rope(LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_parameters=scaled), 128).inv_freq
    assert torch.equal(inv_base[:10], inv_scaled[:10])  # high frequencies untouched
    torch.testing.assert_close(inv_scaled[-5:], inv_base[-5:] / 8)  # lowest divided by factor


def test_yarn_scales_cos_and_sin_by_its_attention_factor():
    from transformers import LlamaConfig

    params = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}
    rope = get_rope(LlamaConfig(hidden_size=256, num_attention_heads=4, rope_parameters=params), 64)
    cos, sin = rope(torch.tensor([0]))
    torch.testing.assert_close(cos, torch.full_like(cos, 0.1 * math.log(4.0) + 1.0))


def test_legacy_rope_scaling_field_is_read():
    from types import SimpleNamespace

    config = SimpleNamespace(
        rope_theta=500000.0,
        max_position_embeddings=131072,
        rope_scaling={
            "type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    rope = get_rope(config, 128)
    assert rope.inv_freq[-1] < 1.0 / 500000.0 ** (126 / 128) / 7.9


def test_apply_rotary_matches_transformers():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    config = LlamaConfig(
        hidden_size=256, num_attention_heads=4, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}
    )
    positions = torch.arange(11)
    q = torch.randn(11, 4, 64)
    k = torch.randn(11, 2, 64)
    cos, sin = get_rope(config, 64)(positions)
    ref_cos, ref_sin = hf_cos_sin(config, positions)
    ref_q, ref_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], ref_cos[None], ref_sin[None])
    torch.testing.assert_close(apply_rotary(q, cos, sin), ref_q[0].transpose(0, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(apply_rotary(k, cos, sin), ref_k[0].transpose(0, 1), atol=1e-5, rtol=1e-5)


def test_unsupported_rope_type_raises():
    from transformers import LlamaConfig

    config = LlamaConfig(
        hidden_size=256,
        num_attention_heads=4,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": [1.0] * 32,
            "long_factor": [2.0] * 32,
            "original_max_position_embeddings": 1024,
        },
    )
    with pytest.raises(ValueError, match="rope_type"):
        get_rope(config, 64)
