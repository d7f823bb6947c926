"""Our ModelConfig as a megatron-core GPTModel (local layer spec), and a forward pass that works for every
tensor/pipeline layout.

    init_model_parallel(tp=2, pp=2)                  # hyperclone_dist.megatron.parallel
    chunks = build_gpt_model(cfg)                    # one GPTModel per virtual pipeline stage
    logits = forward_logits(chunks, tokens)          # [batch, seq, vocab_padded] on the last stage, else None

Mapping decisions that are not one-to-one:
- Biases: megatron has one switch for all four linears (``add_bias_linear``) plus ``add_qkv_bias`` for the
  QKV projection alone. So "no biases", "QKV biases only" (Qwen2) and "all biases" (GPT-2, OPT, NeoX) are
  exact; any other mix is refused rather than padded with zero biases that would train.
- Learned positions with an offset (OPT reads row p + 2 for position p; the rows before serve only padding):
  megatron's table is HF rows [offset, offset + max_position_embeddings) (``hf_position_rows``), so
  position p reads row p with megatron's usual position ids 0..s-1. Exact for every real token, and
  Megatron-LM's own training loop needs no shifted ids.
- gelu_new (GPT-2) is HF's own tanh formula, not ``F.gelu(approximate="tanh")``, which is the same
  function but rounds differently; every activation below is bit-identical to its HF namesake.
- Sliding-window attention (Mistral ``sliding_window=W``: attend to the last W positions, self included)
  is megatron's ``window_size=(W - 1, 0)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from hyperclone_dist.config import ModelConfig
from hyperclone_dist.errors import HypercloneError
from hyperclone_dist.hf_config import per_layer_type_rope
from hyperclone_dist.layout import Layout
from hyperclone_dist.megatron.cpu_shims import apply_cpu_shims


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """HF NewGELUActivation (GPT-2 ``gelu_new``), same expression so the same rounding."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """HF GELUTanh (``gelu_pytorch_tanh``)."""
    return F.gelu(x, approximate="tanh")


def gelu_fast(x: torch.Tensor) -> torch.Tensor:
    """HF FastGELUActivation."""
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """HF QuickGELUActivation."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {  # HF activation name -> megatron activation_func
    "gelu": F.gelu,
    "gelu_new": gelu_new,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_fast": gelu_fast,
    "quick_gelu": quick_gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}

# HF config keys (carried in ModelConfig.hf_extra) whose other values change the math of a GPTModel layer.
_HF_EXTRA_EXPECTED = {
    "scale_attn_weights": True,  # GPT-2: False drops the 1/sqrt(head_dim) attention scale
    "scale_attn_by_inverse_layer_idx": False,  # GPT-2: an extra 1/(layer+1) attention scale
    "layer_norm_elementwise_affine": True,  # OPT: norms without gain/bias
    "_remove_final_layer_norm": False,  # OPT: no final norm
}


def hf_position_rows(cfg: ModelConfig) -> slice:
    """The rows of an HF learned position table that megatron's table holds, in order: position p of both
    models reads the same vector. Megatron's table has max_position_embeddings rows."""
    return slice(cfg.position_offset, cfg.position_offset + cfg.max_position_embeddings)


def check_representable(cfg: ModelConfig) -> None:
    """Raise HypercloneError, saying why, unless a GPTModel computes exactly what cfg describes."""
    def refuse(why: str):
        raise HypercloneError(f"{cfg.family} config cannot be a megatron-core GPTModel exactly: {why}")

    if cfg.parallel_residual:
        refuse("parallel residual (attention and MLP read the same input) is not a GPTModel layer")
    if not cfg.pre_norm:
        refuse("post-LN blocks (norm after the residual add) are not a GPTModel layer")
    if not cfg.final_norm:
        refuse("GPTModel always applies a final norm before the head")
    if cfg.norm == "layernorm" and not cfg.norm_bias:
        refuse("megatron's LayerNorm always has a bias")
    if cfg.activation not in ACTIVATIONS:
        refuse(f"activation {cfg.activation!r} has no megatron equivalent here ({', '.join(ACTIVATIONS)})")
    if cfg.position_offset and cfg.position_embedding != "learned":
        refuse(f"position_offset={cfg.position_offset} only makes sense for learned positions")
    for key, expected in _HF_EXTRA_EXPECTED.items():
        if key in cfg.hf_extra and cfg.hf_extra[key] != expected:
            refuse(f"HF {key}={cfg.hf_extra[key]!r} (only {expected!r} is expressible)")
    proj = cfg.hf_extra.get("word_embed_proj_dim")
    if proj is not None and proj != cfg.hidden_size:
        refuse(f"word_embed_proj_dim={proj} != hidden_size={cfg.hidden_size} (OPT project_in/project_out)")
    if cfg.embedding_scale:
        refuse("the embedding is multiplied by sqrt(hidden_size) (Gemma); a GPTModel embedding is not")
    if cfg.norm_unit_offset:
        refuse("norms multiply by (1 + weight) (Gemma); megatron's local RMSNorm multiplies by the weight")
    if cfg.output_norms:
        refuse(f"norms on the attention and MLP outputs ({cfg.sublayer_norms}: Gemma 2/3, OLMo-2) are not a "
               "GPTModel layer")
    if cfg.projection_qk_norm:
        refuse("q/k norms over the whole projection (OLMo-2); megatron's qk_layernorm normalizes each head")
    bias_flags(cfg)
    rotary_kwargs(cfg)
    sliding_window(cfg)


# megatron-core's RotaryEmbedding applies Llama 3.x scaling with these constants fixed
_MEGATRON_LLAMA3 = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def rotary_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """GPTModel's RoPE-scaling arguments for cfg's HF ``rope_parameters``: Llama 3.x (``rope_scaling``)
    and linear (``seq_len_interpolation_factor``); any other type is refused, naming it."""
    if cfg.position_embedding != "rope":
        return {}
    params = cfg.hf_extra.get("rope_parameters") or {}
    if per_layer_type_rope(params):
        raise HypercloneError(f"{cfg.family} config cannot be a megatron-core GPTModel exactly: RoPE parameters "
                              f"per attention layer type ({', '.join(params)}) are one RotaryEmbedding in megatron")
    rope_type = params.get("rope_type") or "default"
    if rope_type == "default":
        return {}
    if rope_type == "linear":
        return {"seq_len_interpolation_factor": float(params["factor"])}
    if rope_type == "llama3":
        fixed = {key: params.get(key) for key in _MEGATRON_LLAMA3}
        if any(float(fixed[key] or -1) != value for key, value in _MEGATRON_LLAMA3.items()):
            raise HypercloneError(
                f"{cfg.family} config cannot be a megatron-core GPTModel exactly: llama3 RoPE scaling with "
                f"{fixed}; megatron-core fixes {_MEGATRON_LLAMA3}")
        return {"rope_scaling": True, "rope_scaling_factor": float(params["factor"])}
    raise HypercloneError(f"{cfg.family} config cannot be a megatron-core GPTModel exactly: RoPE type "
                          f"{rope_type!r} (megatron-core applies default, linear and llama3)")


def bias_flags(cfg: ModelConfig) -> tuple[bool, bool]:
    """(add_bias_linear, add_qkv_bias) reproducing cfg's biases exactly."""
    if cfg.qkv_bias and cfg.attn_out_bias and cfg.mlp_bias:
        return True, False
    if not cfg.attn_out_bias and not cfg.mlp_bias:
        return False, cfg.qkv_bias
    raise HypercloneError(
        f"{cfg.family} config cannot be a megatron-core GPTModel exactly: biases qkv={cfg.qkv_bias} "
        f"attn_out={cfg.attn_out_bias} mlp={cfg.mlp_bias}; megatron biases all linears, none, or QKV only")


def sliding_window(cfg: ModelConfig) -> tuple[int, int] | None:
    window = cfg.hf_extra.get("sliding_window")
    if window is None or cfg.hf_extra.get("use_sliding_window") is False:
        return None
    layer_types = cfg.hf_extra.get("layer_types") or ()
    if any(kind != "sliding_attention" for kind in layer_types):
        raise HypercloneError(f"{cfg.family} config cannot be a megatron-core GPTModel exactly: "
                              "sliding-window attention on only some layers")
    return (int(window) - 1, 0)


def _p2p_backend_is_gloo() -> bool:
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_backend() == "gloo"
    return not torch.cuda.is_available()


def transformer_config(cfg: ModelConfig, layout: Layout = Layout(), dtype: torch.dtype = torch.float32,
                       **overrides: Any):
    """A megatron TransformerConfig describing cfg's layers at this layout; overrides win (e.g.
    perform_initialization=False for converters that load every weight anyway)."""
    from megatron.core.transformer.transformer_config import TransformerConfig  # heavy: imported when used

    check_representable(cfg)
    layout.validate(cfg)
    add_bias_linear, add_qkv_bias = bias_flags(cfg)
    values: dict[str, Any] = dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_heads,
        num_query_groups=cfg.num_kv_heads,
        kv_channels=cfg.head_dim,  # softmax scale is 1/sqrt(kv_channels), as in HF
        ffn_hidden_size=cfg.ffn_hidden_size,
        normalization="RMSNorm" if cfg.norm == "rmsnorm" else "LayerNorm",
        layernorm_epsilon=cfg.norm_eps,
        activation_func=ACTIVATIONS[cfg.activation],
        gated_linear_unit=cfg.gated_mlp,
        add_bias_linear=add_bias_linear,
        add_qkv_bias=add_qkv_bias,
        qk_layernorm=cfg.head_qk_norm,  # megatron normalizes each head's q and k, as Qwen3 and Gemma 3 do
        rotary_interleaved=False,  # rotate-half, the HF convention
        window_size=sliding_window(cfg),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=cfg.init_std,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        num_layers_in_first_pipeline_stage=layout.first_stage_layers,
        num_layers_in_last_pipeline_stage=layout.last_stage_layers,
        # gloo pairs interleaved-schedule sends to the same peer wrongly when they are batched
        batch_p2p_comm=not (layout.vpp is not None and _p2p_backend_is_gloo()),
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=not torch.cuda.is_available(),
        # fused kernels are CUDA-only or approximate; plain torch ops keep the math identical to HF
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
    )
    values.update(overrides)
    return TransformerConfig(**values)


def build_gpt_model(cfg: ModelConfig, layout: Layout | None = None, *, dtype: torch.dtype = torch.float32,
                    perform_initialization: bool = True, padded_vocab: int | None = None, **overrides: Any) -> list:
    """This rank's GPTModel chunks (one per virtual pipeline stage, a single one without vpp) for ``layout``,
    the one init_model_parallel set up (default: read from megatron's parallel state, even stages).
    padded_vocab defaults to the layout's padding of cfg.vocab_size."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    apply_cpu_shims()
    if not parallel_state.model_parallel_is_initialized():
        raise HypercloneError("build_gpt_model needs init_model_parallel(tp, pp, vpp) first")
    layout = layout or Layout(tp=parallel_state.get_tensor_model_parallel_world_size(),
                              pp=parallel_state.get_pipeline_model_parallel_world_size(),
                              vpp=parallel_state.get_virtual_pipeline_model_parallel_world_size())
    if padded_vocab is None:
        padded_vocab = layout.padded_vocab(cfg.vocab_size)
    if padded_vocab < cfg.vocab_size or padded_vocab % layout.tp:
        raise HypercloneError(f"padded_vocab={padded_vocab} must be >= vocab_size={cfg.vocab_size} "
                              f"and divisible by tp={layout.tp}")
    config = transformer_config(cfg, layout, dtype, perform_initialization=perform_initialization, **overrides)
    spec = get_gpt_layer_local_spec(normalization=config.normalization, qk_layernorm=config.qk_layernorm)
    chunks = []
    for vp_stage in range(layout.chunks):
        stage = None if layout.vpp is None else vp_stage
        chunk = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=padded_vocab,
            max_sequence_length=cfg.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            share_embeddings_and_output_weights=cfg.tie_word_embeddings,
            position_embedding_type="rope" if cfg.position_embedding == "rope" else "learned_absolute",
            rotary_percent=cfg.rotary_percent,
            rotary_base=cfg.rotary_base,
            **rotary_kwargs(cfg),
            vp_stage=stage,
        )
        chunks.append(chunk)
    if not perform_initialization:
        for chunk in chunks:
            mark_tensor_parallel_params(chunk)
    return chunks


def mark_tensor_parallel_params(chunk) -> None:
    """Give TP-split parameters megatron's ``tensor_model_parallel`` / ``partition_dim`` attributes.

    megatron-core sets them inside its weight initialisers, so with ``perform_initialization=False`` (every
    weight is loaded anyway) they are missing, and gradient-norm code (megatron's and DeepSpeed's) would
    then count a split weight on TP rank 0 only."""
    from megatron.core.tensor_parallel.layers import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
        set_tensor_model_parallel_attributes,
    )

    for module in chunk.modules():
        if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)):
            split = {"weight": 0, "bias": 0}
        elif isinstance(module, RowParallelLinear):
            split = {"weight": 1}
        else:
            continue
        for name, dim in split.items():
            param = getattr(module, name, None)
            if isinstance(param, torch.nn.Parameter) and not getattr(param, "tensor_model_parallel", False):
                set_tensor_model_parallel_attributes(param, is_parallel=True, dim=dim, stride=1)


def load_chunk_weights(chunk, state: dict, source) -> None:
    """Load ``state`` into one GPTModel chunk; anything missing (but megatron's empty ``_extra_state``)
    or unexpected is an error naming ``source``."""
    missing, unexpected = chunk.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise HypercloneError(f"{source}: checkpoint and GPTModel disagree (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")


def causal_attention_mask(seq_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Megatron's mask convention: [1, 1, s, s] booleans, True where a query may NOT attend."""
    allowed = torch.tril(torch.ones(seq_len, seq_len, dtype=torch.bool, device=device))
    return (~allowed).view(1, 1, seq_len, seq_len)


def forward_logits(models: list, tokens: torch.Tensor, micro_batch_size: int = 1,
                   positions: torch.Tensor | None = None) -> torch.Tensor | None:
    """Forward-only pass of tokens [batch, seq] through megatron's pipeline schedule (PP=1, PP>1 and
    interleaved alike), at position ids ``positions`` (default 0..seq-1). Returns float logits [batch, seq,
    vocab_padded], gathered over tensor parallel, on the last pipeline stage, and None on the other stages.
    Every rank passes the same tokens."""
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batch, seq = tokens.shape
    if batch % micro_batch_size:
        raise HypercloneError(f"batch {batch} is not a multiple of micro_batch_size {micro_batch_size}")
    num_micro = batch // micro_batch_size
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if len(models) > 1 and num_micro < pp:
        raise HypercloneError(
            f"the interleaved schedule needs at least pp={pp} micro-batches, got {num_micro}")
    device = next(models[0].parameters()).device
    tokens = tokens.to(device=device, dtype=torch.long)
    if positions is None:
        positions = torch.arange(seq).unsqueeze(0).expand(batch, seq)
    positions = positions.to(device=device, dtype=torch.long)
    mask = causal_attention_mask(seq, device)
    micro_batches = [(tokens[i:i + micro_batch_size], positions[i:i + micro_batch_size])
                     for i in range(0, batch, micro_batch_size)]

    def gather_logits(output: torch.Tensor, non_loss_data: bool = False) -> torch.Tensor:
        return tensor_parallel.gather_from_tensor_model_parallel_region(output).float()

    def forward_step(data_iterator, model):
        micro_tokens, micro_positions = next(data_iterator)
        return model(micro_tokens, micro_positions, mask), gather_logits

    was_training = [chunk.training for chunk in models]
    for chunk in models:
        chunk.eval()
    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=[iter(micro_batches) for _ in models],
            model=models,
            num_microbatches=num_micro,
            seq_length=seq,
            micro_batch_size=micro_batch_size,
            forward_only=True,
            collect_non_loss_data=True,
        )
    for chunk, training in zip(models, was_training):
        chunk.train(training)
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return torch.cat(outputs, dim=0)
