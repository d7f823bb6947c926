"""Checkpoints Megatron-LM wrote, as growth sources: no ``hyperclone_config`` in their args, the model
described by Megatron-LM's own arguments (hyperclone_dist/megatron/lm_config.py), the vocabulary by the
tokenizer they name (lm_vocab.py).

CI has no Megatron-LM tree: tests/mp_workers/megatron_lm_written.py writes checkpoints in Megatron-LM's
layout with megatron-core alone (legacy and torch_dist at TP2 and at PP2, TransformerEngine names, a release
and non-zero iterations; one model for each family they read as) with the logits of the GPTModel that wrote
them. Each is grown x2 to HF;
``hyperclone verify`` compares it with the source, and its logits are compared with that GPTModel's.
``test_real_megatron_lm`` does the same with Megatron-LM's own ``save_checkpoint`` when ``MEGATRON_LM``
points at its tree (tests/mp_workers/megatron_lm_real.py), run by ``MEGATRON_LM_PYTHON`` (default: this
interpreter), which must import six and triton as Megatron-LM's training package does.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from warm import hyperclone_in_process

from hyperclone_dist.errors import HypercloneError
from hyperclone_dist.megatron.lm_config import model_config_from_megatron_args
from hyperclone_dist.megatron.lm_vocab import true_vocab_size

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]  # the interpreter running the tests, whatever its venv
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
TOL = 1e-5
TEXTS = ["The quick brown fox jumps over the lazy dog.", "def f(x):\n    return x + 1",
         "Growing a model keeps the function it computes."] * 40

LLAMA = dict(num_layers=2, hidden_size=48, num_attention_heads=4, group_query_attention=True, num_query_groups=2,
             kv_channels=16, ffn_hidden_size=80, normalization="RMSNorm", swiglu=True, position_embedding_type="rope",
             rotary_base=500000, add_bias_linear=False, untie_embeddings_and_output_weights=True,
             layernorm_epsilon=1e-6, init_method_std=0.2, tokenizer_type="HuggingFaceTokenizer")
CASES = {  # name: (what the worker writes, the family it must read as)
    # Llama style at TP2: 4 heads in 2 query groups, kv_channels * heads != hidden; a release checkpoint
    "legacy-tp2-llama": (dict(format="torch", tp=2, pp=1, iteration="release", tokenizer="hf", args=LLAMA), "llama"),
    # the same under the TransformerEngine spec's names (norms fused into linear_qkv / linear_fc1)
    "legacy-tp2-llama-te": (dict(format="torch", tp=2, pp=1, iteration=250, tokenizer="hf", te_names=True,
                                 args=LLAMA), "llama"),
    # GPT-2 style over 2 stages: LayerNorm, gelu through the fused bias-gelu kernel (tanh), learned
    # positions, tied (the last stage's copy), every bias; NullTokenizer
    "legacy-pp2-gpt": (dict(format="torch", tp=1, pp=2, iteration=40, tokenizer="null",
                            args=dict(num_layers=4, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                                      add_bias_linear=True, init_method_std=0.2, tokenizer_type="NullTokenizer",
                                      vocab_size=99)), "gpt2"),
    # Qwen3 style torch_dist at TP2: per-head q/k norms, Llama 3 RoPE scaling, tied, no biases; sentencepiece
    "torch_dist-tp2-qwen3": (dict(format="torch_dist", tp=2, pp=1, iteration=12, tokenizer="sentencepiece",
                                  args=dict(num_layers=2, hidden_size=32, num_attention_heads=4,
                                            group_query_attention=True, num_query_groups=2, ffn_hidden_size=48,
                                            normalization="RMSNorm", swiglu=True, position_embedding_type="rope",
                                            qk_layernorm=True, use_rope_scaling=True, add_bias_linear=False,
                                            init_method_std=0.2, tokenizer_type="GPTSentencePieceTokenizer")),
                             "qwen3"),
    # a causal sliding window of 8 (window_size 7,0) shorter than the sequence, GQA; NullTokenizer
    "legacy-tp2-mistral": (dict(format="torch", tp=2, pp=1, iteration=3, tokenizer="null",
                                args=dict(LLAMA, hidden_size=32, kv_channels=None, window_size=[7, 0],
                                          tokenizer_type="NullTokenizer", vocab_size=99)), "mistral"),
    # QKV biases only (--add-qkv-bias with --disable-bias-linear)
    "torch_dist-tp2-qwen2": (dict(format="torch_dist", tp=2, pp=1, iteration=1, tokenizer="null",
                                  args=dict(LLAMA, add_qkv_bias=True, tokenizer_type="NullTokenizer",
                                            vocab_size=99)), "qwen2"),
    # learned positions without any bias: exact gelu (no fused bias-gelu), OPT's position table offset
    "torch_dist-pp2-opt": (dict(format="torch_dist", tp=1, pp=2, iteration=5, tokenizer="null",
                                args=dict(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                                          add_bias_linear=False, untie_embeddings_and_output_weights=True,
                                          init_method_std=0.2, tokenizer_type="NullTokenizer", vocab_size=99)),
                           "opt"),
    # RoPE on half of each head with LayerNorm, gelu and every bias: GPT-NeoX's serial residual
    "legacy-tp2-neox": (dict(format="torch", tp=2, pp=1, iteration=2, tokenizer="null",
                             args=dict(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                                       position_embedding_type="rope", rotary_percent=0.5, add_bias_linear=True,
                                       init_method_std=0.2, tokenizer_type="NullTokenizer", vocab_size=99)),
                        "gpt_neox"),
}


def make_tokenizers(root: Path) -> dict[str, tuple[str, int]]:
    """kind -> (tokenizer_model, its vocabulary size): a byte-level BPE saved as Hugging Face saves one, and a
    sentencepiece model trained by the project."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from hyperclone_dist.data.tokenizer import train_tokenizer_on_documents

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")
    fast.save_pretrained(root / "hf-tokenizer")
    sp = train_tokenizer_on_documents(TEXTS, root / "sp", vocab_size=300)
    return {"hf": (str(root / "hf-tokenizer"), len(fast)), "sentencepiece": (str(sp.model), sp.vocab_size)}


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    """Every case written by one 2-rank gloo job of the worker."""
    root = tmp_path_factory.mktemp("megatron_lm_written")
    tokenizers = make_tokenizers(root)
    cases = {}
    for name, (case, _) in CASES.items():
        case = json.loads(json.dumps(case))
        if case["tokenizer"] == "null":
            case["tokenizer_vocab"] = case["args"]["vocab_size"] + 1
        else:
            case["args"]["tokenizer_model"], case["tokenizer_vocab"] = tokenizers[case["tokenizer"]]
        cases[name] = case
    (root / "plan.json").write_text(json.dumps({"out": str(root), "cases": cases}))
    proc = subprocess.run([*TORCHRUN, "--standalone", "--nproc_per_node", "2",
                           str(REPO / "tests" / "mp_workers" / "megatron_lm_written.py"), str(root / "plan.json")],
                          env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root


def grow_and_check(ckpt: Path, reference: Path, out: Path) -> tuple[float, float]:
    """Grow ``ckpt`` x2 to HF; (max rel logit diff that ``hyperclone verify`` reports against the source, max
    rel diff of the grown model's logits from those of the GPTModel that wrote the checkpoint)."""
    from hyperclone_dist.hf_model import load_hf_model

    proc = hyperclone_in_process("convert", ckpt, "--out", out, "--width-factor", "2", "--method", "noisy",
                                 "--dtype", "float32", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    proc = hyperclone_in_process("verify", ckpt, out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    verified = float(re.search(r"max rel ([0-9.e+-]+)", proc.stdout).group(1))
    want = torch.load(reference)
    with torch.no_grad():
        got = load_hf_model(out)(want["tokens"]).logits[..., : want["logits"].shape[-1]]
    return verified, float((got.double() - want["logits"].double()).abs().max() / want["logits"].abs().max())


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_megatron_lm_checkpoint_grows_exactly(written, name, tmp_path):
    from hyperclone_dist.sources import open_source

    family = CASES[name][1]
    source = open_source(written / name / "ckpt")
    assert source.config.family == family
    plan = json.loads((written / "plan.json").read_text())["cases"][name]
    assert source.config.vocab_size == plan["tokenizer_vocab"]  # the tokenizer's, padding dropped
    verified, against_megatron = grow_and_check(written / name / "ckpt", written / name / "reference.pt",
                                                tmp_path / "grown")
    print(f"{name}: verify max rel {verified:.2e}, grown vs megatron-core GPTModel max rel {against_megatron:.2e}")
    assert verified <= TOL
    assert against_megatron <= TOL


@pytest.mark.slow
def test_refused_megatron_lm_model_is_one_line(written, tmp_path):
    """A mixture-of-experts Megatron-LM checkpoint: convert says which argument, in one line, exit 2."""

    ckpt = tmp_path / "moe"
    shutil.copytree(written / "legacy-pp2-gpt" / "ckpt", ckpt)
    for file in ckpt.glob("iter_*/mp_rank_*/model_optim_rng.pt"):
        payload = torch.load(file, weights_only=False)
        payload["args"].num_experts = 8
        torch.save(payload, file)
    proc = hyperclone_in_process("convert", ckpt, "--out", tmp_path / "out", "--width-factor", "2")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "num_experts=8" in proc.stderr, proc.stderr


def megatron_lm_namespace(**changes) -> argparse.Namespace:
    """A Llama-style Megatron-LM Namespace (the fields lm_config reads, and some it does not)."""
    values = dict(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=96, kv_channels=16,
                  group_query_attention=False, num_query_groups=1, max_position_embeddings=32,
                  padded_vocab_size=128, tokenizer_type="NullTokenizer", vocab_size=99, normalization="RMSNorm",
                  swiglu=True, position_embedding_type="rope", add_bias_linear=False, add_qkv_bias=False,
                  bias_gelu_fusion=True, lr=3e-4, seed=1234, micro_batch_size=1, transformer_impl="local")
    return argparse.Namespace(**{**values, **changes})


@pytest.mark.parametrize("changes, family", [
    ({}, "llama"),
    ({"add_qkv_bias": True}, "qwen2"),
    ({"add_bias_linear": True, "add_qkv_bias": True}, "llama"),
    ({"qk_layernorm": True}, "qwen3"),
    ({"window_size": (7, 0)}, "mistral"),
    ({"normalization": "LayerNorm", "swiglu": False, "position_embedding_type": "learned_absolute",
      "add_bias_linear": True}, "gpt2"),
    ({"normalization": "LayerNorm", "swiglu": False, "position_embedding_type": "learned_absolute"}, "opt"),
    ({"normalization": "LayerNorm", "swiglu": False, "add_bias_linear": True, "rotary_percent": 0.5}, "gpt_neox"),
])
def test_family_of_megatron_lm_model(changes, family):
    cfg = model_config_from_megatron_args(megatron_lm_namespace(**changes))
    assert cfg.family == family
    assert cfg.vocab_size == 100  # NullTokenizer: vocab_size plus its end-of-document id


def test_activation_follows_megatron_cores_kernel():
    """With biases, megatron-core runs gelu through its fused bias-gelu kernel, the tanh approximation."""
    gpt = dict(normalization="LayerNorm", swiglu=False, position_embedding_type="learned_absolute",
               add_bias_linear=True)
    assert model_config_from_megatron_args(megatron_lm_namespace(**gpt)).activation == "gelu_fast"
    unfused = megatron_lm_namespace(**gpt, bias_gelu_fusion=False)
    assert model_config_from_megatron_args(unfused).activation == "gelu"


def test_llama3_rope_scaling_and_window():
    cfg = model_config_from_megatron_args(megatron_lm_namespace(use_rope_scaling=True, rope_scaling_factor=8.0))
    assert cfg.hf_extra["rope_parameters"]["rope_type"] == "llama3"
    assert model_config_from_megatron_args(megatron_lm_namespace(window_size=(15, 0))).hf_extra == {
        "sliding_window": 16}


@pytest.mark.parametrize("changes, named", [
    ({"num_experts": 8}, "num_experts=8"),
    ({"multi_latent_attention": True}, "multi_latent_attention"),
    ({"squared_relu": True, "swiglu": False}, "squared_relu"),
    ({"quick_geglu": True, "swiglu": False}, "quick_geglu"),
    ({"layernorm_zero_centered_gamma": True}, "layernorm_zero_centered_gamma"),
    ({"rotary_interleaved": True}, "rotary_interleaved"),
    ({"heterogeneous_layers_config_path": "layers.json"}, "heterogeneous"),
    ({"is_hybrid_model": True}, "is_hybrid_model"),
    ({"use_legacy_models": True}, "use_legacy_models"),
    ({"transformer_impl": "inference_optimized"}, "transformer_impl"),
    ({"mtp_num_layers": 1}, "mtp_num_layers"),
    ({"use_rope_scaling": True, "rope_scaling_factor": 32.0}, "rope_scaling_factor=32.0"),
    ({"rotary_seq_len_interpolation_factor": 4}, "rotary_seq_len_interpolation_factor=4"),
    ({"position_embedding_type": "mrope"}, "position_embedding_type='mrope'"),
    ({"window_size": (7, 3)}, "window_size"),
    ({"normalization": "LayerNorm"}, "LayerNorm"),  # swiglu with LayerNorm: no family
    ({"rotary_percent": 0.5}, "rotary_percent=0.5"),
    ({"num_layers": None}, "num_layers"),
])
def test_unexpressible_megatron_lm_model_is_refused_naming_it(changes, named):
    with pytest.raises(HypercloneError) as err:
        model_config_from_megatron_args(megatron_lm_namespace(**changes), "ckpt")
    assert named in str(err.value) and "\n" not in str(err.value)


def test_vocab_from_tokenizer_or_every_padded_row(tmp_path):
    from hyperclone_dist.data.tokenizer import train_tokenizer_on_documents

    sp = train_tokenizer_on_documents(TEXTS, tmp_path / "sp", vocab_size=300)
    spm = megatron_lm_namespace(tokenizer_type="Llama2Tokenizer", tokenizer_model=str(sp.model), vocab_size=None,
                                padded_vocab_size=384)
    assert true_vocab_size(spm) == 300
    vocab = tmp_path / "vocab.json"
    vocab.write_text(json.dumps({f"t{k}": k for k in range(257)}))
    assert true_vocab_size(megatron_lm_namespace(tokenizer_type="GPT2BPETokenizer", vocab_file=str(vocab),
                                                 padded_vocab_size=384)) == 257
    moved = megatron_lm_namespace(tokenizer_type="HuggingFaceTokenizer", tokenizer_model="/gone/tokenizer",
                                  padded_vocab_size=384)
    assert true_vocab_size(moved) == 384  # unreadable here: every row kept, nothing guessed
    with pytest.raises(HypercloneError, match="300 tokens but the embedding only 256 rows"):
        true_vocab_size(megatron_lm_namespace(tokenizer_type="Llama2Tokenizer", tokenizer_model=str(sp.model),
                                              padded_vocab_size=256), "ckpt")


MEGATRON_LM = os.environ.get("MEGATRON_LM", "")
# Megatron-LM's training package imports six and triton: the interpreter that can run it, as in
# tests/test_megatron_lm_interop.py
MEGATRON_LM_PYTHON = os.environ.get("MEGATRON_LM_PYTHON", sys.executable)
CPU_FLAGS = ["--transformer-impl", "local", "--no-persist-layer-norm", "--no-masked-softmax-fusion",
             "--no-gradient-accumulation-fusion", "--no-rope-fusion", "--use-cpu-initialization",
             "--distributed-backend", "gloo", "--seq-length", "16", "--micro-batch-size", "1", "--lr", "1e-4",
             "--train-iters", "10", "--init-method-std", "0.2", "--max-position-embeddings", "32"]
REAL_MODELS = {  # name: (Megatron-LM flags, tokenizer, saves, family)
    "llama-tp2": (["--num-layers", "2", "--hidden-size", "48", "--num-attention-heads", "4", "--group-query-attention",
                   "--num-query-groups", "2", "--kv-channels", "16", "--ffn-hidden-size", "80", "--swiglu",
                   "--normalization", "RMSNorm", "--position-embedding-type", "rope", "--rotary-base", "500000",
                   "--disable-bias-linear", "--untie-embeddings-and-output-weights", "--norm-epsilon", "1e-6",
                   "--tensor-model-parallel-size", "2", "--tokenizer-type", "HuggingFaceTokenizer"], "hf",
                  [dict(format="torch", dir="legacy", iteration=7), dict(format="torch_dist", dir="torch_dist",
                                                                          iteration=9)], "llama"),
    # Megatron-LM's defaults: LayerNorm, gelu (fused with the bias), learned positions, tied, every bias
    "gpt-pp2": (["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4",
                 "--pipeline-model-parallel-size", "2", "--tokenizer-type", "NullTokenizer", "--vocab-size", "99"],
                "null", [dict(format="torch", dir="legacy", iteration=0, release=True),
                         dict(format="torch_dist", dir="torch_dist", iteration=3)], "gpt2"),
}


@pytest.mark.slow
@pytest.mark.skipif(not (Path(MEGATRON_LM) / "megatron" / "training" / "checkpointing.py").is_file(),
                    reason="MEGATRON_LM does not point at a Megatron-LM tree (tag core_v0.16.1): the checkpoints "
                           "its own save_checkpoint writes are grown only with one")
def test_real_megatron_lm(tmp_path):
    from hyperclone_dist.sources import open_source

    tokenizers = make_tokenizers(tmp_path)
    models = {}
    for name, (flags, tokenizer, saves, _) in REAL_MODELS.items():
        vocab = 100 if tokenizer == "null" else tokenizers[tokenizer][1]
        extra = [] if tokenizer == "null" else ["--tokenizer-model", tokenizers[tokenizer][0]]
        models[name] = {"flags": [*CPU_FLAGS, *flags, *extra], "tokenizer_vocab": vocab, "saves": saves}
    (tmp_path / "plan.json").write_text(json.dumps({"out": str(tmp_path), "models": models}))
    env = {**ENV, "PYTHONPATH": os.pathsep.join(filter(None, [MEGATRON_LM, ENV.get("PYTHONPATH")]))}
    proc = subprocess.run([MEGATRON_LM_PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(REPO / "tests" / "mp_workers" / "megatron_lm_real.py"), str(tmp_path / "plan.json")],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-6000:]
    for name, (_, _, saves, family) in REAL_MODELS.items():
        for save in saves:
            ckpt = tmp_path / name / save["dir"]
            config = open_source(ckpt).config
            assert (config.family, config.vocab_size) == (family, models[name]["tokenizer_vocab"])
            verified, against = grow_and_check(ckpt, tmp_path / name / "reference.pt", tmp_path / name / "grown")
            print(f"Megatron-LM {name} {save['dir']}: verify max rel {verified:.2e}, grown vs Megatron-LM's model "
                  f"max rel {against:.2e}")
            assert verified <= TOL and against <= TOL
            shutil.rmtree(tmp_path / name / "grown")
