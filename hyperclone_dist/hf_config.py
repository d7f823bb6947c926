"""Translate between Hugging Face config.json dictionaries and ModelConfig."""

from __future__ import annotations

from typing import Any

from hyperclone_dist.config import ModelConfig
from hyperclone_dist.errors import HypercloneError
from hyperclone_dist.families import FAMILIES, family_of

# HF keys that describe the model's shape or that this module writes itself; everything else in a
# source config.json is carried over to the grown one untouched (token ids, rope scaling, ...).
_OWNED = {"model_type", "architectures", "torch_dtype", "dtype", "transformers_version", "_name_or_path",
          "rope_theta", "rotary_pct", "rotary_emb_base", "partial_rotary_factor", "word_embed_proj_dim",
          "_remove_final_layer_norm", "n_ctx"}


def per_layer_type_rope(params: dict[str, Any] | None) -> bool:
    """Gemma 3 style ``rope_parameters``: one dict per attention layer type (each with its own base)."""
    return bool(params) and all(isinstance(v, dict) for v in params.values())


def _rope(hf: dict[str, Any]) -> tuple[float, float]:
    params = hf.get("rope_parameters") or {}
    if per_layer_type_rope(params):  # ModelConfig records the global layers' base; HF keeps all of them
        params = params.get("full_attention") or next(iter(params.values()))
    base = params.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))
    percent = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", hf.get("rotary_pct", 1.0)))
    return float(base), float(percent)


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """ModelConfig from a parsed config.json; refuses what the family cannot represent exactly."""
    model_type = hf.get("model_type")
    family = family_of(model_type)
    values: dict[str, Any] = dict(family.implied)
    for field_name, key in family.config_keys.items():
        if key in hf and hf[key] is not None:
            values[field_name] = hf[key]
    if "hidden_size" not in values or "num_heads" not in values:
        raise HypercloneError(f"config.json of a {model_type} model lacks its hidden size or head count")
    values.setdefault("num_kv_heads", values["num_heads"])
    values.setdefault("head_dim", values["hidden_size"] // values["num_heads"])
    values.setdefault("ffn_hidden_size", 4 * values["hidden_size"])  # GPT-2's n_inner=None
    if model_type == "opt":
        proj = hf.get("word_embed_proj_dim", values["hidden_size"])
        if proj != values["hidden_size"]:
            raise HypercloneError(
                f"OPT with word_embed_proj_dim={proj} != hidden_size={values['hidden_size']} (OPT-350M's "
                "project_in/project_out) is not supported: the projections sit outside the residual stream")
        # HF OPT builds its final LayerNorm only for pre-LN models that did not remove it
        values["final_norm"] = bool(values.get("pre_norm", True)) and not hf.get("_remove_final_layer_norm")
    if values.get("position_embedding") == "rope":
        values["rotary_base"], values["rotary_percent"] = _rope(hf)
    extra = {k: v for k, v in hf.items() if k not in _OWNED and k not in family.config_keys.values()}
    if extra.get("rope_scaling") and not extra.get("rope_parameters"):
        # configs written before transformers v5 spell RoPE scaling "rope_scaling" (its type as "type")
        scaling = dict(extra.pop("rope_scaling"))
        scaling["rope_type"] = scaling.pop("type", None) or scaling.get("rope_type", "default")
        extra["rope_parameters"] = scaling
    extra.pop("rope_scaling", None)
    if values.get("position_embedding") != "rope":
        extra.pop("rope_parameters", None)
    try:
        return ModelConfig(family=model_type, hf_extra=extra, **values)
    except TypeError as exc:
        raise HypercloneError(f"config.json does not describe a {model_type} model: {exc}") from None


def config_to_hf(cfg: ModelConfig, dtype: str = "float32") -> dict[str, Any]:
    """config.json for ``cfg``; ``AutoModelForCausalLM.from_pretrained`` rebuilds the same model from it."""
    family = FAMILIES[cfg.family]
    hf: dict[str, Any] = dict(cfg.hf_extra)
    for field_name, key in family.config_keys.items():
        hf[key] = getattr(cfg, field_name)
    for field_name, value in family.implied.items():
        if getattr(cfg, field_name) != value:
            raise HypercloneError(f"{cfg.family} models cannot have {field_name}={getattr(cfg, field_name)!r}")
    if "num_kv_heads" not in family.config_keys and cfg.num_kv_heads != cfg.num_heads:
        raise HypercloneError(f"{cfg.family} models have no grouped-query attention (kv heads {cfg.num_kv_heads})")
    if "head_dim" not in family.config_keys and cfg.head_dim * cfg.num_heads != cfg.hidden_size:
        raise HypercloneError(f"{cfg.family} models need head_dim * heads == hidden_size")
    if cfg.position_embedding == "rope" and not per_layer_type_rope(hf.get("rope_parameters")):
        rope = dict(hf.get("rope_parameters") or {"rope_type": "default"})
        rope["rope_theta"] = cfg.rotary_base
        if cfg.rotary_percent != 1.0 or "partial_rotary_factor" in rope:
            rope["partial_rotary_factor"] = cfg.rotary_percent
        hf["rope_parameters"] = rope
    if cfg.family == "opt":
        hf["word_embed_proj_dim"] = cfg.hidden_size
        hf["_remove_final_layer_norm"] = cfg.pre_norm and not cfg.final_norm
    if isinstance(hf.get("layer_types"), list) and len(hf["layer_types"]) != cfg.num_layers:
        del hf["layer_types"]  # stale after depth growth; growth rewrites it, HF derives it otherwise
    hf.update(model_type=family.model_type, architectures=[family.architecture], dtype=dtype)
    return hf
