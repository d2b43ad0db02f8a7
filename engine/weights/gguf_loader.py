"""Weights from a GGUF file, dequantized through transformers' GGUF support, and the conversion
of a GGUF file into a cached Hugging Face directory (config, safetensors, tokenizer)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from engine.weights.weight_loader import CheckpointWeightLoader


def read_gguf_hf_config(gguf_path: str | Path):
    """The transformers config described by a GGUF file's metadata."""
    from transformers import AutoConfig

    gguf_path = Path(gguf_path)
    return AutoConfig.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


def dequantize_gguf(gguf_path: str | Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """All tensors of a GGUF file, dequantized to ``dtype``, under Hugging Face names."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = read_gguf_hf_config(gguf_path)
    # A meta-device skeleton gives transformers the GGUF -> HF name map without allocating.
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    parsed = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=skeleton, torch_dtype=dtype)
    return parsed["tensors"]


class GGUFWeightLoader(CheckpointWeightLoader):
    """Loads a GGUF file directly (dequantizing every time: ~3 s for SmolLM2-135M). The engine
    normally goes through :func:`convert_gguf_to_hf_dir` instead, which caches the result."""

    def __init__(self, gguf_path: str | Path, dtype: torch.dtype = torch.float32) -> None:
        self.gguf_path = Path(gguf_path)
        self.dtype = dtype

    def iter_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield from dequantize_gguf(self.gguf_path, self.dtype).items()


def convert_gguf_to_hf_dir(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Write ``config.json``, ``generation_config.json``, ``model.safetensors`` (float32) and the
    tokenizer files of a GGUF model into ``out_dir``.

    The directory appears atomically (written to a temporary sibling, then renamed), so
    concurrent processes converting the same file never see a half-written directory.
    """
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, GenerationConfig

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared by whoever runs the engine
    try:
        config = read_gguf_hf_config(gguf_path)
        config.dtype = torch.float32
        tensors = dequantize_gguf(gguf_path, torch.float32)
        save_file(
            {k: v.contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"}
        )
        config.save_pretrained(tmp)
        GenerationConfig.from_model_config(config).save_pretrained(tmp)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not (out_dir / "config.json").exists():  # not "another process won the race"
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
