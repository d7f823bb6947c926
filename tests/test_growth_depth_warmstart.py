"""Depth growth (identity insertion, stacking) and muP warmstart, each checked by its own rule."""

from __future__ import annotations

import pytest
import torch
from growth_helpers import grow_in_memory, max_rel_logit_error

from hyperclone_dist.errors import HypercloneError
from hyperclone_dist.growth.grow import Grower
from hyperclone_dist.growth.spec import GrowthSpec, LayerSource, layer_plan
from hyperclone_dist.sources import open_source

TOL = 1e-5


@pytest.mark.parametrize("case", ["llama-gqa2", "gpt2-tied", "qwen2-tied", "gpt_neox", "opt", "mistral-mqa",
                                  "qwen3-tied", "gemma3-tied", "olmo2"])
@pytest.mark.parametrize("insert", ["every:1", "end:2", "-1,0"])
@pytest.mark.parametrize("width", [1, 2])
def test_identity_insertion_preserves_logits(tiny_model_dirs, case, insert, width):
    spec = GrowthSpec(width, method="noisy" if width > 1 else "symmetric", insert_layers=insert)
    grower, grown = grow_in_memory(tiny_model_dirs[case], spec)
    assert grower.large.num_layers > grower.small.num_layers
    assert max_rel_logit_error(tiny_model_dirs[case], grown) <= TOL


def test_inserted_block_is_zeroed_output_copied_inside(tiny_model_dirs):
    grower, _ = grow_in_memory(tiny_model_dirs["llama-gqa2"], GrowthSpec(1, insert_layers="0"))
    assert grower.plan == [LayerSource(0), LayerSource(0, identity=True), LayerSource(1)]
    assert torch.count_nonzero(grower.full("layers.1.attn.o.weight")) == 0
    assert torch.count_nonzero(grower.full("layers.1.mlp.down.weight")) == 0
    assert torch.equal(grower.full("layers.1.attn.q.weight"), grower.full("layers.0.attn.q.weight"))


def test_layer_plans():
    assert [p.source for p in layer_plan(GrowthSpec(insert_layers="every:2"), 4)] == [0, 1, 1, 2, 3, 3]
    assert [p.identity for p in layer_plan(GrowthSpec(insert_layers="every:2"), 4)] == [
        False, False, True, False, False, True]
    assert [p.source for p in layer_plan(GrowthSpec(insert_layers="end:2"), 3)] == [0, 1, 2, 2, 2]
    assert [p.source for p in layer_plan(GrowthSpec(stack=3), 2)] == [0, 1, 0, 1, 0, 1]


def test_identity_insertion_refused_for_post_ln(tiny_model_dirs):
    with pytest.raises(HypercloneError, match="post-LN"):
        grow_in_memory(tiny_model_dirs["opt-postln"], GrowthSpec(1, insert_layers="0"))


def test_stacking_repeats_layers_and_is_not_function_preserving(tiny_model_dirs):
    path = tiny_model_dirs["llama-gqa2"]
    grower, grown = grow_in_memory(path, GrowthSpec(2, stack=2))
    small_layers = grower.small.num_layers
    assert grower.large.num_layers == 2 * small_layers
    for name in grower.names():
        if name.startswith("layers.") and int(name.split(".")[1]) >= small_layers:
            j = int(name.split(".")[1])
            twin = name.replace(f"layers.{j}.", f"layers.{j - small_layers}.", 1)
            assert torch.equal(grower.full(name), grower.full(twin)), name
    assert max_rel_logit_error(path, grown) > 1e-3  # documented: stacking changes the function


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory):
    """Large enough (hidden 64 -> 128) for a std estimate within 1%."""
    import transformers
    from conftest import make_tiny_model

    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                   max_position_embeddings=16)
    path = tmp_path_factory.mktemp("wide") / "llama"
    make_tiny_model(cfg).save_pretrained(path)
    return open_source(path)


@pytest.mark.parametrize("name", ["embed.weight", "layers.0.attn.q.weight", "layers.0.mlp.down.weight",
                                  "head.weight"])
def test_warmstart_rule(wide_llama, name):
    lam, sigma = 0.4, 0.5
    source = wide_llama
    small = source.get(name).float()
    o, i = small.shape
    padded_only = Grower(source.config, GrowthSpec(2, method="warmstart", shrink=lam, perturb=0.0), source.get)
    exact = padded_only.full(name)
    assert torch.equal(exact[:o, :i], small * lam)  # shrunk block in place
    exact[:o, :i] = 0
    assert torch.count_nonzero(exact) == 0  # zero padding elsewhere

    grower = Grower(source.config, GrowthSpec(2, method="warmstart", shrink=lam, perturb=sigma, seed=5), source.get)
    grown = grower.full(name)
    expected_std = sigma * grower.init_std(name)
    outside = torch.cat([grown[o:].flatten(), grown[:o, i:].flatten()])
    assert abs(outside.std().item() / expected_std - 1) < 0.05
    assert abs(outside.mean().item()) < 0.1 * expected_std
    inside = grown[:o, :i] - lam * small  # the small region carries the same perturbation
    assert abs(inside.std().item() / expected_std - 1) < 0.05


def test_warmstart_init_std_follows_mup(wide_llama):
    grower = Grower(wide_llama.config, GrowthSpec(2, method="warmstart"), wide_llama.get)
    base = wide_llama.config.init_std
    assert grower.init_std("embed.weight") == base  # embeddings: width-independent
    assert grower.init_std("layers.0.attn.q.weight") == pytest.approx(base / 2**0.5)  # 1/fan_in variance
    assert grower.init_std("head.weight") == pytest.approx(base / 2)  # muP output: 1/fan_in^2 variance
    norm = grower.full("layers.0.attn_norm.weight")
    d = wide_llama.config.hidden_size
    assert torch.equal(norm[:d], wide_llama.get("layers.0.attn_norm.weight"))
    assert torch.equal(norm[d:], torch.ones(d))


def test_warmstart_pads_unit_offset_norms_with_zero(tiny_model_dirs):
    """Gemma's norms multiply by (1 + w): a fresh unit stores 0, not 1 (a 1 would double its output)."""
    source = open_source(tiny_model_dirs["gemma3-tied"])
    grower = Grower(source.config, GrowthSpec(2, method="warmstart"), source.get)
    d = source.config.hidden_size
    for name in ("layers.0.attn_norm.weight", "layers.0.attn_out_norm.weight", "final_norm.weight"):
        norm = grower.full(name)
        assert torch.equal(norm[:d], source.get(name).float())
        assert torch.equal(norm[d:], torch.zeros(d))
