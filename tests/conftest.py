"""Shared fixtures: tiny seeded models built with transformers' own classes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("HYPERCLONE_CACHE", str(REPO / ".cache" / "hyperclone"))  # tokenized default corpus
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The longest modules, longest first (`pytest --durations`, 2026-12-02: 290 s down to ~20 s each). pytest-xdist's
# loadscope hands modules to its two workers in collection order, so starting with these leaves the short
# ones to fill in at the end, instead of one worker running a long module alone while the other is idle.
# Only the wall time depends on it.
LONGEST_FIRST = ["test_real_models", "test_pretrain_layouts", "test_recipes", "test_pretrain_multinode",
                 "test_crash_safety", "test_megatron_convert", "test_megatron_lm_sources", "test_grown_optimizer",
                 "test_megatron_runtime", "test_megatron_lm_args", "test_hf_tokenizer", "test_ecosystem_readers"]


def pytest_collection_modifyitems(items: list) -> None:
    rank = {name: k for k, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(Path(str(item.path)).stem, len(rank)))  # stable: the rest keep their order


def _transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


# Llama 3.1's RoPE scaling (megatron-core's RotaryEmbedding hard-codes these low/high factors and 8192)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "rope_theta": 500000.0}


def tiny_hf_configs() -> dict:
    """One HF config per case the growth rules must get right (biases, GQA/MQA, ties, LN/RMSNorm,
    learned/rotary/partial-rotary positions, RoPE scaling, parallel residual, post-LN, q/k norms per
    head and per projection, (1 + w) norms, sandwich and output norms, a sqrt(hidden)-scaled embedding,
    soft-capping, sliding and global layers with their own RoPE bases)."""
    T = _transformers()
    common = dict(vocab_size=64, max_position_embeddings=32)
    llama = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                 head_dim=6, **common)
    return {
        "gpt2-tied": T.GPT2Config(n_embd=24, n_layer=2, n_head=2, n_positions=32, vocab_size=64,
                                  tie_word_embeddings=True),
        "gpt2-untied": T.GPT2Config(n_embd=24, n_layer=2, n_head=3, n_inner=40, n_positions=32,
                                    vocab_size=64, tie_word_embeddings=False, activation_function="gelu"),
        "llama-gqa2": T.LlamaConfig(num_key_value_heads=2, tie_word_embeddings=False, **llama),
        "llama-mqa-tied-bias": T.LlamaConfig(num_key_value_heads=1, tie_word_embeddings=True,
                                             attention_bias=True, mlp_bias=True, **llama),
        "mistral-gqa2": T.MistralConfig(num_key_value_heads=2, sliding_window=8, **llama),
        "mistral-mqa": T.MistralConfig(num_key_value_heads=1, **llama),
        "qwen2-tied": T.Qwen2Config(num_key_value_heads=2, tie_word_embeddings=True,
                                    **{k: v for k, v in llama.items() if k != "head_dim"}),
        "llama-rope-llama3": T.LlamaConfig(num_key_value_heads=2, **llama, rope_parameters=LLAMA3_ROPE),
        "llama-rope-linear": T.LlamaConfig(num_key_value_heads=2, tie_word_embeddings=True, **llama,
                                           rope_parameters={"rope_type": "linear", "factor": 4.0,
                                                            "rope_theta": 10000.0}),
        "qwen3": T.Qwen3Config(num_key_value_heads=2, tie_word_embeddings=False, **llama),
        "qwen3-tied": T.Qwen3Config(num_key_value_heads=1, tie_word_embeddings=True, **llama),
        "gemma-tied": T.GemmaConfig(num_key_value_heads=1, **llama),
        "gemma2-softcap": T.Gemma2Config(num_key_value_heads=2, tie_word_embeddings=False, sliding_window=8,
                                         attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
                                         query_pre_attn_scalar=8, **llama),
        "gemma3-tied": T.Gemma3TextConfig(num_key_value_heads=2, sliding_window=8, query_pre_attn_scalar=6,
                                          layer_types=["sliding_attention", "full_attention"],
                                          rope_parameters={
                                              "sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
                                              "full_attention": {"rope_type": "linear", "factor": 2.0,
                                                                 "rope_theta": 1000.0}}, **llama),
        "olmo2": T.Olmo2Config(num_key_value_heads=2, **{k: v for k, v in llama.items() if k != "head_dim"}),
        "olmo2-tied": T.Olmo2Config(num_key_value_heads=1, tie_word_embeddings=True,
                                    **{k: v for k, v in llama.items() if k != "head_dim"}),
        "opt": T.OPTConfig(hidden_size=24, ffn_dim=40, num_hidden_layers=2, num_attention_heads=2,
                           word_embed_proj_dim=24, **common),
        "opt-postln": T.OPTConfig(hidden_size=24, ffn_dim=40, num_hidden_layers=2, num_attention_heads=2,
                                  word_embed_proj_dim=24, do_layer_norm_before=False, **common),
        "gpt_neox": T.GPTNeoXConfig(hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                                    num_attention_heads=2, rotary_pct=0.5, **common),
        "gpt_neox-serial": T.GPTNeoXConfig(hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                                           num_attention_heads=2, use_parallel_residual=False, **common),
    }


def make_tiny_model(hf_config, seed: int = 0):
    """An HF model with every parameter randomised (norm gains around 1, non-zero biases), so that a
    wrong rule for any tensor kind changes the logits."""
    T = _transformers()
    for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout", "attention_dropout", "hidden_dropout"):
        if hasattr(hf_config, key):
            setattr(hf_config, key, 0.0)
    hf_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(hf_config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if p.dim() == 1 and "norm" in name or name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.copy_(1.0 + 0.2 * noise)
            elif p.dim() == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.15 * noise)
    return model


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Each tiny config saved once as an HF directory (safetensors)."""
    root = tmp_path_factory.mktemp("tiny_hf")
    dirs = {}
    for name, cfg in tiny_hf_configs().items():
        model = make_tiny_model(cfg)
        model.save_pretrained(root / name)
        dirs[name] = root / name
    return dirs


@pytest.fixture(scope="session")
def builtin_small_pt(tmp_path_factory) -> Path:
    """The built-in small model with seeded random weights, as small.pt (read only by the tests)."""
    from hyperclone_dist.builtin import BUILTIN, random_state_dict
    from hyperclone_dist.checkpoint import small_pt

    path = tmp_path_factory.mktemp("small") / "small.pt"
    small_pt.save(path, BUILTIN, random_state_dict(BUILTIN, seed=0))
    return path
