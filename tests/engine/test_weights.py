"""Weight loaders and model resolution: HF safetensors dirs (one file or sharded), GGUF, dummy weights."""

import pytest
import torch

from engine.config import CacheConfig, EngineConfig, ModelConfig
from engine.llm_engine import LLMEngine
from engine.model import LlamaForCausalLM
from engine.model_runner import ModelRunner
from engine.sampling_params import SamplingDefaults, SamplingParams
from engine.weights import NAMED_CONFIGS, WeightLoadError, resolve_model
from engine.weights.gguf_loader import GGUFWeightLoader
from engine.weights.resolve import default_gguf_path
from engine.weights.safetensors_loader import SafetensorsWeightLoader
from tests.engine.tiny_checkpoints import hf_greedy_tokens, save_tiny_checkpoint, tiny_config


def our_logits_all_positions(runner, token_lists):
    """Prefill every sequence in one batch, return logits at every position per sequence."""
    slots = [runner.kv_cache.allocate(len(t)) for t in token_lists]
    try:
        batch = runner.build_batch([(s, t, 0) for s, t in zip(slots, token_lists)])
        with torch.inference_mode():
            logits = runner.model.compute_logits(runner.model(batch, runner.kv_cache))
    finally:
        for s in slots:
            runner.kv_cache.free(s)
    cu = batch.cu_seqlens_q_cpu
    return [logits[cu[i] : cu[i + 1]] for i in range(len(token_lists))]


@pytest.mark.parametrize(
    "model_type,overrides",
    [
        ("llama", {}),
        ("llama", {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True}),
        (
            "llama",
            {
                "rope_scaling": {
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 64,
                }
            },
        ),
        ("qwen2", {}),  # q/k/v biases implied by the architecture
        ("mistral", {"sliding_window": None}),
    ],
)
def test_hf_checkpoint_logits_match_transformers(tmp_path, model_type, overrides):
    hf_model = save_tiny_checkpoint(tmp_path, model_type, **overrides)
    runner = ModelRunner(
        ModelConfig(model=str(tmp_path), device="cpu"),
        CacheConfig(max_batch_size=3, max_seq_len=128, kv_cache_memory_bytes=8 << 20),
    )
    try:
        g = torch.Generator().manual_seed(1)
        token_lists = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (37, 1, 90)]
        ours = our_logits_all_positions(runner, token_lists)
        for tokens, got in zip(token_lists, ours):
            with torch.inference_mode():
                ref = hf_model(torch.tensor([tokens])).logits[0]
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    finally:
        runner.close()


@pytest.mark.parametrize(
    "model_type,overrides",
    [
        ("llama", {}),
        ("llama", {"tie_word_embeddings": True}),
        ("qwen2", {}),  # q/k/v biases
        ("mistral", {"sliding_window": 4096}),  # a window longer than max_seq_len: full attention is exact
    ],
)
def test_sharded_checkpoint_gives_transformers_greedy_tokens(tmp_path, model_type, overrides):
    """The whole engine (scheduler, cache, sampler) on a checkpoint saved in several shards with an index, greedy
    in float32 on CPU: the same tokens as transformers, for a batch of prompts decoding side by side."""
    hf_model = save_tiny_checkpoint(tmp_path, model_type, max_shard_size="100KB", with_tokenizer=True, **overrides)
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "model.safetensors.index.json").is_file()
    engine = LLMEngine(
        EngineConfig.from_dict(
            {"model": str(tmp_path), "device": "cpu", "max_batch_size": 4, "max_seq_len": 128, "sampler_seed": 0}
        )
    )
    try:
        g = torch.Generator().manual_seed(2)
        prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 23, 1, 40)]
        params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        for i, prompt in enumerate(prompts):
            engine.add_request(f"r{i}", prompt, params)
        got: dict[str, list[int]] = {}
        while len(got) < len(prompts):
            for out in engine.step():
                if out.finished:
                    got[out.request_id] = list(out.token_ids)
        for i, prompt in enumerate(prompts):
            assert got[f"r{i}"] == hf_greedy_tokens(hf_model, prompt, 12), f"prompt {i}"
    finally:
        engine.shutdown()


def test_index_names_the_shards_read(tmp_path):
    """A repository may hold another layout of the same weights (Mistral's consolidated.safetensors): with an
    index, only the files it names are read; a file it names but that is absent is reported."""
    from safetensors.torch import save_file

    save_tiny_checkpoint(tmp_path, "llama", max_shard_size="100KB")
    save_file({"tok_embeddings.weight": torch.zeros(2, 2)}, str(tmp_path / "consolidated.safetensors"))
    model = LlamaForCausalLM(tiny_config("llama"))
    SafetensorsWeightLoader(tmp_path, show_progress=False).load_into(model)  # no unknown-tensor error
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(WeightLoadError, match=shard.name):
        SafetensorsWeightLoader(tmp_path, show_progress=False)


def test_missing_tensor_raises(tmp_path):
    from safetensors.torch import load_file, save_file

    save_tiny_checkpoint(tmp_path, "llama")
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    model = LlamaForCausalLM(tiny_config("llama"))
    with pytest.raises(WeightLoadError, match="down_proj"):
        SafetensorsWeightLoader(tmp_path, show_progress=False).load_into(model)


def test_unknown_tensor_raises(tmp_path):
    save_tiny_checkpoint(tmp_path, "llama", attention_bias=True)
    model = LlamaForCausalLM(tiny_config("llama"))  # built without biases
    with pytest.raises(WeightLoadError, match="bias"):
        SafetensorsWeightLoader(tmp_path, show_progress=False).load_into(model)


def test_gguf_loader_matches_converted_dir():
    """Dequantizing the GGUF directly gives the same weights as the cached converted directory."""
    resolved = resolve_model("smollm2")
    a = LlamaForCausalLM(resolved.hf_config)
    b = LlamaForCausalLM(resolved.hf_config)
    GGUFWeightLoader(default_gguf_path()).load_into(a)
    SafetensorsWeightLoader(resolved.weights_dir, show_progress=False).load_into(b)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name


def test_converted_dir_is_cached_and_complete():
    first = resolve_model("smollm2")
    second = resolve_model("smollm2")
    assert first.weights_dir == second.weights_dir
    names = {p.name for p in first.weights_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= names
    assert first.hf_config.num_hidden_layers == 30 and first.hf_config.num_key_value_heads == 3
    assert getattr(first.hf_config, "quantization_config", None) is None


def test_dummy_weights_shapes_and_seed():
    cache = CacheConfig(max_batch_size=2, max_seq_len=64, kv_cache_memory_bytes=4 << 20)
    runners = [ModelRunner(ModelConfig(model="dummy:tiny-llama", device="cpu", seed=s), cache) for s in (0, 0, 1)]
    try:
        a, b, c = (dict(r.model.named_parameters()) for r in runners)
        cfg = runners[0].hf_config
        assert a["model.layers.0.self_attn.qkv_proj.weight"].shape == (
            (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * 16,
            cfg.hidden_size,
        )
        assert a["lm_head.weight"].shape == (cfg.vocab_size, cfg.hidden_size)
        for name in a:
            assert torch.equal(a[name], b[name]), name
        assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
        assert torch.all(a["model.norm.weight"] == 1)
        std = a["model.layers.1.mlp.down_proj.weight"].std().item()
        assert 0.015 < std < 0.025
        logits = runners[0].execute(runners[0].build_batch([(runners[0].kv_cache.allocate(3), [1, 2, 3], 0)]))
        assert logits.shape == (1, cfg.vocab_size) and torch.isfinite(logits).all()
    finally:
        for r in runners:
            r.close()


@pytest.mark.parametrize("name", NAMED_CONFIGS)
def test_named_dummy_configs_build_at_real_shapes(name):
    resolved = resolve_model(f"dummy:{name}")
    assert resolved.weight_source == "dummy" and (resolved.tokenizer_dir / "tokenizer.json").is_file()
    with torch.device("meta"):
        model = LlamaForCausalLM(resolved.hf_config)
    num_params = sum(p.numel() for p in model.parameters())
    if name.startswith("llama-3"):
        assert num_params == 8_030_261_248  # Llama-3-8B
    if name == "smollm2-135m":
        assert num_params == 134_515_008
    if name == "yi-34b":
        assert 34e9 < num_params < 35e9
    # Dummy models tokenize with the shipped tokenizer: every id it produces must be one of the model's.
    from engine.tokenizer import load_tokenizer

    assert len(load_tokenizer(resolved)) <= resolved.hf_config.vocab_size


def test_dummy_config_from_path(tmp_path):
    tiny_config("llama").save_pretrained(tmp_path)
    resolved = resolve_model(f"dummy:{tmp_path}")
    assert resolved.hf_config.hidden_size == 64


@pytest.mark.parametrize("bad", ["nope", "dummy:no-such-config", "/does/not/exist.gguf"])
def test_resolve_rejects_unknown_models(bad):
    with pytest.raises(ValueError, match="model"):
        resolve_model(bad)


def test_generation_config_gives_eos_ids_and_sampling_defaults(tmp_path):
    """A checkpoint's generation_config.json: every id of its eos_token_id list ends generation, and its sampling
    values are the defaults of a request that sets none (vLLM's generation-config auto)."""
    import json

    hf_model = save_tiny_checkpoint(tmp_path, "llama", with_tokenizer=True)
    prompt = [5, 17, 42, 9]
    greedy = hf_greedy_tokens(hf_model, prompt, 8)
    eos = greedy[3]  # the 4th greedy token ends the answer (unless an earlier one is the same token)
    generation_config = {"eos_token_id": [255, eos], "temperature": 0.6, "top_p": 0.9, "repetition_penalty": 1.1}
    (tmp_path / "generation_config.json").write_text(json.dumps(generation_config))
    engine = LLMEngine(EngineConfig.from_dict({"model": str(tmp_path), "device": "cpu", "max_seq_len": 64}))
    try:
        assert {255, eos} <= engine.eos_token_ids
        assert engine.sampling_defaults == SamplingDefaults(temperature=0.6, top_p=0.9)
        engine.add_request("defaults", prompt)
        params = engine.requests["defaults"][0].params
        assert (params.temperature, params.top_p, params.top_k) == (0.6, 0.9, -1)
        engine.abort("defaults")
        engine.step()
        [out] = engine.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0))
        assert list(out.token_ids) == greedy[: greedy.index(eos) + 1] and out.finish_reason == "stop"
    finally:
        engine.shutdown()


@pytest.mark.gpu
@pytest.mark.parametrize("tp_rank,tp_size", [(0, 1), (1, 2)])
def test_checkpoint_loads_shard_by_shard_onto_the_gpu(tmp_path, tp_rank, tp_size):
    """A sharded float32 checkpoint read tensor by tensor into a bfloat16 model built on the GPU (a rank of TP=2
    reading its slices): the parameters are the checkpoint's, cast, on the device."""
    save_tiny_checkpoint(tmp_path, "llama", max_shard_size="100KB", attention_bias=True)
    config = resolve_model(str(tmp_path)).hf_config
    reference = LlamaForCausalLM(config, "sdpa", tp_rank, tp_size)
    SafetensorsWeightLoader(tmp_path, show_progress=False).load_into(reference)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config, "sdpa", tp_rank, tp_size).to(torch.bfloat16)
    SafetensorsWeightLoader(tmp_path, show_progress=False).load_into(model)
    for (name, got), (_, want) in zip(model.named_parameters(), reference.named_parameters()):
        assert got.device.type == "cuda" and got.dtype == torch.bfloat16, name
        assert torch.equal(got.cpu(), want.to(torch.bfloat16)), name
