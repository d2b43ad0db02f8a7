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


class SafetensorsTensor:
    """One tensor of a safetensors file, read when asked and only as much as asked: ``narrow`` reads the rows (or
    columns) a tensor-parallel rank keeps, as a host tensor that the parameter's ``weight_loader`` copies to the
    device. The file is opened for each read and closed after (~0.1 ms), so the file pages mapped for a read are
    released with the tensor read: loading holds about one tensor of host memory, never a whole shard.

    A slice along dim 0 reads only its own bytes; one along dim 1 (a row-parallel weight) copies only its columns
    but touches the pages of every row.
    """

    def __init__(self, path: Path, name: str, shape: torch.Size) -> None:
        self.path = path
        self.name = name
        self.shape = shape

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        """``tensor.narrow(dim, start, length)`` read from the file (on the host)."""
        index = [slice(None)] * len(self.shape)
        index[dim] = slice(start, start + length)
        with safe_open(str(self.path), framework="pt") as f:
            return f.get_slice(self.name)[tuple(index)]

    def __repr__(self) -> str:
        return f"SafetensorsTensor({self.path.name}:{self.name}, shape={tuple(self.shape)})"


class SafetensorsWeightLoader(CheckpointWeightLoader):
    """Streams a checkpoint tensor by tensor, shard by shard, straight into the model's parameters (already on
    their device): each tensor is read from its memory-mapped file, only the slice this tensor-parallel rank keeps,
    and copied into its parameter before the next is read. Host memory holds one tensor at a time, never the
    model nor a whole shard."""

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

    def iter_weights(self) -> Iterator[tuple[str, SafetensorsTensor]]:
        """Yield ``(hf_name, tensor)`` for every tensor of every file, in file order; nothing is read until the
        consumer narrows the tensor."""
        for path in tqdm(
            self.files, desc="Loading safetensors shards", disable=not self.show_progress or len(self.files) < 2
        ):
            with safe_open(str(path), framework="pt") as f:
                tensors = [SafetensorsTensor(path, key, torch.Size(f.get_slice(key).get_shape())) for key in f.keys()]
            for tensor in tqdm(tensors, desc=f"Loading {path.name}", disable=not self.show_progress, leave=False):
                yield tensor.name, tensor
