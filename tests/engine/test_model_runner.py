"""What ModelRunner checks before loading weights: the sequence length a model allows (positions, sliding window),
and ``check_model``, the checks a deployment runs before starting replicas."""

import pytest

from engine.config import CacheConfig, EngineConfig, ModelConfig
from engine.model import sliding_window_of
from engine.model_runner import ModelRunner, check_model, max_model_len_of
from engine.weights import ModelSourceError
from tests.engine.tiny_checkpoints import save_tiny_checkpoint, tiny_config


@pytest.mark.parametrize(
    "model_type,overrides,window",
    [
        ("llama", {}, None),
        ("mistral", {"sliding_window": None}, None),
        ("mistral", {"sliding_window": 64}, 64),
        ("qwen2", {"sliding_window": 64, "use_sliding_window": False}, None),  # Qwen2's default: not applied
        ("qwen2", {"sliding_window": 64, "use_sliding_window": True, "max_window_layers": 1}, 64),
        ("qwen2", {"sliding_window": 64, "use_sliding_window": True, "max_window_layers": 2}, None),  # no layer
    ],
)
def test_sliding_window_is_read_as_transformers_applies_it(model_type, overrides, window):
    assert sliding_window_of(tiny_config(model_type, **overrides)) == window


def test_max_seq_len_is_bounded_by_positions_and_sliding_window():
    mistral = tiny_config("mistral", sliding_window=64)
    assert max_model_len_of(mistral, CacheConfig()) == 64  # the default stays inside the window
    assert max_model_len_of(mistral, CacheConfig(max_seq_len=64)) == 64
    with pytest.raises(ValueError, match=r"max_seq_len \(128\) must be <= the model's sliding_window \(64\)"):
        max_model_len_of(mistral, CacheConfig(max_seq_len=128))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        max_model_len_of(tiny_config("llama"), CacheConfig(max_seq_len=512))
    assert max_model_len_of(tiny_config("llama", max_position_embeddings=8192), CacheConfig()) == 4096


def test_runner_refuses_a_sliding_window_shorter_than_max_seq_len(tmp_path):
    save_tiny_checkpoint(tmp_path, "mistral", sliding_window=64)
    with pytest.raises(ValueError, match="sliding_window"):
        ModelRunner(ModelConfig(model=str(tmp_path), device="cpu"), CacheConfig(max_seq_len=128, max_batch_size=1))


def test_check_model_runs_the_deploy_time_checks(tmp_path):
    save_tiny_checkpoint(tmp_path, "llama")
    resolved = check_model(EngineConfig.from_dict({"model": str(tmp_path), "max_seq_len": 128}))
    assert resolved.hf_config.hidden_size == 64
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        check_model(EngineConfig.from_dict({"model": str(tmp_path), "tensor_parallel_size": 3}))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        check_model(EngineConfig.from_dict({"model": str(tmp_path), "max_seq_len": 1024}))
    with pytest.raises(ModelSourceError, match="nothing-here': no such file or directory"):
        check_model(EngineConfig.from_dict({"model": str(tmp_path / "nothing-here")}))
