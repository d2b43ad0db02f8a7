"""Weights from a Hugging Face directory of ``*.safetensors`` files, one file or shards named by an index."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from engine.weights.weight_loader import CheckpointWeightLoader, WeightLoadError

SAFETENSORS_INDEX = "model.safetensors.index.json"


def checkpoint_file_names(index: dict | None, file_names: Iterable[str]) -> list[str]:
    """The safetensors files of a checkpoint, sorted: those the index's ``weight_map`` names (a repository may also
    hold a differently laid out ``consolidated.safetensors``, which is not ours to read), else every top-level
    ``*.safetensors`` among ``file_names``."""
    if index is not None:
        return sorted(set(index.get("weight_map", {}).values()))
    return sorted(n for n in file_names if n.endswith(".safetensors") and "/" not in n)


def read_index(model_dir: Path) -> dict | None:
    """The parsed ``model.safetensors.index.json`` of ``model_dir``, or ``None`` when it has none."""
    path = Path(model_dir) / SAFETENSORS_INDEX
    return json.loads(path.read_text()) if path.is_file() else None


class SafetensorsWeightLoader(CheckpointWeightLoader):
    """Streams tensors one at a time (memory-mapped) into ``model.load_weights``, so peak memory
    is the model plus one tensor."""

    def __init__(self, model_dir: str | Path, show_progress: bool = True) -> None:
        self.model_dir = Path(model_dir)
        names = checkpoint_file_names(read_index(self.model_dir), (p.name for p in self.model_dir.iterdir()))
        if not names:
            raise WeightLoadError(f"no *.safetensors files in {self.model_dir}")
        missing = [n for n in names if not (self.model_dir / n).is_file()]
        if missing:
            raise WeightLoadError(f"{SAFETENSORS_INDEX} of {self.model_dir} names files it lacks: {missing[:5]}")
        self.files = [self.model_dir / n for n in names]
        self.show_progress = show_progress

    def iter_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(hf_name, tensor)`` for every tensor of every file."""
        for path in tqdm(
            self.files, desc="Loading safetensors shards", disable=not self.show_progress or len(self.files) < 2
        ):
            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
                for key in tqdm(keys, desc=f"Loading {path.name}", disable=not self.show_progress, leave=False):
                    yield key, f.get_tensor(key)
