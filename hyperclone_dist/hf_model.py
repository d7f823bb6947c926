"""Build transformers models from canonical checkpoints (verification, tests, the trainer's exports)."""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import torch

from hyperclone_dist.checkpoint.hf_source import HFSource
from hyperclone_dist.config import ModelConfig
from hyperclone_dist.errors import HypercloneError
from hyperclone_dist.families import FAMILIES, hf_names_for
from hyperclone_dist.hf_config import config_to_hf
from hyperclone_dist.hf_fusion import fuse_hf
from hyperclone_dist.params import canonical_shapes, is_tied_copy, stored_shapes
from hyperclone_dist.sources import open_source

# transformers is imported where a model is built: it takes seconds, and bad input is refused before.


def _quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    return transformers


def hf_model_from_config(cfg: ModelConfig, attn_implementation: str = "eager"):
    """An HF model with ``cfg``'s architecture (random weights, float32, eval mode, no dropout)."""
    transformers = _quiet_transformers()
    hf = config_to_hf(cfg)
    hf.pop("architectures", None)
    model_type = hf.pop("model_type")
    hf_config = transformers.AutoConfig.for_model(model_type, **hf)
    for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout", "attention_dropout", "hidden_dropout"):
        if hasattr(hf_config, key):
            setattr(hf_config, key, 0.0)
    hf_config._attn_implementation = attn_implementation
    with contextlib.redirect_stderr(io.StringIO()):
        model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    return model.eval()


def hf_state_dict(cfg: ModelConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF-named state dict from canonical tensors (fusing where the family fuses)."""
    family = FAMILIES[cfg.family]
    names = list(stored_shapes(cfg))
    return {hf_name: fuse_hf(family, template, [tensors[p] for p in parts], cfg)
            for hf_name, template, parts in hf_names_for(family, names)}


def load_hf_model(path: str | Path, dtype: torch.dtype = torch.float32, attn_implementation: str = "eager"):
    """An HF model from an HF directory, a small.pt file or a megatron checkpoint, in ``dtype``, eval mode."""
    source = open_source(path)  # validates names and shapes with one-line errors first
    if isinstance(source, HFSource):
        transformers = _quiet_transformers()
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                model = transformers.AutoModelForCausalLM.from_pretrained(
                    path, dtype=dtype, attn_implementation=attn_implementation)
        except (OSError, ValueError) as exc:
            raise HypercloneError(f"transformers cannot load {path}: {str(exc).splitlines()[0][:200]}") from None
        return model.eval()
    cfg = source.config
    return build_hf_model(cfg, {name: source.get(name) for name in stored_shapes(cfg)}, path,
                          attn_implementation).to(dtype).eval()


def build_hf_model(cfg: ModelConfig, tensors: dict[str, torch.Tensor], what: str | Path = "model",
                   attn_implementation: str = "eager"):
    """An HF model of ``cfg`` holding ``tensors`` (canonical, a checkpoint's stored ones); a missing or
    unexpected tensor is an error naming ``what``."""
    model = hf_model_from_config(cfg, attn_implementation)
    missing, unexpected = model.load_state_dict(hf_state_dict(cfg, tensors), strict=False)
    tied = [name for name in canonical_shapes(cfg) if is_tied_copy(cfg, name)]
    tied_hf = {hf_name for hf_name, _, _ in hf_names_for(FAMILIES[cfg.family], tied)}
    missing = [k for k in missing if k not in tied_hf]
    if missing or unexpected:
        raise HypercloneError(f"{what}: HF model mismatch (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model
