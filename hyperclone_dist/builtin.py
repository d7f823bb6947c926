"""A small built-in model, so the main job runs with nothing to download."""

from __future__ import annotations

import torch

from hyperclone_dist.config import ModelConfig
from hyperclone_dist.params import rule_for, stored_shapes, vector_fill

BUILTIN = ModelConfig(
    family="llama", vocab_size=512, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16,
    ffn_hidden_size=176, max_position_embeddings=128, norm="rmsnorm", norm_eps=1e-6, activation="silu",
    gated_mlp=True, position_embedding="rope", tie_word_embeddings=False,
)


def random_state_dict(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random weights: N(0, init_std) matrices, unit norm gains (with a little spread so that
    a wrong norm rule would show), small biases."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in stored_shapes(cfg).items():
        init = rule_for(name).mup
        noise = torch.randn(shape, generator=generator)
        if init == "one":
            state[name] = vector_fill(cfg, rule_for(name)) + 0.1 * noise
        elif init == "zero":
            state[name] = 0.02 * noise
        else:
            state[name] = cfg.init_std * 5 * noise  # larger than init so logits are far from uniform
    return state
