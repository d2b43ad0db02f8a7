"""Attention backends over the vAttention cache: K/V are read in place from the dense per-layer
cache tensors (no copies, no block tables)."""

from engine.attention.backend import AttentionBackend, get_attention_backend

__all__ = ["AttentionBackend", "get_attention_backend"]
