"""Weights from a Hugging Face directory of ``*.safetensors`` files."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from engine.weights.weight_loader import CheckpointWeightLoader, WeightLoadError


class SafetensorsWeightLoader(CheckpointWeightLoader):
    """Streams tensors one at a time (memory-mapped) into ``model.load_weights``, so peak memory
    is the model plus one tensor."""

    def __init__(self, model_dir: str | Path, show_progress: bool = True) -> None:
        self.model_dir = Path(model_dir)
        self.files = sorted(self.model_dir.glob("*.safetensors"))
        if not self.files:
            raise WeightLoadError(f"no *.safetensors files in {self.model_dir}")
        self.show_progress = show_progress

    def iter_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(hf_name, tensor)`` for every tensor of every file."""
        for path in self.files:
            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
                for key in tqdm(keys, desc=f"Loading {path.name}", disable=not self.show_progress, leave=False):
                    yield key, f.get_tensor(key)
