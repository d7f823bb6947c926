"""Each rank fills its own GPTModel chunks, from the growth transforms (``--clone-from``) or from a
layout-invariant random init (``--init random``); no rank ever builds another rank's tensors.

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
from hyperclone_dist.errors import HypercloneError
from hyperclone_dist.growth.noise import field_key, noise_rows
from hyperclone_dist.growth.rules import rule_for
from hyperclone_dist.megatron.mapping import Layout, SliceFn, chunk_params, local_tensor
from hyperclone_dist.params import canonical_shapes

# Megatron-LM's scaled init: projections that write into the residual stream get std / sqrt(2 * layers).
_RESIDUAL_WRITERS = ("attn.o.weight", "mlp.down.weight")


@torch.no_grad()
def fill_chunks(chunks: list, cfg: ModelConfig, layout: Layout, tp_rank: int, pp_rank: int,
                slice_fn: SliceFn) -> None:
    """Copy this rank's slice of every parameter into its GPTModel chunks, one local tensor at a time."""
    for chunk_index, chunk in enumerate(chunks):
        params = dict(chunk.named_parameters())
        expected = set()
        for name, row, layer in chunk_params(cfg, layout, pp_rank, chunk_index):
            if name not in params:
                raise HypercloneError(f"GPTModel has no parameter {name}; mapping and model disagree")
            params[name].copy_(local_tensor(cfg, layout, row, layer, tp_rank, slice_fn))
            expected.add(name)
        unfilled = sorted(set(params) - expected)
        if unfilled:
            raise HypercloneError(f"GPTModel parameters left unfilled by the mapping: {unfilled[:3]}")


def init_std(cfg: ModelConfig, name: str) -> float:
    """Megatron-LM's defaults: N(0, init_std) for every matrix, init_std / sqrt(2L) for residual writers."""
    if name.endswith(_RESIDUAL_WRITERS):
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
            fill = 1.0 if rule_for(name).init == "one" else 0.0
            return torch.full((hi - lo,), fill)
        (r0, r1), (c0, c1) = bounds
        noise = noise_rows(field_key(seed, name, "init"), range(r0, r1), shape[1], slice(c0, c1))
        return noise * init_std(cfg, name)

    return slice_fn
