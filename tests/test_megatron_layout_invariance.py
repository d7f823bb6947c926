"""A checkpoint converted at TP=4 x PP=2 equals, tensor by tensor after gathering, the TP=1 x PP=1 one,
bitwise, for every growth variant: ranks built apart agree with a model built whole."""

from __future__ import annotations

import pytest
import torch

from hyperclone_dist.growth.grow import Grower
from hyperclone_dist.growth.spec import METHODS, GrowthSpec
from hyperclone_dist.layout import Layout
from hyperclone_dist.megatron.mapping import TP_AXIS, chunk_params, split_local
from hyperclone_dist.megatron.weights import rank_state_dicts
from hyperclone_dist.sources import open_source


def gathered_canonical(grower: Grower, layout: Layout, rows=None) -> dict[str, torch.Tensor]:
    """Every canonical tensor, reassembled from the ranks' megatron tensors (each rank built by a fresh
    Grower, as a separate process would)."""
    cfg = grower.large
    pieces: dict[str, dict[int, torch.Tensor]] = {}
    splits: dict[str, str] = {}
    for pp_rank in range(layout.pp):
        for tp_rank in range(layout.tp):
            fresh = Grower(grower.small, grower.spec, grower.get_small, rows)
            for chunk, state in enumerate(rank_state_dicts(fresh.large, layout, tp_rank, pp_rank, fresh.slice)):
                for name, row, layer in chunk_params(cfg, layout, pp_rank, chunk):
                    if name == "output_layer.weight" and row.parts == ("embed.weight",):
                        continue  # the last stage's copy of a shared embedding
                    for part, piece in zip(row.parts, split_local(cfg, layout, row, state[name])):
                        key = part.format(i=layer)
                        pieces.setdefault(key, {})[tp_rank] = piece
                        splits[key] = row.split
    out = {}
    for key, by_rank in pieces.items():
        axis = TP_AXIS[splits[key]]
        ordered = [by_rank[r] for r in sorted(by_rank)]
        out[key] = ordered[0] if axis is None else torch.cat(ordered, dim=axis)
        if splits[key] == "vocab":  # padding depends on tp (a multiple of 128 x tp); real rows must agree
            out[key] = out[key][: cfg.vocab_size]
    return out


@pytest.mark.parametrize("spec", [GrowthSpec(2, method=m, seed=5) for m in METHODS]
                         + [GrowthSpec(2, method="noisy", insert_layers="every:1", seed=5)],
                         ids=lambda s: f"{s.method}{'-depth' if s.insert_layers else ''}")
def test_tp4_pp2_equals_tp1_pp1_bitwise(tiny_model_dirs, spec):
    source = open_source(tiny_model_dirs["llama-gqa2"])  # x2: 8 heads, 4 kv groups
    grower = Grower(source.config, spec, source.get)
    whole = gathered_canonical(grower, Layout(tp=1, pp=1))
    sharded = gathered_canonical(grower, Layout(tp=4, pp=2), rows=source.get_rows)  # ranks read row ranges
    assert set(whole) == set(sharded) == set(grower.names())
    for key in whole:
        assert torch.equal(whole[key], sharded[key]), key
