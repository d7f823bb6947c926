"""Outputs appear complete or not at all: built under a temporary sibling name, renamed at the end."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from pathlib import Path

from hyperclone_dist.errors import HypercloneError

# Files whose presence marks a directory as a checkpoint this tool may replace with --overwrite.
CHECKPOINT_MARKERS = ("config.json", "model.safetensors.index.json", "model.safetensors",
                      "latest_checkpointed_iteration.txt", "small.pt", "latest")


def looks_like_checkpoint(path: Path) -> bool:
    return any((path / marker).exists() for marker in CHECKPOINT_MARKERS)


def check_output_dir(out: Path, overwrite: bool, source: Path | None = None) -> None:
    """Refuse before any work is done: an existing checkpoint without --overwrite, a non-checkpoint
    directory with files in it, or an output that is (or contains) the source."""
    out = out.resolve()
    if source is not None:
        src = source.resolve()
        if out == src or src.is_relative_to(out):
            raise HypercloneError(f"output {out} would replace the source checkpoint {src}")
    if out.exists() and not out.is_dir():
        raise HypercloneError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not looks_like_checkpoint(out):
            raise HypercloneError(f"output {out} holds files that are not a checkpoint; refusing to touch it")
        if not overwrite:
            raise HypercloneError(f"output {out} already holds a checkpoint (pass --overwrite to replace it)")


def make_partial_dir(out: Path, overwrite: bool = False, source: Path | None = None) -> Path:
    """After the checks above, a new empty hidden directory beside ``out`` to build the output in."""
    check_output_dir(out, overwrite, source)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    return tmp


def publish(tmp: Path, out: Path) -> None:
    """Put the finished ``tmp`` in place of ``out`` (an old checkpoint there is moved aside first)."""
    if out.exists():
        trash = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(out, trash)
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)


@contextlib.contextmanager
def atomic_output_dir(out: Path, overwrite: bool = False, source: Path | None = None):
    """Yield a fresh temporary directory; on success it replaces ``out``, on any error it is removed."""
    out = Path(out)
    tmp = make_partial_dir(out, overwrite, source)
    try:
        yield tmp
        publish(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno == errno.ENOSPC:
            raise HypercloneError(f"no space left on the device while writing {out}; nothing was kept") from None
        raise HypercloneError(f"cannot write {out}: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
