"""small.pt: this project's single-file checkpoint (documented in docs/formats.md).

A ``torch.save`` of a plain dict, loadable with ``torch.load(path, weights_only=True, mmap=True)``::

    {"format": "hyperclone-small", "version": 1,
     "config": ModelConfig.to_dict(),           # plain Python types only
     "state_dict": {canonical_name: Tensor},    # unfused, [out, in]; no tied copies (params.stored_shapes)
     "meta": {...}}                             # free-form: step, tokens seen, tokenizer path, ...
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import torch

from hyperclone_dist.checkpoint.atomic import write_file_atomic
from hyperclone_dist.checkpoint.source import Source, check_floating, check_shape
from hyperclone_dist.checkpoint.torch_load import torch_load
from hyperclone_dist.config import ModelConfig
from hyperclone_dist.errors import HypercloneError
from hyperclone_dist.params import is_tied_copy, stored_name, stored_shapes

FORMAT = "hyperclone-small"
VERSION = 1


def pack(config: ModelConfig, state_dict: dict[str, torch.Tensor], meta: dict[str, Any] | None = None) -> dict:
    state = {k: v.detach().contiguous().cpu() for k, v in state_dict.items() if not is_tied_copy(config, k)}
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
    write_file_atomic(path, lambda tmp: torch_save(pack(config, state_dict, meta), tmp))
    return path


class SmallPtSource(Source):
    """small.pt as canonical tensors: memory-mapped, so a tensor is read when it is used."""

    kind = "small.pt"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise HypercloneError(f"no such file or directory: {self.path}")
        self.config, self._state, self.meta = unpack(torch_load(self.path), self.path)
        shapes = stored_shapes(self.config)
        missing = [name for name in shapes if name not in self._state]
        if missing:
            raise HypercloneError(f"{self.path}: tensor {missing[0]} is missing (the config implies it)")
        extra = sorted(set(self._state) - set(shapes))
        if extra:
            raise HypercloneError(f"{self.path}: unexpected tensors {extra[:3]} for this config")
        for name, tensor in self._state.items():
            check_shape(self.path, name, tuple(tensor.shape), shapes[name])
        check_floating(self.path, {name: str(t.dtype).removeprefix("torch.") for name, t in self._state.items()
                                   if not t.dtype.is_floating_point})
        self.dtype = self._state[next(iter(shapes))].dtype  # the embedding's

    def get(self, name: str) -> torch.Tensor:
        name = stored_name(self.config, name)
        if name not in self._state:
            raise HypercloneError(f"{self.path}: tensor {name} is missing")
        return self._state[name]
