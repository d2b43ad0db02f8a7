"""The weight-loader interface: fills a constructed model's parameters from one source."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator

from torch import nn

from engine.layers.tp import CheckpointTensor


class WeightLoader(ABC):
    """One source of weights (safetensors directory, GGUF file, seeded random)."""

    @abstractmethod
    def load_into(self, model: nn.Module) -> None:
        """Fill every parameter of ``model`` (already on its device and dtype) in place.

        Raises:
            WeightLoadError: the source misses parameters the model needs or has unknown tensors.
        """


class WeightLoadError(RuntimeError):
    """A checkpoint does not match the model built from its config."""


class CheckpointWeightLoader(WeightLoader):
    """A source of named checkpoint tensors (Hugging Face names), fed through ``model.load_weights``, which
    fuses and shards them; every parameter must be filled."""

    @abstractmethod
    def iter_weights(self) -> Iterator[tuple[str, CheckpointTensor]]:
        """``(name, tensor)`` for every tensor of the checkpoint: a ``torch.Tensor``, or one read lazily, slice by
        slice, by the parameter that takes it."""

    def load_into(self, model: nn.Module) -> None:
        try:
            loaded = model.load_weights(self.iter_weights())
        except KeyError as exc:
            raise WeightLoadError(str(exc)) from exc
        check_all_loaded(model, loaded)


def check_all_loaded(model: nn.Module, loaded: set[str]) -> None:
    """Raise :class:`WeightLoadError` naming the parameters no checkpoint tensor filled."""
    missing = [name for name, _ in model.named_parameters() if name not in loaded]
    if missing:
        raise WeightLoadError(f"checkpoint has no tensors for {len(missing)} parameters, e.g. {missing[:5]}")
