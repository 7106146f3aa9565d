"""Tiny DiffEmbed configs and models with random weights everywhere."""

from __future__ import annotations

import torch

from diffembed_hf import DiffEmbedConfig, DiffEmbedForEmbedding

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
)


def tiny_config(**overrides) -> DiffEmbedConfig:
    kwargs = dict(TINY, rope_theta=10000.0, pad_token_id=0, bos_token_id=1, eos_token_id=1)
    kwargs.update(overrides)
    return DiffEmbedConfig(**kwargs)


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Random weights everywhere (norm weights and biases too) so that no parameter can hide a bug."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * std)
    return model


def tiny_model(seed: int = 0, **overrides) -> DiffEmbedForEmbedding:
    return randomize(DiffEmbedForEmbedding(tiny_config(**overrides)), seed).eval()
