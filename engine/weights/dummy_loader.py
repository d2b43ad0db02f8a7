"""Seeded random weights at real shapes: for benchmarks of models whose weights are not at hand
(``dummy:llama-3-8b``) and for fast tests."""

from __future__ import annotations

import torch

from engine.weights.weight_loader import WeightLoader


class DummyWeightLoader(WeightLoader):
    """Fills weights with ``N(0, std)`` and norm weights with ones, generated on the parameter's
    device (no host round trip for 16 GB of weights). Same seed, same device -> same weights."""

    def __init__(self, seed: int = 0, std: float = 0.02) -> None:
        self.seed = seed
        self.std = std

    def load_into(self, model) -> None:
        generators: dict[torch.device, torch.Generator] = {}
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" in name:
                    param.fill_(1.0)
                    continue
                gen = generators.get(param.device)
                if gen is None:
                    gen = generators[param.device] = torch.Generator(param.device).manual_seed(self.seed)
                # Generate in float32 then cast: normal_ on bf16 is not supported on every backend.
                param.copy_(torch.empty(param.shape, device=param.device).normal_(0.0, self.std, generator=gen))
