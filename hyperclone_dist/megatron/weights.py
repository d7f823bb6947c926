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
from hyperclone_dist.megatron.mapping import SliceFn, chunk_params, local_tensor


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


def rank_state_dicts(cfg: ModelConfig, layout: Layout, tp_rank: int, pp_rank: int, slice_fn: SliceFn,
                     dtype: torch.dtype = torch.float32) -> list[dict[str, torch.Tensor]]:
    """Local state dicts (one per model chunk) of rank (tp_rank, pp_rank), in megatron's layout."""
    return [{name: local_tensor(cfg, layout, row, layer, tp_rank, slice_fn).to(dtype).contiguous()
             for name, row, layer in chunk_params(cfg, layout, pp_rank, chunk)}
            for chunk in range(layout.chunks)]
