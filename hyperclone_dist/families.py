"""Per-family data: Hugging Face parameter names and config keys.

Every family maps its HF tensor names onto one canonical, unfused naming (``layers.{i}.attn.q.weight``,
``[out, in]`` orientation). A value is a canonical name, a tuple of names (a fused HF tensor, e.g. GPT-2's
``c_attn``), or ``None`` (a buffer to drop). Writing inverts the map; where two HF names map to the same
canonical one (legacy aliases) the first listed is the one written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hyperclone_dist.errors import HypercloneError

QKV_W = ("layers.{i}.attn.q.weight", "layers.{i}.attn.k.weight", "layers.{i}.attn.v.weight")
QKV_B = ("layers.{i}.attn.q.bias", "layers.{i}.attn.k.bias", "layers.{i}.attn.v.bias")


@dataclass(frozen=True)
class Family:
    model_type: str  # HF config.json "model_type"
    architecture: str  # HF class written to config.json "architectures"
    names: dict[str, str | tuple[str, ...] | None]
    config_keys: dict[str, str]  # ModelConfig field -> HF config key
    implied: dict[str, Any]  # ModelConfig fields fixed by the architecture
    transposed: frozenset[str] = frozenset()  # HF names stored [in, out] (GPT-2 Conv1D)
    qkv_fusion: str | None = None  # "concat": [q; k; v] rows, "per_head": [q_h; k_h; v_h] per head


_LLAMA_NAMES = {
    "model.embed_tokens.weight": "embed.weight",
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "layers.{i}.attn.q.weight",
    "model.layers.{i}.self_attn.q_proj.bias": "layers.{i}.attn.q.bias",
    "model.layers.{i}.self_attn.k_proj.weight": "layers.{i}.attn.k.weight",
    "model.layers.{i}.self_attn.k_proj.bias": "layers.{i}.attn.k.bias",
    "model.layers.{i}.self_attn.v_proj.weight": "layers.{i}.attn.v.weight",
    "model.layers.{i}.self_attn.v_proj.bias": "layers.{i}.attn.v.bias",
    "model.layers.{i}.self_attn.o_proj.weight": "layers.{i}.attn.o.weight",
    "model.layers.{i}.self_attn.o_proj.bias": "layers.{i}.attn.o.bias",
    "model.layers.{i}.self_attn.rotary_emb.inv_freq": None,
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.mlp_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "layers.{i}.mlp.gate.weight",
    "model.layers.{i}.mlp.gate_proj.bias": "layers.{i}.mlp.gate.bias",
    "model.layers.{i}.mlp.up_proj.weight": "layers.{i}.mlp.up.weight",
    "model.layers.{i}.mlp.up_proj.bias": "layers.{i}.mlp.up.bias",
    "model.layers.{i}.mlp.down_proj.weight": "layers.{i}.mlp.down.weight",
    "model.layers.{i}.mlp.down_proj.bias": "layers.{i}.mlp.down.bias",
    "model.norm.weight": "final_norm.weight",
    "lm_head.weight": "head.weight",
}
_LLAMA_KEYS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "ffn_hidden_size": "intermediate_size",
    "max_position_embeddings": "max_position_embeddings",
    "norm_eps": "rms_norm_eps",
    "activation": "hidden_act",
    "init_std": "initializer_range",
    "tie_word_embeddings": "tie_word_embeddings",
}
_ROPE_GATED = dict(norm="rmsnorm", norm_bias=False, gated_mlp=True, position_embedding="rope")
_NO_BIAS = dict(qkv_bias=False, attn_out_bias=False, mlp_bias=False)

_ATTN = "model.layers.{i}.self_attn."
_HEAD_QK_NORMS = {_ATTN + "q_norm.weight": "layers.{i}.attn.q_norm.weight",
                  _ATTN + "k_norm.weight": "layers.{i}.attn.k_norm.weight"}
# Gemma 2/3: a norm before and after each sublayer; HF's post_attention_layernorm is the one after attention
_SANDWICH_NAMES = {k: v for k, v in _LLAMA_NAMES.items() if "post_attention_layernorm" not in k} | {
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.attn_out_norm.weight",
    "model.layers.{i}.pre_feedforward_layernorm.weight": "layers.{i}.mlp_norm.weight",
    "model.layers.{i}.post_feedforward_layernorm.weight": "layers.{i}.mlp_out_norm.weight",
}
# Gemma: (1 + w) RMSNorm, embedding times sqrt(hidden), tanh-GELU gated MLP ("GeGLU")
_GEMMA = _ROPE_GATED | dict(mlp_bias=False, norm_unit_offset=True, embedding_scale=True)
_ATTN_BIAS_KEYS = {"qkv_bias": "attention_bias", "attn_out_bias": "attention_bias"}
_GEMMA2_KEYS = _LLAMA_KEYS | _ATTN_BIAS_KEYS | {"activation": "hidden_activation"}

FAMILIES: dict[str, Family] = {
    "gpt2": Family(
        model_type="gpt2",
        architecture="GPT2LMHeadModel",
        names={
            "transformer.wte.weight": "embed.weight",
            "transformer.wpe.weight": "pos_embed.weight",
            "transformer.h.{i}.ln_1.weight": "layers.{i}.attn_norm.weight",
            "transformer.h.{i}.ln_1.bias": "layers.{i}.attn_norm.bias",
            "transformer.h.{i}.attn.c_attn.weight": QKV_W,
            "transformer.h.{i}.attn.c_attn.bias": QKV_B,
            "transformer.h.{i}.attn.c_proj.weight": "layers.{i}.attn.o.weight",
            "transformer.h.{i}.attn.c_proj.bias": "layers.{i}.attn.o.bias",
            "transformer.h.{i}.attn.bias": None,  # causal-mask buffer in older checkpoints
            "transformer.h.{i}.attn.masked_bias": None,
            "transformer.h.{i}.ln_2.weight": "layers.{i}.mlp_norm.weight",
            "transformer.h.{i}.ln_2.bias": "layers.{i}.mlp_norm.bias",
            "transformer.h.{i}.mlp.c_fc.weight": "layers.{i}.mlp.up.weight",
            "transformer.h.{i}.mlp.c_fc.bias": "layers.{i}.mlp.up.bias",
            "transformer.h.{i}.mlp.c_proj.weight": "layers.{i}.mlp.down.weight",
            "transformer.h.{i}.mlp.c_proj.bias": "layers.{i}.mlp.down.bias",
            "transformer.ln_f.weight": "final_norm.weight",
            "transformer.ln_f.bias": "final_norm.bias",
            "lm_head.weight": "head.weight",
        },
        config_keys={
            "vocab_size": "vocab_size",
            "hidden_size": "n_embd",
            "num_layers": "n_layer",
            "num_heads": "n_head",
            "ffn_hidden_size": "n_inner",
            "max_position_embeddings": "n_positions",
            "norm_eps": "layer_norm_epsilon",
            "activation": "activation_function",
            "init_std": "initializer_range",
            "tie_word_embeddings": "tie_word_embeddings",
        },
        implied=dict(norm="layernorm", norm_bias=True, gated_mlp=False, position_embedding="learned",
                     qkv_bias=True, attn_out_bias=True, mlp_bias=True),
        transposed=frozenset({
            "transformer.h.{i}.attn.c_attn.weight", "transformer.h.{i}.attn.c_proj.weight",
            "transformer.h.{i}.mlp.c_fc.weight", "transformer.h.{i}.mlp.c_proj.weight",
        }),
        qkv_fusion="concat",
    ),
    "llama": Family(model_type="llama", architecture="LlamaForCausalLM", names=_LLAMA_NAMES,
                    config_keys=_LLAMA_KEYS | {"qkv_bias": "attention_bias", "attn_out_bias": "attention_bias",
                                               "mlp_bias": "mlp_bias"},
                    implied=_ROPE_GATED),
    "mistral": Family(model_type="mistral", architecture="MistralForCausalLM", names=_LLAMA_NAMES,
                      config_keys=_LLAMA_KEYS,
                      implied=_ROPE_GATED | dict(qkv_bias=False, attn_out_bias=False, mlp_bias=False)),
    "qwen2": Family(model_type="qwen2", architecture="Qwen2ForCausalLM", names=_LLAMA_NAMES,
                    config_keys=_LLAMA_KEYS,
                    implied=_ROPE_GATED | dict(qkv_bias=True, attn_out_bias=False, mlp_bias=False)),
    "qwen3": Family(model_type="qwen3", architecture="Qwen3ForCausalLM", names=_LLAMA_NAMES | _HEAD_QK_NORMS,
                    config_keys=_LLAMA_KEYS | _ATTN_BIAS_KEYS,
                    implied=_ROPE_GATED | dict(mlp_bias=False, qk_norm="head")),
    "gemma": Family(model_type="gemma", architecture="GemmaForCausalLM", names=_LLAMA_NAMES,
                    config_keys=_LLAMA_KEYS, implied=_GEMMA),
    "gemma2": Family(model_type="gemma2", architecture="Gemma2ForCausalLM", names=_SANDWICH_NAMES,
                     config_keys=_GEMMA2_KEYS, implied=_GEMMA | dict(sublayer_norms="sandwich")),
    "gemma3_text": Family(model_type="gemma3_text", architecture="Gemma3ForCausalLM",
                          names=_SANDWICH_NAMES | _HEAD_QK_NORMS, config_keys=_GEMMA2_KEYS,
                          implied=_GEMMA | dict(sublayer_norms="sandwich", qk_norm="head")),
    "olmo2": Family(
        model_type="olmo2", architecture="Olmo2ForCausalLM",
        # a norm after each sublayer only, and q/k norms over the whole projection
        names={k: v for k, v in _LLAMA_NAMES.items() if "layernorm" not in k} | {
            "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.attn_out_norm.weight",
            "model.layers.{i}.post_feedforward_layernorm.weight": "layers.{i}.mlp_out_norm.weight",
            _ATTN + "q_norm.weight": "layers.{i}.attn.q_proj_norm.weight",
            _ATTN + "k_norm.weight": "layers.{i}.attn.k_proj_norm.weight",
        },
        config_keys=_LLAMA_KEYS | _ATTN_BIAS_KEYS,
        implied=_ROPE_GATED | dict(mlp_bias=False, sublayer_norms="output", qk_norm="projection")),
    "opt": Family(
        model_type="opt",
        architecture="OPTForCausalLM",
        names={
            "model.decoder.embed_tokens.weight": "embed.weight",
            "model.decoder.embed_positions.weight": "pos_embed.weight",
            "model.decoder.layers.{i}.self_attn_layer_norm.weight": "layers.{i}.attn_norm.weight",
            "model.decoder.layers.{i}.self_attn_layer_norm.bias": "layers.{i}.attn_norm.bias",
            "model.decoder.layers.{i}.self_attn.q_proj.weight": "layers.{i}.attn.q.weight",
            "model.decoder.layers.{i}.self_attn.q_proj.bias": "layers.{i}.attn.q.bias",
            "model.decoder.layers.{i}.self_attn.k_proj.weight": "layers.{i}.attn.k.weight",
            "model.decoder.layers.{i}.self_attn.k_proj.bias": "layers.{i}.attn.k.bias",
            "model.decoder.layers.{i}.self_attn.v_proj.weight": "layers.{i}.attn.v.weight",
            "model.decoder.layers.{i}.self_attn.v_proj.bias": "layers.{i}.attn.v.bias",
            "model.decoder.layers.{i}.self_attn.out_proj.weight": "layers.{i}.attn.o.weight",
            "model.decoder.layers.{i}.self_attn.out_proj.bias": "layers.{i}.attn.o.bias",
            "model.decoder.layers.{i}.final_layer_norm.weight": "layers.{i}.mlp_norm.weight",
            "model.decoder.layers.{i}.final_layer_norm.bias": "layers.{i}.mlp_norm.bias",
            "model.decoder.layers.{i}.fc1.weight": "layers.{i}.mlp.up.weight",
            "model.decoder.layers.{i}.fc1.bias": "layers.{i}.mlp.up.bias",
            "model.decoder.layers.{i}.fc2.weight": "layers.{i}.mlp.down.weight",
            "model.decoder.layers.{i}.fc2.bias": "layers.{i}.mlp.down.bias",
            "model.decoder.final_layer_norm.weight": "final_norm.weight",
            "model.decoder.final_layer_norm.bias": "final_norm.bias",
            "lm_head.weight": "head.weight",
        },
        config_keys={
            "vocab_size": "vocab_size",
            "hidden_size": "hidden_size",
            "num_layers": "num_hidden_layers",
            "num_heads": "num_attention_heads",
            "ffn_hidden_size": "ffn_dim",
            "max_position_embeddings": "max_position_embeddings",
            "activation": "activation_function",
            "init_std": "init_std",
            "tie_word_embeddings": "tie_word_embeddings",
            "qkv_bias": "enable_bias",
            "attn_out_bias": "enable_bias",
            "mlp_bias": "enable_bias",
            "pre_norm": "do_layer_norm_before",
        },
        # HF OPT hard-codes LayerNorm eps 1e-5 and offsets learned positions by 2 rows.
        implied=dict(norm="layernorm", norm_bias=True, norm_eps=1e-5, gated_mlp=False,
                     position_embedding="learned", position_offset=2),
    ),
    "gpt_neox": Family(
        model_type="gpt_neox",
        architecture="GPTNeoXForCausalLM",
        names={
            "gpt_neox.embed_in.weight": "embed.weight",
            "gpt_neox.layers.{i}.input_layernorm.weight": "layers.{i}.attn_norm.weight",
            "gpt_neox.layers.{i}.input_layernorm.bias": "layers.{i}.attn_norm.bias",
            "gpt_neox.layers.{i}.attention.query_key_value.weight": QKV_W,
            "gpt_neox.layers.{i}.attention.query_key_value.bias": QKV_B,
            "gpt_neox.layers.{i}.attention.dense.weight": "layers.{i}.attn.o.weight",
            "gpt_neox.layers.{i}.attention.dense.bias": "layers.{i}.attn.o.bias",
            "gpt_neox.layers.{i}.attention.rotary_emb.inv_freq": None,
            "gpt_neox.layers.{i}.attention.bias": None,
            "gpt_neox.layers.{i}.attention.masked_bias": None,
            "gpt_neox.layers.{i}.post_attention_layernorm.weight": "layers.{i}.mlp_norm.weight",
            "gpt_neox.layers.{i}.post_attention_layernorm.bias": "layers.{i}.mlp_norm.bias",
            "gpt_neox.layers.{i}.mlp.dense_h_to_4h.weight": "layers.{i}.mlp.up.weight",
            "gpt_neox.layers.{i}.mlp.dense_h_to_4h.bias": "layers.{i}.mlp.up.bias",
            "gpt_neox.layers.{i}.mlp.dense_4h_to_h.weight": "layers.{i}.mlp.down.weight",
            "gpt_neox.layers.{i}.mlp.dense_4h_to_h.bias": "layers.{i}.mlp.down.bias",
            "gpt_neox.final_layer_norm.weight": "final_norm.weight",
            "gpt_neox.final_layer_norm.bias": "final_norm.bias",
            "lm_head.weight": "head.weight",
            "embed_out.weight": "head.weight",  # Pythia checkpoints on the Hub
        },
        config_keys={
            "vocab_size": "vocab_size",
            "hidden_size": "hidden_size",
            "num_layers": "num_hidden_layers",
            "num_heads": "num_attention_heads",
            "ffn_hidden_size": "intermediate_size",
            "max_position_embeddings": "max_position_embeddings",
            "norm_eps": "layer_norm_eps",
            "activation": "hidden_act",
            "init_std": "initializer_range",
            "tie_word_embeddings": "tie_word_embeddings",
            "qkv_bias": "attention_bias",
            "attn_out_bias": "attention_bias",
            "parallel_residual": "use_parallel_residual",
        },
        implied=dict(norm="layernorm", norm_bias=True, gated_mlp=False, position_embedding="rope", mlp_bias=True),
        qkv_fusion="per_head",
    ),
}


def family_of(model_type: str) -> Family:
    if model_type not in FAMILIES:
        raise HypercloneError(
            f"unsupported model family {model_type!r} (supported: {', '.join(sorted(FAMILIES))})")
    return FAMILIES[model_type]


@dataclass
class NameMatch:
    template: str  # HF template, e.g. "model.layers.{i}.mlp.up_proj.weight"
    layer: int | None
    canonical: tuple[str, ...] | None = field(default=None)  # None: dropped buffer


def _compile(template: str) -> tuple[str, str] | None:
    if "{i}" not in template:
        return None
    head, tail = template.split("{i}")
    return head, tail


def match_hf_name(family: Family, name: str) -> NameMatch | None:
    """Which template an HF tensor name instantiates (None: not a name this family knows)."""
    for template, canonical in family.names.items():
        parts = _compile(template)
        layer = None
        if parts is None:
            if name != template:
                continue
        else:
            head, tail = parts
            middle = name[len(head):len(name) - len(tail)] if name.startswith(head) and name.endswith(tail) else ""
            if not middle.isdigit():
                continue
            layer = int(middle)
        if canonical is None:
            return NameMatch(template, layer, None)
        targets = (canonical,) if isinstance(canonical, str) else canonical
        return NameMatch(template, layer, tuple(t.format(i=layer) for t in targets))
    return None


def hf_names_for(family: Family, canonical_names: list[str]) -> list[tuple[str, str, tuple[str, ...]]]:
    """The HF tensors that hold a set of canonical tensors, in canonical order:
    ``[(hf_name, hf_template, canonical_parts)]``."""
    wanted = set(canonical_names)
    out: list[tuple[str, str, tuple[str, ...]]] = []
    seen_targets: set[tuple[str, ...]] = set()
    for cname in canonical_names:
        layer = int(cname.split(".")[1]) if cname.startswith("layers.") else None
        generic = cname if layer is None else cname.replace(f"layers.{layer}.", "layers.{i}.", 1)
        for template, canonical in family.names.items():  # first listed wins (legacy aliases come later)
            if canonical is None:
                continue
            targets = (canonical,) if isinstance(canonical, str) else canonical
            if generic not in targets:
                continue
            parts = tuple(t.format(i=layer) for t in targets)
            if parts in seen_targets:
                break
            missing = [p for p in parts if p not in wanted]
            if missing:
                raise HypercloneError(f"{template} needs {missing} which the model does not have")
            seen_targets.add(parts)
            out.append((template.format(i=layer), template, parts))
            break
        else:
            raise HypercloneError(f"family {family.model_type!r} has no HF name for {cname}")
    return out
