"""Weight sources and model resolution.

``resolve_model(model)`` -> :class:`ResolvedModel` (HF config, tokenizer dir, weight source; only the small files
of a remote model fetched); ``get_weight_loader(resolved)`` -> a :class:`WeightLoader` whose ``load_into(model)``
fills it, its weights fetched first when remote.
"""

from engine.weights.model_source import ModelSource, ModelSourceError, cache_dir
from engine.weights.resolve import (
    DEFAULT_MODEL,
    NAMED_CONFIGS,
    ResolvedModel,
    converted_gguf_dir,
    default_gguf_path,
    get_weight_loader,
    model_source,
    read_generation_config,
    resolve_model,
)
from engine.weights.weight_loader import WeightLoader, WeightLoadError

__all__ = [
    "DEFAULT_MODEL",
    "NAMED_CONFIGS",
    "ModelSource",
    "ModelSourceError",
    "ResolvedModel",
    "WeightLoadError",
    "WeightLoader",
    "cache_dir",
    "converted_gguf_dir",
    "default_gguf_path",
    "get_weight_loader",
    "model_source",
    "read_generation_config",
    "resolve_model",
]
