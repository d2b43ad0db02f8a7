"""Tiny random checkpoints built with transformers, and a local Hugging Face cache laid out for them (tests never
reach the Hub)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from engine.weights.resolve import DUMMY_TOKENIZER_DIR

# SmolLM2's tokenizer (shipped for dummy models): a checkpoint that carries it needs this vocabulary.
TOKENIZER_VOCAB_SIZE = 49152


def tiny_config(model_type: str, **overrides):
    from transformers import AutoConfig

    kwargs = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def save_tiny_checkpoint(path, model_type: str, max_shard_size=None, with_tokenizer: bool = False, **overrides):
    """Save a random ``model_type`` model (float32) at ``path`` and return it (eval mode). ``max_shard_size``
    (e.g. ``"100KB"``) shards it with a ``model.safetensors.index.json``; ``with_tokenizer`` adds SmolLM2's
    tokenizer files (then ``vocab_size`` should be :data:`TOKENIZER_VOCAB_SIZE`)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), dtype=torch.float32).eval()
    # Random biases/norms so a loader that skips them fails the comparison.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(1.0 if "norm" in name else 0.0, 0.1)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kwargs)
    if with_tokenizer:
        for f in DUMMY_TOKENIZER_DIR.iterdir():
            shutil.copy(f, Path(path) / f.name)
    return model


def lay_out_hub_cache(cache: Path, repo_id: str, files_dir: Path, revision: str = "main", commit: str = "a" * 40):
    """Put ``files_dir``'s files in ``cache`` as ``huggingface_hub`` lays out a downloaded snapshot of ``repo_id``
    at ``revision`` (``refs/<revision>`` holding the commit, ``snapshots/<commit>/``). Returns the snapshot dir."""
    repo_dir = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for f in Path(files_dir).iterdir():
        shutil.copy(f, snapshot / f.name)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / revision).write_text(commit)
    return snapshot


def hf_greedy_tokens(hf_model, prompt: list[int], num_tokens: int) -> list[int]:
    """transformers' greedy continuation of ``prompt``: argmax of the full forward at each step (no EOS stop)."""
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(num_tokens):
            ids.append(int(hf_model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]
