"""Tokenizer loading (Hugging Face tokenizers, chat template included)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.config import ModelConfig
    from engine.weights import ResolvedModel


def load_tokenizer(model: ModelConfig | ResolvedModel | str):
    """The HF tokenizer of a model (``ModelConfig``, an already resolved model, or a model string).

    Dummy models borrow the default model's (SmolLM2) tokenizer: ids at or past its vocabulary
    size do not decode to text.
    """
    from transformers import AutoTokenizer

    from engine.weights import ResolvedModel, resolve_model

    if isinstance(model, ResolvedModel):
        resolved = model
    else:
        resolved = resolve_model(model if isinstance(model, str) else model.model)
    return AutoTokenizer.from_pretrained(str(resolved.tokenizer_dir))
