"""Weight sources and model resolution.

``resolve_model(model)`` -> :class:`ResolvedModel` (HF config, tokenizer dir, weight source);
``get_weight_loader(resolved)`` -> a :class:`WeightLoader` whose ``load_into(model)`` fills it.
"""

from engine.weights.resolve import (
    DEFAULT_MODEL,
    NAMED_CONFIGS,
    ResolvedModel,
    cache_dir,
    converted_gguf_dir,
    default_gguf_path,
    get_weight_loader,
    resolve_model,
)
from engine.weights.weight_loader import WeightLoader, WeightLoadError

__all__ = [
    "DEFAULT_MODEL",
    "NAMED_CONFIGS",
    "ResolvedModel",
    "WeightLoadError",
    "WeightLoader",
    "cache_dir",
    "converted_gguf_dir",
    "default_gguf_path",
    "get_weight_loader",
    "resolve_model",
]
