"""Seeded random weights at real shapes: for benchmarks of models whose weights are not at hand
(``dummy:llama-3-8b``) and for fast tests."""

from __future__ import annotations

import torch

from engine.weights.weight_loader import WeightLoader


class DummyWeightLoader(WeightLoader):
    """Fills weights with ``N(0, std)`` and norm weights with ones, generated on the parameter's
    device (no host round trip for 16 GB of weights). Same seed, same device -> same weights.

    A tensor-parallel rank gets its shard of exactly the weights a single-device model gets from the same
    seed: the full tensors are generated in the single-device order, then sharded by ``load_weights``.
    """

    def __init__(self, seed: int = 0, std: float = 0.02) -> None:
        self.seed = seed
        self.std = std

    def load_into(self, model) -> None:
        if getattr(model, "tp_size", 1) > 1:
            self._load_sharded(model)
            return
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

    def _load_sharded(self, model) -> None:
        from engine.model import LlamaForCausalLM
        from engine.weights.weight_loader import check_all_loaded

        # The single-device model's parameter names, shapes and order, without allocating it.
        with torch.device("meta"):
            full = LlamaForCausalLM(model.hf_config, "sdpa", 0, 1)
        device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        gen = torch.Generator(device).manual_seed(self.seed)
        q_size = full.model.layers[0].self_attn.q_size
        kv_size = full.model.layers[0].self_attn.kv_size

        def checkpoint_tensors():
            for name, meta in full.named_parameters():
                if "norm" in name:
                    yield name, torch.ones(meta.shape, device=device, dtype=dtype)
                    continue
                tensor = torch.empty(meta.shape, device=device).normal_(0.0, self.std, generator=gen).to(dtype)
                # Back to checkpoint names: load_weights fuses q/k/v and gate/up again, taking this rank's shard.
                if ".qkv_proj." in name:
                    for part, chunk in zip(("q_proj", "k_proj", "v_proj"), tensor.split([q_size, kv_size, kv_size])):
                        yield name.replace("qkv_proj", part), chunk
                elif ".gate_up_proj." in name:
                    for part, chunk in zip(("gate_proj", "up_proj"), tensor.chunk(2)):
                        yield name.replace("gate_up_proj", part), chunk
                else:
                    yield name, tensor

        with torch.no_grad():
            loaded = model.load_weights(checkpoint_tensors())
        check_all_loaded(model, loaded)
