"""Each rank's megatron tensor, built from canonical slices, reassembles into the grown model."""

from __future__ import annotations

import pytest
import torch

from hyperclone_dist.errors import HypercloneError
from hyperclone_dist.growth.grow import Grower
from hyperclone_dist.growth.spec import GrowthSpec
from hyperclone_dist.layout import Layout, padded_vocab_size
from hyperclone_dist.megatron.mapping import TP_AXIS, chunk_layers, chunk_params, local_shape, split_local
from hyperclone_dist.megatron.model import check_representable
from hyperclone_dist.megatron.weights import rank_state_dicts
from hyperclone_dist.sources import open_source


def test_interleaved_layer_assignment():
    layout = Layout(pp=2, vpp=2)
    owners = {(p, c): chunk_layers(8, layout, p, c) for p in range(2) for c in range(2)}
    assert owners == {(0, 0): [0, 1], (1, 0): [2, 3], (0, 1): [4, 5], (1, 1): [6, 7]}
    assert chunk_layers(8, Layout(pp=4), 3, 0) == [6, 7]


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("case", ["llama-gqa2", "gpt2-tied", "qwen2-tied", "opt"])
def test_rank_tensors_reassemble_to_grown_model(tiny_model_dirs, case, tp):
    source = open_source(tiny_model_dirs[case])
    grower = Grower(source.config, GrowthSpec(2, method="noisy", seed=1), source.get)
    cfg, layout = grower.large, Layout(tp=tp, pp=2)
    gathered: dict[str, list[list[torch.Tensor]]] = {}
    for pp_rank in range(layout.pp):
        for tp_rank in range(tp):
            (state,) = rank_state_dicts(grower.large, layout, tp_rank, pp_rank, grower.slice)
            for name, row, layer in chunk_params(cfg, layout, pp_rank, 0):
                tensor = state[name]
                assert tuple(tensor.shape) == local_shape(cfg, layout, row, layer), name
                pieces = split_local(cfg, layout, row, tensor)
                for part, piece in zip(row.parts, pieces):
                    key = part.format(i=layer)
                    gathered.setdefault(key, [[] for _ in range(tp)])[tp_rank].append((row.split, piece))
    for key, per_rank in gathered.items():
        split = per_rank[0][0][0]
        pieces = [entries[0][1] for entries in per_rank]
        axis = TP_AXIS[split]
        whole = pieces[0] if axis is None else torch.cat(pieces, dim=axis)
        expected = grower.full(key)
        if split == "positions":
            offset = cfg.position_offset
            assert torch.equal(whole, expected[offset:offset + cfg.max_position_embeddings]), key
            continue
        if split == "vocab":
            assert whole.shape[0] == padded_vocab_size(cfg.vocab_size, tp)
            assert torch.count_nonzero(whole[cfg.vocab_size:]) == 0  # padding rows
            whole = whole[: cfg.vocab_size]
        assert torch.equal(whole, expected), key
        if axis is None:
            assert all(torch.equal(p, pieces[0]) for p in pieces)  # replicated on every rank
    assert set(gathered) == set(grower.names())


def test_divisibility_errors_name_the_numbers(tiny_model_dirs):
    source = open_source(tiny_model_dirs["llama-gqa2"])
    large = Grower(source.config, GrowthSpec(2), source.get).large  # 8 heads, 4 groups, 2 layers
    with pytest.raises(HypercloneError, match=r"query groups / kv heads \(6\) are neither divisible by tp=4 nor a "
                                              r"divisor of it: this model allows --tp in \{1, 2, 3, 6, 12, 24\}"):
        Layout(tp=4).validate(large.replace(num_heads=24, num_kv_heads=6, ffn_hidden_size=96))
    Layout(tp=8).validate(large)  # 4 query groups on 8 ranks: megatron-core shares each over 2 ranks
    with pytest.raises(HypercloneError, match=r"layers \(2\) are not divisible by pp x vpp = 2 x 2 = 4"):
        Layout(pp=2, vpp=2).validate(large)
    with pytest.raises(HypercloneError, match=r"attention heads \(8\) are not divisible by tp=3"):
        Layout(tp=3).validate(large)


@pytest.mark.parametrize("case,changes,why", [
    ("gpt_neox", {}, "parallel residual"),
    ("opt-postln", {}, "post-LN"),
    ("llama-mqa-tied-bias", {"mlp_bias": False}, "biases all linears, none, or QKV only"),
])
def test_unrepresentable_families_are_refused(tiny_model_dirs, case, changes, why):
    cfg = open_source(tiny_model_dirs[case]).config.replace(**changes)
    with pytest.raises(HypercloneError, match=why):
        check_representable(cfg)


def test_te_spec_names_fuse_norms_into_linears(tiny_model_dirs):
    cfg = open_source(tiny_model_dirs["gpt2-tied"]).config
    local = [name for name, _, _ in chunk_params(cfg, Layout(), 0, 0)]
    te = [name for name, _, _ in chunk_params(cfg, Layout(spec="te"), 0, 0)]
    assert "decoder.layers.0.input_layernorm.weight" in local
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in te
    assert "decoder.layers.1.mlp.linear_fc1.layer_norm_bias" in te
    assert not any("input_layernorm" in n or "pre_mlp_layernorm" in n for n in te)
    assert len(te) == len(local)
