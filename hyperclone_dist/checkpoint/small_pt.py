"""small.pt: this project's single-file checkpoint (documented in docs/formats.md).

A ``torch.save`` of a plain dict, loadable with ``torch.load(path, weights_only=True, mmap=True)``::

    {"format": "hyperclone-small", "version": 1,
     "config": ModelConfig.to_dict(),           # plain Python types only
     "state_dict": {canonical_name: Tensor},    # unfused, [out, in]; no head.weight when tied
     "meta": {...}}                             # free-form: step, tokens seen, tokenizer path, ...
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from hyperclone_dist.config import ModelConfig
from hyperclone_dist.errors import HypercloneError

FORMAT = "hyperclone-small"
VERSION = 1


def pack(config: ModelConfig, state_dict: dict[str, torch.Tensor], meta: dict[str, Any] | None = None) -> dict:
    state = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    if config.tie_word_embeddings:
        state.pop("head.weight", None)
    return {"format": FORMAT, "version": VERSION, "config": config.to_dict(), "state_dict": state,
            "meta": dict(meta or {})}


def unpack(payload: object, path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], dict]:
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise HypercloneError(f"{path} is not a small.pt checkpoint (no format={FORMAT!r} entry)")
    if payload.get("version") != VERSION:
        raise HypercloneError(f"{path}: small.pt version {payload.get('version')!r} is not supported "
                              f"(this hyperclone reads version {VERSION})")
    state = payload.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise HypercloneError(f"{path}: small.pt state_dict must map names to tensors")
    return ModelConfig.from_dict(payload.get("config") or {}), state, payload.get("meta") or {}


def save(path: str | os.PathLike, config: ModelConfig, state_dict: dict[str, torch.Tensor],
         meta: dict[str, Any] | None = None) -> Path:
    """Write small.pt atomically: a temporary name in the same directory, renamed when complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        torch.save(pack(config, state_dict, meta), tmp)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise HypercloneError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path
