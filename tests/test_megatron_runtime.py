"""megatron-core runtime: the ModelConfig -> TransformerConfig mapping, refusals, and one real 4-rank gloo
job (tests/mp_workers/megatron_equivalence.py) showing that the same weights give the same logits, loss and
gradients at TP1×PP1, TP2×PP2, TP4×PP1, TP1×PP4 and interleaved PP2×VPP2, with weights moved between
layouts by megatron's own dist_checkpointing."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hyperclone_dist.config import ModelConfig
from hyperclone_dist.errors import HypercloneError
from hyperclone_dist.layout import Layout, padded_vocab_size
from hyperclone_dist.megatron.model import gelu_new, hf_position_rows, transformer_config

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "mp_workers" / "megatron_equivalence.py"
TORCHRUN = Path(sys.executable).with_name("torchrun")
LAUNCH = [str(TORCHRUN)] if TORCHRUN.exists() else [sys.executable, "-m", "torch.distributed.run"]


def _load_worker():
    spec = importlib.util.spec_from_file_location("megatron_equivalence", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # definitions only: the job itself sits behind __main__
    return module


worker = _load_worker()
LAYOUTS = ("tp1pp1", *worker.LAYOUTS)
MODELS = tuple(worker.MODELS)
LOGITS_TOL = 1e-5  # max |logits - reference| / max |reference|
GRAD_TOL = 1e-4  # gradients sum over more terms in different orders at different layouts

LLAMA = ModelConfig(family="llama", vocab_size=100, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
                    head_dim=16, ffn_hidden_size=96, max_position_embeddings=32)
GPT2 = ModelConfig(family="gpt2", vocab_size=100, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=4,
                   head_dim=8, ffn_hidden_size=128, max_position_embeddings=32, norm="layernorm",
                   norm_bias=True, activation="gelu_new", gated_mlp=False, position_embedding="learned",
                   tie_word_embeddings=True, qkv_bias=True, attn_out_bias=True, mlp_bias=True)


@pytest.fixture(scope="module")
def equivalence(tmp_path_factory) -> list[dict]:
    """One torchrun job, 4 gloo ranks; each rank's measurements, as the worker gathered them."""
    workdir = tmp_path_factory.mktemp("megatron_equivalence")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [*LAUNCH, "--standalone", "--nproc_per_node", "4", str(WORKER), "--workdir", str(workdir)]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (
        f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads((workdir / "results.json").read_text())


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("model", MODELS)
def test_layouts_reproduce_tp1pp1(equivalence, model, layout):
    ranks = [rank["models"][model][layout] for rank in equivalence]
    last_stage = [r for r in ranks if r["logits_rel_err"] is not None]
    assert last_stage, "no rank returned logits"
    for r in last_stage:
        assert r["logits_rel_err"] <= LOGITS_TOL, (r["rank"], r["logits_rel_err"])
        assert r["loss_rel_err"] <= LOGITS_TOL, (r["rank"], r["loss_rel_err"])
    seen = {name for r in ranks for name in r["grad_rel_err"]}
    assert seen == set(worker.GRAD_PROBES), f"gradients measured: {sorted(seen)}"
    for r in ranks:
        for name, err in r["grad_rel_err"].items():
            assert err <= GRAD_TOL, (r["rank"], name, err)


def test_reference_is_not_degenerate(equivalence):
    for model in MODELS:
        reference = equivalence[0]["models"][model]["reference"]
        assert reference["logits_std"] > 0.5 and reference["loss"] > 0.1, (model, reference)


def test_bad_layout_is_one_line_error(equivalence):
    assert equivalence[0]["bad_layout_error"] == "world size 4 is not divisible by tp x pp = 3 x 1 = 3"


def test_learned_position_p_reads_row_p(equivalence):
    assert equivalence[0]["learned_positions"] == {
        "rows": worker.SEQ, "last_row_only_last_position": True, "first_row_reaches_position_0": True}


def test_opt_offset_rows_are_dropped_exactly():
    """HF OPT reads row p + 2 for position p of an unpadded sequence, so megatron's table (position p reads
    row p) must hold HF rows [2, 2 + max_position_embeddings)."""
    from transformers.models.opt.modeling_opt import OPTLearnedPositionalEmbedding

    opt = GPT2.replace(family="opt", activation="relu", position_offset=2, max_position_embeddings=16)
    hf_table = OPTLearnedPositionalEmbedding(16, 8)
    assert hf_table.weight.shape[0] == 18
    rows = hf_position_rows(opt)
    assert (rows.start, rows.stop) == (2, 18)
    with torch.no_grad():
        assert torch.equal(hf_table(torch.ones(1, 16, dtype=torch.long))[0], hf_table.weight[rows])


def test_cpu_shims_are_idempotent(equivalence):
    for rank in equivalence:
        assert rank["shims"] == {"applied": True, "unchanged": True, "tracker": "CpuRNGStatesTracker"}


def test_llama_mapping():
    config = transformer_config(LLAMA, Layout(tp=2, pp=2))
    assert (config.num_attention_heads, config.num_query_groups, config.kv_channels) == (4, 2, 16)
    assert (config.normalization, config.layernorm_epsilon) == ("RMSNorm", 1e-5)
    assert config.gated_linear_unit and config.activation_func is torch.nn.functional.silu
    assert not config.add_bias_linear and not config.add_qkv_bias
    assert config.hidden_dropout == config.attention_dropout == 0.0
    assert config.window_size is None and not config.rotary_interleaved
    assert config.params_dtype == config.pipeline_dtype == torch.float32


def test_gpt2_mapping_and_gelu_new_is_hf_bit_for_bit():
    from transformers.activations import NewGELUActivation

    config = transformer_config(GPT2, Layout(tp=1, pp=2, vpp=2))
    assert config.normalization == "LayerNorm" and not config.gated_linear_unit
    assert config.add_bias_linear and config.activation_func is gelu_new
    assert config.virtual_pipeline_model_parallel_size == 2 and config.batch_p2p_comm is False
    x = torch.linspace(-6, 6, 10001)
    torch.tanh(x)  # the first MKL tanh on a fresh OpenMP worker thread can round its chunk differently
    assert torch.equal(gelu_new(x), NewGELUActivation()(x))


def test_qkv_only_bias_maps_to_add_qkv_bias():
    config = transformer_config(LLAMA.replace(family="qwen2", qkv_bias=True))
    assert config.add_qkv_bias and not config.add_bias_linear


@pytest.mark.parametrize("changes, why", [
    (dict(parallel_residual=True), "parallel residual"),
    (dict(pre_norm=False), "post-LN"),
    (dict(attn_out_bias=True), "biases"),
    (dict(qkv_bias=True, mlp_bias=True), "biases"),
    (dict(norm="layernorm", norm_bias=False), "LayerNorm always has a bias"),
    (dict(activation="gelu_10"), "activation"),
    (dict(hf_extra={"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}), "RoPE scaling"),
    (dict(hf_extra={"word_embed_proj_dim": 16}), "project_in"),
    (dict(hf_extra={"sliding_window": 8, "layer_types": ["full_attention", "sliding_attention"] * 2}),
     "only some layers"),
])
def test_unrepresentable_configs_are_refused(changes, why):
    with pytest.raises(HypercloneError, match=why):
        transformer_config(LLAMA.replace(**changes))


@pytest.mark.parametrize("changes, why", [
    (dict(tp=3), r"attention heads \(4\) are not divisible by tp=3: this model allows --tp in \{1, 2, 4\}"),
    (dict(pp=3), r"layers \(4\) are not divisible by pp x vpp = 3 x 1 = 3: this model allows --pp in \{1, 2, 4\}"),
    (dict(pp=2, vpp=4), r"layers \(4\) are not divisible by pp x vpp = 2 x 4 = 8"),
])
def test_layouts_the_model_cannot_split_are_refused(changes, why):
    with pytest.raises(HypercloneError, match=why):
        transformer_config(LLAMA, Layout(**{"tp": 1, "pp": 1, **changes}))


def test_sliding_window_means_the_last_w_positions():
    """HF (Mistral sliding_window=W): query i sees keys j with i - W < j <= i; megatron window (W-1, 0)."""
    from megatron.core.transformer.utils import get_sliding_window_causal_mask

    from hyperclone_dist.megatron.cpu_shims import cuda_to_cpu

    window, seq = 4, 10
    assert transformer_config(LLAMA.replace(hf_extra={"sliding_window": window})).window_size == (3, 0)
    with cuda_to_cpu():
        masked = get_sliding_window_causal_mask(seq, seq, (window - 1, 0)).cpu()
    i, j = torch.meshgrid(torch.arange(seq), torch.arange(seq), indexing="ij")
    assert torch.equal(~masked, (j <= i) & (j > i - window))


def test_padded_vocab_size():
    assert padded_vocab_size(100, 1) == 128 and padded_vocab_size(100, 4) == 512
    assert padded_vocab_size(50257, 2, divisible_by=128) == 50432
