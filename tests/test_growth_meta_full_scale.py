"""Full-size configs grown on the meta device: right HF names and shapes, no memory allocated."""

from __future__ import annotations

import pytest
import torch

from hyperclone_dist.checkpoint.hf_writer import plan_tensors
from hyperclone_dist.config import ModelConfig
from hyperclone_dist.growth.grow import Grower
from hyperclone_dist.growth.spec import GrowthSpec
from hyperclone_dist.hf_config import config_to_hf
from hyperclone_dist.params import canonical_shapes, parameter_count

LLAMA3_8B = ModelConfig(family="llama", vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32,
                        num_kv_heads=8, head_dim=128, ffn_hidden_size=14336, max_position_embeddings=8192,
                        norm="rmsnorm", norm_eps=1e-5, rotary_base=500000.0, tie_word_embeddings=False)
GPT2_XL = ModelConfig(family="gpt2", vocab_size=50257, hidden_size=1600, num_layers=48, num_heads=25,
                      num_kv_heads=25, head_dim=64, ffn_hidden_size=6400, max_position_embeddings=1024,
                      norm="layernorm", norm_bias=True, activation="gelu_new", gated_mlp=False,
                      position_embedding="learned", tie_word_embeddings=True, qkv_bias=True,
                      attn_out_bias=True, mlp_bias=True)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096


def _meta_source(cfg: ModelConfig):
    shapes = canonical_shapes(cfg)
    return lambda name: torch.empty(shapes[name], device="meta")


@pytest.mark.parametrize("small,expected_params", [(LLAMA3_8B, 8_030_261_248), (GPT2_XL, 1_557_611_200)],
                         ids=["llama3-8b", "gpt2-xl"])
def test_grow_full_scale_on_meta(small, expected_params):
    import transformers

    assert parameter_count(small) == expected_params
    before = _rss_bytes()
    grower = Grower(small, GrowthSpec(2, method="noisy"), _meta_source(small))
    grown = {name: grower.full(name) for name in grower.names()}
    assert all(t.is_meta for t in grown.values())
    assert all(tuple(t.shape) == grower.shapes[name] for name, t in grown.items())
    planned = {t.name: t.shape for t in plan_tensors(grower.large, {n: tuple(t.shape) for n, t in grown.items()},
                                                     torch.bfloat16)}
    assert _rss_bytes() - before < 64 * 2**20  # tens of GB if anything had been materialised

    # transformers itself, on meta, must build exactly these names and shapes from the grown config
    hf = config_to_hf(grower.large)
    hf.pop("architectures")
    hf_config = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert planned == expected
    grown_params = parameter_count(grower.large)
    assert grown_params == sum(p.numel() for p in model.parameters())
    assert 3.5 < grown_params / expected_params < 4.0  # x2 width: ~4x, less the un-widened vocab axis
