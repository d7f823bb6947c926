"""small.pt: this project's single-file checkpoint (documented in docs/formats.md).

A ``torch.save`` of a plain dict, loadable with ``torch.load(path, weights_only=True, mmap=True)``::

    {"format": "hyperclone-small", "version": 1,
     "config": ModelConfig.to_dict(),           # plain Python types only
     "state_dict": {canonical_name: Tensor},    # unfused, [out, in]; no head.weight when tied
     "meta": {...}}                             # free-form: step, tokens seen, tokenizer path, ...
"""

from __future__ import annotations

import errno
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


def torch_save(obj: object, path: Path) -> None:
    """``torch.save`` to a path, a failed write raised as the OSError behind it. torch's zip writer turns
    a short write (disk full, file-size limit) into ``RuntimeError: ... unexpected pos``; appending to
    the file again asks the OS what went wrong (the file is a partial one, removed by the caller)."""
    try:
        torch.save(obj, path)
    except RuntimeError as exc:
        if not is_short_write(exc):
            raise
        raise os_error_behind(path, exc) from None


def is_short_write(exc: BaseException) -> bool:
    """torch's zip writer's report of a write that the OS cut short."""
    return "unexpected pos" in str(exc) or "PytorchStreamWriter failed writing" in str(exc)


def os_error_behind(path: Path, exc: BaseException) -> OSError:
    """The OSError a further 1 MiB appended to ``path`` (a partial file, or a new one in a partial
    directory) gets now: EFBIG under a file-size limit, ENOSPC on a full disk; EIO if it succeeds."""
    probe = path / ".write-probe" if path.is_dir() else path
    try:
        with open(probe, "ab") as f:
            f.write(bytes(1 << 20))
    except OSError as cause:
        return cause
    finally:
        if probe != path:
            probe.unlink(missing_ok=True)
    return OSError(errno.EIO, f"the write failed ({str(exc).strip()[:120]})")


def save(path: str | os.PathLike, config: ModelConfig, state_dict: dict[str, torch.Tensor],
         meta: dict[str, Any] | None = None) -> Path:
    """Write small.pt atomically: a temporary name in the same directory, renamed when complete."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch_save(pack(config, state_dict, meta), tmp)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise HypercloneError(f"cannot write {path}: {exc.strerror or exc}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
