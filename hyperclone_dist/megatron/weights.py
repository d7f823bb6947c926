"""A rank's megatron tensors from canonical slices: into its GPTModel chunks, or as plain state dicts.

Both read the mapping table (mapping.py) row by row and ask a ``slice_fn(canonical_name, index)`` (the
growth transforms, or a random init) for exactly the rows and columns the rank owns; no rank ever builds
another rank's tensors.
"""

from __future__ import annotations

import torch

from hyperclone_dist.config import ModelConfig
from hyperclone_dist.errors import HypercloneError
from hyperclone_dist.layout import Layout
from hyperclone_dist.megatron.mapping import SliceFn, SliceInto, chunk_params, copying_into, fill_local, local_shape


@torch.no_grad()
def fill_chunks(chunks: list, cfg: ModelConfig, layout: Layout, tp_rank: int, pp_rank: int,
                slice_fn: SliceFn, slice_into: SliceInto | None = None) -> None:
    """Write this rank's slice of every parameter into its GPTModel chunks, one local tensor at a time:
    with ``slice_into`` (the growth's), grown straight into the parameter's memory; else ``slice_fn``'s
    tensors copied in."""
    slice_into = slice_into or copying_into(slice_fn)
    for chunk_index, chunk in enumerate(chunks):
        params = dict(chunk.named_parameters())
        expected = set()
        for name, row, layer in chunk_params(cfg, layout, pp_rank, chunk_index):
            if name not in params:
                raise HypercloneError(f"GPTModel has no parameter {name}; mapping and model disagree")
            fill_local(cfg, layout, row, layer, tp_rank, slice_into, params[name].data)
            expected.add(name)
        unfilled = sorted(set(params) - expected)
        if unfilled:
            raise HypercloneError(f"GPTModel parameters left unfilled by the mapping: {unfilled[:3]}")


def rank_state_dicts(cfg: ModelConfig, layout: Layout, tp_rank: int, pp_rank: int, slice_fn: SliceFn,
                     dtype: torch.dtype = torch.float32,
                     slice_into: SliceInto | None = None) -> list[dict[str, torch.Tensor]]:
    """Local state dicts (one per model chunk) of rank (tp_rank, pp_rank), in megatron's layout; with
    ``slice_into`` each tensor is grown straight into its own memory."""
    slice_into = slice_into or copying_into(slice_fn)
    out = []
    for chunk in range(layout.chunks):
        state = {}
        for name, row, layer in chunk_params(cfg, layout, pp_rank, chunk):
            state[name] = torch.empty(local_shape(cfg, layout, row, layer), dtype=dtype)
            fill_local(cfg, layout, row, layer, tp_rank, slice_into, state[name])
        out.append(state)
    return out
