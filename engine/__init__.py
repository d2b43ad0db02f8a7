"""Inference engine: model, attention backends, scheduler, sampler, engine loop.

Kept import-light on purpose: importing ``engine`` must not pull torch/transformers, so that
CLI and deployment processes pay only for what they use. Import submodules directly, e.g.
``from engine.config import ModelConfig``.
"""
