"""A layout-invariant random init (``--init random``): a slice function any rank can ask for its slices.

megatron's own initialisation draws each rank's shard from that rank's RNG stream, so the same seed
gives different weights at TP=1 and TP=2. Here element (r, c) of every canonical tensor is a function of
(seed, name, r, c) alone (growth/noise.py's position-addressed fields), so every layout starts from the
same model and trains the same way: what the layout-equivalence tests measure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from hyperclone_dist.config import ModelConfig
from hyperclone_dist.growth.noise import field_key, noise_rows
from hyperclone_dist.megatron.mapping import SliceFn
from hyperclone_dist.params import canonical_shapes, rule_for, vector_fill


def init_std(cfg: ModelConfig, name: str) -> float:
    """Megatron-LM's defaults: N(0, init_std) for every matrix, init_std / sqrt(2L) for the matrices that
    write into the residual stream."""
    if rule_for(name).residual_writer:
        return cfg.init_std / math.sqrt(2.0 * cfg.num_layers)
    return cfg.init_std


def random_init(cfg: ModelConfig, seed: int) -> SliceFn:
    """A slice function of freshly initialised weights: norms 1, biases 0, matrices Gaussian."""
    shapes = canonical_shapes(cfg)

    def slice_fn(name: str, index: Sequence[slice]) -> torch.Tensor:
        shape = shapes[name]
        bounds = [sl.indices(size)[:2] for sl, size in zip(index, shape)]
        if len(shape) == 1:
            (lo, hi), = bounds
            return torch.full((hi - lo,), vector_fill(cfg, rule_for(name)))
        (r0, r1), (c0, c1) = bounds
        noise = noise_rows(field_key(seed, name, "init"), range(r0, r1), shape[1], slice(c0, c1))
        return noise * init_std(cfg, name)

    return slice_fn
