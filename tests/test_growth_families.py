"""Function preservation across families, factors and HyperCloning variants (float32 logits)."""

from __future__ import annotations

import pytest
from conftest import tiny_hf_configs
from growth_helpers import grow_in_memory, max_rel_logit_error

from hyperclone_dist.growth.spec import GrowthSpec

TOL = 1e-5
VARIANTS = ["symmetric", "noisy", "diagonal", "noisy-diagonal"]
FACTORS = [(2, 1), (2, 2), (3, 1), (3, 2)]


@pytest.mark.parametrize("case", list(tiny_hf_configs()))
@pytest.mark.parametrize("method", VARIANTS)
@pytest.mark.parametrize("width,ffn", FACTORS)
def test_width_growth_preserves_logits(tiny_model_dirs, case, method, width, ffn):
    grower, grown = grow_in_memory(tiny_model_dirs[case], GrowthSpec(width, ffn, method=method, seed=3))
    small = grower.small
    assert grower.large.hidden_size == width * small.hidden_size
    assert grower.large.num_kv_heads == width * small.num_kv_heads
    assert grower.large.ffn_hidden_size == ffn * small.ffn_hidden_size
    assert not grower.large.tie_word_embeddings  # the head needs /n, the embedding does not
    assert max_rel_logit_error(tiny_model_dirs[case], grown) <= TOL


@pytest.mark.parametrize("method", ["noisy", "noisy-diagonal"])
def test_noise_is_really_there(tiny_model_dirs, method):
    """Noisy variants differ from the symmetric clone by the requested SNR, yet keep the logits."""
    path = tiny_model_dirs["llama-gqa2"]
    sym, _ = grow_in_memory(path, GrowthSpec(2, method="symmetric"))
    noisy, _ = grow_in_memory(path, GrowthSpec(2, method=method, snr_db=10))
    name = "layers.0.mlp.up.weight"
    signal = sym.full(name)
    delta = noisy.full(name) - signal
    if method == "noisy":  # noise power / block power = 10^(-SNR/10) = 0.1
        ratio = delta.pow(2).mean() / signal.pow(2).mean()
        assert 0.07 < ratio.item() < 0.13
    else:
        assert delta.abs().max() > 0.01
    # a differently seeded noisy clone is a different model computing the same function
    other, _ = grow_in_memory(path, GrowthSpec(2, method=method, seed=1))
    assert (other.full(name) - noisy.full(name)).abs().max() > 0
