"""A checkpoint Megatron-LM wrote, described as our ModelConfig from the argument Namespace it saved.

    cfg = model_config_from_megatron_args(args, where=ckpt_dir)

The inverse of how Megatron-LM (core_v0.16.1) builds its GPTModel from those arguments: every
TransformerConfig field the Namespace carries is copied into the config (``core_transformer_config_from_args``),
``--swiglu`` makes the MLP a gated SiLU, and ``gpt_builders.gpt_builder`` passes the vocabulary, positions,
RoPE and tying arguments to GPTModel. The family is the Hugging Face one that computes the same function:

| Megatron-LM model                                    | family   |
|------------------------------------------------------|----------|
| rope, RMSNorm, swiglu, no biases or all biases       | llama    |
| ... with QKV biases only (``--add-qkv-bias``)        | qwen2    |
| ... with ``--qk-layernorm`` (no biases)              | qwen3    |
| ... with ``--window-size W-1,0`` (no biases)         | mistral (``sliding_window=W``) |
| learned positions, LayerNorm, gelu, all biases       | gpt2     |
| ... no biases (``--disable-bias-linear``)            | opt      |
| rope, LayerNorm, gelu, all biases                    | gpt_neox (serial residual) |

A non-gated gelu with biases runs megatron-core's fused bias-gelu kernel unless ``--no-bias-gelu-fusion``: that
kernel is the tanh approximation, HF's ``gelu_fast``; otherwise it is the exact (erf) ``gelu``. Anything else a
Megatron-LM model can have is refused in one line naming the argument (``_REFUSED`` and the family checks).
The vocabulary size is the tokenizer's (megatron/lm_vocab.py); rows past it are Megatron-LM's padding.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from hyperclone_dist.config import ModelConfig
from hyperclone_dist.errors import HypercloneError
from hyperclone_dist.megatron.lm_vocab import true_vocab_size

# Arguments that give a Megatron-LM GPTModel something none of our families computes, with the values that
# leave the model plain (None: the argument is absent from older Namespaces, or unset).
_REFUSED: dict[str, tuple[tuple[Any, ...], str]] = {
    "use_legacy_models": ((False, None), "megatron.legacy's GPTModel (other modules and names)"),
    "spec": ((None,), "a custom layer spec"),
    "yaml_cfg": ((None,), "a model described in a YAML file, not by these arguments"),
    "num_experts": ((None, 0), "mixture of experts"),
    "multi_latent_attention": ((False, None), "multi-latent attention"),
    "experimental_attention_variant": ((None,), "an experimental attention variant"),
    "heterogeneous_layers_config_path": ((None,), "heterogeneous layers"),
    "heterogeneous_layers_config_encoded_json": ((None,), "heterogeneous layers"),
    "is_hybrid_model": ((False, None), "a hybrid (Mamba) model"),
    "hybrid_override_pattern": ((None,), "a hybrid (Mamba) model"),
    "mtp_num_layers": ((None, 0), "multi-token prediction layers"),
    "squared_relu": ((False, None), "the squared-ReLU activation"),
    "quick_geglu": ((False, None), "the quick-GeGLU activation"),
    "use_te_activation_func": ((False, None), "TransformerEngine's activation kernels"),
    "glu_linear_offset": ((0.0, None), "an offset added to the GLU's linear half"),
    "activation_func_clamp_value": ((None,), "a clamped activation"),
    "layernorm_zero_centered_gamma": ((False, None), "(1 + w) norms (--apply-layernorm-1p)"),
    "apply_layernorm_1p": ((False, None), "(1 + w) norms"),
    "apply_residual_connection_post_layernorm": ((False, None), "the residual taken after the norm"),
    "rotary_interleaved": ((False, None), "interleaved RoPE (HF rotates halves)"),
    "no_rope_freq": ((None,), "layers without RoPE"),
    "window_attn_skip_freq": ((None,), "full-attention layers between sliding-window ones"),
    "qk_l2_norm": ((False, None), "L2-normalised queries and keys"),
    "attention_output_gate": ((False, None), "a gate on the attention output"),
    "softmax_type": (("vanilla", None), "a softmax with extra logits"),
    "softmax_scale": ((None,), "an attention scale other than 1/sqrt(kv_channels)"),
    "transformer_impl": (("local", "transformer_engine", None), "an inference-optimized layer spec"),
    "pipeline_model_parallel_layout": ((None,), "a custom pipeline layout"),
    "account_for_embedding_in_pipeline_split": ((False, None), "the embedding counted as a pipeline layer"),
    "account_for_loss_in_pipeline_split": ((False, None), "the loss counted as a pipeline layer"),
}
_REQUIRED = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "padded_vocab_size",
             "max_position_embeddings")
# megatron-core's RotaryEmbedding applies Llama 3.x scaling with these constants; GPTModel's factor is 8
_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8192}


def model_config_from_megatron_args(args: argparse.Namespace, where: str | Path = "the checkpoint") -> ModelConfig:
    """Our description of the GPTModel Megatron-LM builds from ``args``; a model none of our families computes
    is a one-line HypercloneError naming ``where`` and the argument."""
    if not isinstance(args, argparse.Namespace):
        raise HypercloneError(f"{where} has no model description: neither our args.hyperclone_config nor "
                              f"Megatron-LM's arguments (args is {type(args).__name__})")

    def refuse(why: str):
        raise HypercloneError(f"{where} (a Megatron-LM checkpoint): {why}")

    missing = [name for name in _REQUIRED if getattr(args, name, None) is None]
    if missing:
        refuse(f"its args lack {', '.join(missing)} (not a Megatron-LM GPT checkpoint)")
    for name, (plain, what) in _REFUSED.items():
        value = getattr(args, name, None)
        if value not in plain:
            refuse(f"Megatron-LM argument {name}={value!r} means {what}, which none of our families computes")
    heads, hidden = int(args.num_attention_heads), int(args.hidden_size)
    groups = int(args.num_query_groups) if getattr(args, "group_query_attention", False) else heads
    values = dict(
        hidden_size=hidden,
        num_layers=int(args.num_layers),
        num_heads=heads,
        num_kv_heads=groups,
        head_dim=int(getattr(args, "kv_channels", None) or hidden // heads),
        ffn_hidden_size=int(args.ffn_hidden_size),  # per branch when gated, as ours
        max_position_embeddings=int(args.max_position_embeddings),
        norm_eps=float(getattr(args, "layernorm_epsilon", 1e-5)),  # Megatron-LM's name for --norm-epsilon
        tie_word_embeddings=not getattr(args, "untie_embeddings_and_output_weights", False),
        init_std=float(getattr(args, "init_method_std", 0.02)),
    )
    family, implied, extra = _family(args, values, refuse)
    vocab = true_vocab_size(args, where)  # may read the tokenizer: only once the model is known to fit
    return ModelConfig(family=family, vocab_size=vocab, **values, **implied, hf_extra=extra)


def _activation(args: argparse.Namespace) -> str:
    """HF's name for the MLP activation megatron-core runs (mlp.py): the fused bias-gelu kernel is the tanh
    approximation; unfused, F.gelu is the exact one."""
    if getattr(args, "swiglu", False):
        return "silu"
    fused = getattr(args, "bias_gelu_fusion", True) and getattr(args, "add_bias_linear", True)  # parser defaults
    return "gelu_fast" if fused else "gelu"


def _family(args: argparse.Namespace, values: dict, refuse) -> tuple[str, dict, dict]:
    """(family, ModelConfig fields the family fixes, hf_extra) of the table in the module docstring."""
    positions = getattr(args, "position_embedding_type", "learned_absolute")
    norm = getattr(args, "normalization", "LayerNorm")
    gated = bool(getattr(args, "swiglu", False))
    all_bias = bool(getattr(args, "add_bias_linear", True))
    qkv_bias = all_bias or bool(getattr(args, "add_qkv_bias", False))
    qk_norm = bool(getattr(args, "qk_layernorm", False))
    window = getattr(args, "window_size", None)
    rotary_percent = float(getattr(args, "rotary_percent", 1.0))
    if positions not in ("rope", "learned_absolute"):
        refuse(f"Megatron-LM argument position_embedding_type={positions!r}: our families have learned "
               "absolute positions or RoPE")
    if norm not in ("RMSNorm", "LayerNorm"):
        refuse(f"Megatron-LM argument normalization={norm!r}")
    fields: dict[str, Any] = dict(
        norm="rmsnorm" if norm == "RMSNorm" else "layernorm", norm_bias=norm == "LayerNorm", gated_mlp=gated,
        activation=_activation(args), qkv_bias=qkv_bias, attn_out_bias=all_bias, mlp_bias=all_bias,
        position_embedding="rope" if positions == "rope" else "learned")
    extra: dict[str, Any] = {}
    if positions == "rope":
        fields.update(rotary_base=float(getattr(args, "rotary_base", 10000)), rotary_percent=rotary_percent)
        # gpt_builder (core_v0.16.1) passes neither argument to GPTModel: what the weights were trained with
        # depends on the Megatron-LM version that wrote them, and nothing in the checkpoint says
        factor = getattr(args, "rotary_seq_len_interpolation_factor", None)
        if factor not in (None, 1):
            refuse(f"Megatron-LM argument rotary_seq_len_interpolation_factor={factor!r}: Megatron-LM's GPT builder "
                   "does not pass it to GPTModel, so whether the model used it cannot be told")
        if getattr(args, "use_rope_scaling", False):
            factor = getattr(args, "rope_scaling_factor", _LLAMA3["factor"])
            if factor != _LLAMA3["factor"]:
                refuse(f"Megatron-LM argument rope_scaling_factor={factor!r}: Megatron-LM's GPT builder does not "
                       f"pass it to GPTModel (which uses {_LLAMA3['factor']}), so which one the model used cannot "
                       "be told")
            extra["rope_parameters"] = dict(_LLAMA3)
    if window is not None:
        if len(window) != 2 or window[1] != 0 or window[0] < 0:
            refuse(f"Megatron-LM argument window_size={window!r}: only causal windows (W - 1, 0) are a "
                   "sliding window of ours")
        extra["sliding_window"] = int(window[0]) + 1
    if positions == "rope" and norm == "RMSNorm" and gated and rotary_percent == 1.0:
        if window is not None and not qk_norm and not qkv_bias:
            return "mistral", fields, extra
        if qk_norm and window is None and not qkv_bias:
            return "qwen3", fields | {"qk_norm": "head"}, extra
        if window is None and not qk_norm:
            return ("qwen2" if qkv_bias and not all_bias else "llama"), fields, extra
    plain_mha = (values["num_kv_heads"] == values["num_heads"] and not qk_norm and window is None
                 and values["head_dim"] * values["num_heads"] == values["hidden_size"])
    if norm == "LayerNorm" and not gated and plain_mha:
        if positions == "rope" and all_bias:
            return "gpt_neox", fields, extra
        if positions == "learned_absolute" and all_bias:
            return "gpt2", fields, extra
        if positions == "learned_absolute" and not qkv_bias and values["norm_eps"] == 1e-5:
            return "opt", fields | {"position_offset": 2}, extra
    refuse(f"no family of ours computes a Megatron-LM model with {_describe(args, values, fields)} (llama, qwen2, "
           "qwen3, mistral: rope + RMSNorm + swiglu; gpt2, opt: learned + LayerNorm + gelu with all or no biases; "
           "gpt_neox: rope + LayerNorm + gelu with all biases)")


def _describe(args: argparse.Namespace, values: dict, fields: dict) -> str:
    """The model's traits that choose a family, for the refusal."""
    biases = "all" if fields["mlp_bias"] else "QKV" if fields["qkv_bias"] else "no"
    traits = [f"{getattr(args, 'position_embedding_type', 'learned_absolute')} positions",
              getattr(args, "normalization", "LayerNorm"),
              f"{'swiglu' if fields['gated_mlp'] else fields['activation']} MLP", f"{biases} biases"]
    if values["num_kv_heads"] != values["num_heads"]:
        traits.append(f"{values['num_kv_heads']} query groups of {values['num_heads']} heads")
    if values["head_dim"] * values["num_heads"] != values["hidden_size"]:
        traits.append(f"kv_channels={values['head_dim']} != hidden_size / heads")
    if getattr(args, "qk_layernorm", False):
        traits.append("qk_layernorm")
    if getattr(args, "window_size", None) is not None:
        traits.append(f"window_size={tuple(args.window_size)}")
    if fields.get("rotary_percent", 1.0) != 1.0:
        traits.append(f"rotary_percent={fields['rotary_percent']}")
    if fields["position_embedding"] == "learned" and not fields["mlp_bias"] and values["norm_eps"] != 1e-5:
        traits.append(f"layernorm_epsilon={values['norm_eps']} (OPT's is 1e-5)")
    return ", ".join(traits)
