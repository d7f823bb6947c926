"""Megatron-LM's own arguments for a model: stored in every checkpoint's ``args`` (what
``--use-checkpoint-args`` and ``tools/checkpoint/convert.py`` read back) and printed as the command-line
flags of its ``pretrain_gpt.py`` (launch/megatron_lm/).

Names are those of Megatron-LM at tag core_v0.16.1 (megatron/training/arguments.py), the tree matching the
pinned megatron-core. Facts about that version that decide the table:
- ``load_args_from_checkpoint`` reads the shape, norm type, biases, RoPE base/percent, swiglu, tying,
  dropouts, query-key layer scaling and padded vocab from the checkpoint; it never reads the norm epsilon
  (``layernorm_epsilon``, flag ``--norm-epsilon``), ``qk_layernorm``, ``window_size``, ``init_method_std``
  or RoPE scaling, so those must be passed as flags, and ``command_line`` always passes them;
- its GPT builder (gpt_builders.py) hands GPTModel ``rope_scaling`` but neither ``rope_scaling_factor``
  (GPTModel's default 8.0 applies) nor ``seq_len_interpolation_factor``, and its activations are GELU,
  SwiGLU, squared ReLU and quick-GeGLU only (``--openai-gelu`` is for its legacy models). With biases,
  megatron-core computes GELU through its fused bias-GELU, the tanh approximation (GPT-2's ``gelu_new``),
  unless ``--no-bias-gelu-fusion``: so exact GELU with biases needs that flag, and tanh GELU needs biases;
- ``tools/checkpoint`` loaders exit when ``tokenizer_type``, ``sequence_parallel`` or
  ``apply_query_key_layer_scaling`` is missing.
Where Megatron-LM's arguments cannot build our model exactly, ``inexpressible`` says why: the checkpoint
still loads in megatron-core (our trainer builds GPTModel itself), but ``pretrain_gpt.py`` would compute a
different function, and the launch path refuses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hyperclone_dist.config import ModelConfig
from hyperclone_dist.errors import HypercloneError
from hyperclone_dist.layout import Layout
from hyperclone_dist.megatron.model import bias_flags, rotary_kwargs, sliding_window

GPT_BUILDER_ROPE_SCALING_FACTOR = 8.0  # GPTModel's default, the only factor Megatron-LM's GPT builder applies
HF_TOKENIZER, SENTENCEPIECE_TOKENIZER, NULL_TOKENIZER = "HuggingFaceTokenizer", "GPTSentencePieceTokenizer", \
    "NullTokenizer"
TRANSFORMER_IMPL = {"local": "local", "te": "transformer_engine"}  # our --spec -> Megatron-LM --transformer-impl


@dataclass(frozen=True)
class Flag:
    """How one argument is spelled on Megatron-LM's command line."""

    flag: str
    kind: str = "value"  # value: --flag V; true: --flag when True; false: --flag when False (store_false)


# dest -> flag, for every argument ``command_line`` may pass (Megatron-LM core_v0.16.1 spellings)
FLAGS = {
    "num_layers": Flag("--num-layers"),
    "hidden_size": Flag("--hidden-size"),
    "ffn_hidden_size": Flag("--ffn-hidden-size"),
    "num_attention_heads": Flag("--num-attention-heads"),
    "kv_channels": Flag("--kv-channels"),
    "group_query_attention": Flag("--group-query-attention", "true"),
    "num_query_groups": Flag("--num-query-groups"),
    "max_position_embeddings": Flag("--max-position-embeddings"),
    "seq_length": Flag("--seq-length"),
    "position_embedding_type": Flag("--position-embedding-type"),
    "rotary_base": Flag("--rotary-base"),
    "rotary_percent": Flag("--rotary-percent"),
    "use_rope_scaling": Flag("--use-rope-scaling", "true"),
    "normalization": Flag("--normalization"),
    "layernorm_epsilon": Flag("--norm-epsilon"),
    "qk_layernorm": Flag("--qk-layernorm", "true"),
    "swiglu": Flag("--swiglu", "true"),
    "untie_embeddings_and_output_weights": Flag("--untie-embeddings-and-output-weights", "true"),
    "add_bias_linear": Flag("--disable-bias-linear", "false"),
    "add_qkv_bias": Flag("--add-qkv-bias", "true"),
    "window_size": Flag("--window-size"),
    "attention_dropout": Flag("--attention-dropout"),
    "hidden_dropout": Flag("--hidden-dropout"),
    "init_method_std": Flag("--init-method-std"),
    "padded_vocab_size": Flag("--padded-vocab-size"),
    "make_vocab_size_divisible_by": Flag("--make-vocab-size-divisible-by"),
    "tokenizer_type": Flag("--tokenizer-type"),
    "tokenizer_model": Flag("--tokenizer-model"),
    "tensor_model_parallel_size": Flag("--tensor-model-parallel-size"),
    "pipeline_model_parallel_size": Flag("--pipeline-model-parallel-size"),
    "num_virtual_stages_per_pipeline_rank": Flag("--num-virtual-stages-per-pipeline-rank"),
    "decoder_first_pipeline_num_layers": Flag("--decoder-first-pipeline-num-layers"),
    "decoder_last_pipeline_num_layers": Flag("--decoder-last-pipeline-num-layers"),
    "transformer_impl": Flag("--transformer-impl"),
    "ckpt_format": Flag("--ckpt-format"),
    "bias_gelu_fusion": Flag("--no-bias-gelu-fusion", "false"),
    "bf16": Flag("--bf16", "true"),
    "fp16": Flag("--fp16", "true"),
}


# what load_args_from_checkpoint never reads: on the command line even with --use-checkpoint-args
UNREAD_FROM_CHECKPOINT = ("layernorm_epsilon", "qk_layernorm", "window_size", "init_method_std", "use_rope_scaling",
                          "bias_gelu_fusion", "transformer_impl")
TANH_GELUS = ("gelu_new", "gelu_fast", "gelu_pytorch_tanh")  # what megatron-core's fused bias-GELU computes
INTEGER_ARGS = {"rotary_base"}  # int arguments whose value we hold as a float (inexpressible says when it isn't one)


@dataclass(frozen=True)
class TokenizerRef:
    """Megatron-LM's ``--tokenizer-type`` and ``--tokenizer-model`` for a checkpoint."""

    type: str
    model: str | None = None


def hf_tokenizer_at(directory: str | Path) -> TokenizerRef:
    """A Hugging Face tokenizer whose files are (or are about to be) copied into ``directory``."""
    return TokenizerRef(HF_TOKENIZER, str(Path(directory).resolve()))


def tokenizer_ref(path: str | Path | None) -> TokenizerRef | None:
    """A Hugging Face tokenizer directory (``tokenizer.json`` or ``tokenizer_config.json``) or a
    sentencepiece ``.model`` file; None when there is none."""
    if path is None:
        return None
    path = Path(path).resolve()
    if path.is_dir() and any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        return TokenizerRef(HF_TOKENIZER, str(path))
    if path.is_file() and path.name == "tokenizer.json":
        return TokenizerRef(HF_TOKENIZER, str(path.parent))
    if path.is_file() and path.suffix == ".model":
        return TokenizerRef(SENTENCEPIECE_TOKENIZER, str(path))
    return None


def inexpressible(cfg: ModelConfig) -> list[str]:
    """Why Megatron-LM's arguments cannot build exactly ``cfg`` (empty: they can)."""
    why = []
    if cfg.gated_mlp and cfg.activation not in ("silu", "swish"):
        why.append(f"a gated MLP with {cfg.activation} (Megatron-LM's gated MLPs are SwiGLU and quick-GeGLU)")
    has_bias = bias_flags(cfg)[0]
    if not cfg.gated_mlp and cfg.activation in TANH_GELUS and not has_bias:
        why.append(f"activation {cfg.activation} without biases (megatron-core's tanh GELU is its fused bias-GELU; "
                   "without biases it applies exact GELU)")
    elif not cfg.gated_mlp and cfg.activation not in ("gelu", *TANH_GELUS):
        why.append(f"activation {cfg.activation} (Megatron-LM's GPT builder applies GELU, exact or tanh; "
                   "--openai-gelu is for its legacy models only)")
    if cfg.position_embedding == "rope" and not float(cfg.rotary_base).is_integer():
        why.append(f"RoPE base {cfg.rotary_base} (Megatron-LM's --rotary-base is an integer)")
    rope = rotary_kwargs(cfg)
    if "seq_len_interpolation_factor" in rope:
        why.append("linear RoPE scaling (Megatron-LM's GPT builder does not pass "
                   "--rotary-seq-len-interpolation-factor to GPTModel)")
    factor = rope.get("rope_scaling_factor", GPT_BUILDER_ROPE_SCALING_FACTOR)
    if factor != GPT_BUILDER_ROPE_SCALING_FACTOR:
        why.append(f"Llama 3 RoPE scaling factor {factor:g} (Megatron-LM's GPT builder does not pass "
                   f"--rope-scaling-factor; GPTModel applies {GPT_BUILDER_ROPE_SCALING_FACTOR:g})")
    return why


def model_arguments(cfg: ModelConfig, layout: Layout, dtype: torch.dtype, fmt: str,
                    tokenizer: TokenizerRef | None = None) -> dict[str, Any]:
    """Megatron-LM's argument values (by dest) that build ``cfg`` at ``layout``, for a checkpoint of
    format ``fmt`` (legacy or torch_dist) holding ``dtype`` weights."""
    rope = rotary_kwargs(cfg)
    add_bias_linear, add_qkv_bias = bias_flags(cfg)
    is_rope = cfg.position_embedding == "rope"
    tokenizer = tokenizer or TokenizerRef(NULL_TOKENIZER)
    return {
        "num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size, "ffn_hidden_size": cfg.ffn_hidden_size,
        "num_attention_heads": cfg.num_heads, "kv_channels": cfg.head_dim,
        "group_query_attention": cfg.num_kv_heads != cfg.num_heads, "num_query_groups": cfg.num_kv_heads,
        "max_position_embeddings": cfg.max_position_embeddings, "seq_length": cfg.max_position_embeddings,
        "position_embedding_type": "rope" if is_rope else "learned_absolute",
        "add_position_embedding": not is_rope, "use_rotary_position_embeddings": is_rope,
        "rotary_base": cfg.rotary_base, "rotary_percent": cfg.rotary_percent, "rotary_interleaved": False,
        "use_rope_scaling": rope.get("rope_scaling", False),
        "rope_scaling_factor": rope.get("rope_scaling_factor", GPT_BUILDER_ROPE_SCALING_FACTOR),
        "rotary_seq_len_interpolation_factor": rope.get("seq_len_interpolation_factor"),
        "normalization": "RMSNorm" if cfg.norm == "rmsnorm" else "LayerNorm", "layernorm_epsilon": cfg.norm_eps,
        "apply_layernorm_1p": False, "layernorm_zero_centered_gamma": False, "qk_layernorm": cfg.head_qk_norm,
        "swiglu": cfg.gated_mlp and cfg.activation in ("silu", "swish"), "squared_relu": False,
        "quick_geglu": False, "openai_gelu": False,
        # None where it changes nothing (no bias, or a gated MLP)
        "bias_gelu_fusion": cfg.activation in TANH_GELUS if add_bias_linear and not cfg.gated_mlp else None,
        "untie_embeddings_and_output_weights": not cfg.tie_word_embeddings,
        "add_bias_linear": add_bias_linear, "add_qkv_bias": add_qkv_bias, "window_size": sliding_window(cfg),
        "attention_dropout": 0.0, "hidden_dropout": 0.0, "apply_query_key_layer_scaling": False,
        "init_method_std": cfg.init_std,
        "padded_vocab_size": layout.padded_vocab(cfg.vocab_size), "vocab_size": cfg.vocab_size,
        "make_vocab_size_divisible_by": layout.vocab_divisible_by,
        "tokenizer_type": tokenizer.type, "tokenizer_model": tokenizer.model,
        "tensor_model_parallel_size": layout.tp, "pipeline_model_parallel_size": layout.pp,
        "virtual_pipeline_model_parallel_size": layout.vpp, "num_virtual_stages_per_pipeline_rank": layout.vpp,
        "num_layers_per_virtual_pipeline_stage": None,
        "decoder_first_pipeline_num_layers": layout.first_stage_layers,
        "decoder_last_pipeline_num_layers": layout.last_stage_layers,
        "sequence_parallel": False, "transformer_impl": TRANSFORMER_IMPL[layout.spec],
        "params_dtype": dtype, "bf16": dtype == torch.bfloat16, "fp16": dtype == torch.float16,
        "ckpt_format": "torch" if fmt == "legacy" else fmt, "bert_binary_head": False,
    }


def command_line(args: dict[str, Any]) -> list[str]:
    """The flags of ``FLAGS`` that set ``args`` on Megatron-LM's command line (dests absent from ``args``
    and None values left out: Megatron-LM's default applies)."""
    flags = []
    for dest, spelling in FLAGS.items():
        value = args.get(dest)
        if value is None:
            continue
        if dest in INTEGER_ARGS and value is not None:
            value = int(value)
        if spelling.kind == "true":
            flags += [spelling.flag] if value else []
        elif spelling.kind == "false":
            flags += [] if value else [spelling.flag]
        else:
            flags += [spelling.flag, _spelled(value)]
    return flags


def _spelled(value: Any) -> str:
    if isinstance(value, tuple):  # --window-size "(a,b)", Megatron-LM's tuple_type
        return ",".join(str(v) for v in value)
    if isinstance(value, float):
        return repr(value)  # every digit: 1e-06 must come back as 1e-06
    return str(value)


def require_expressible(cfg: ModelConfig) -> None:
    why = inexpressible(cfg)
    if why:
        raise HypercloneError(f"Megatron-LM's arguments cannot build this {cfg.family} model exactly: "
                              + "; ".join(why))
