"""Outputs appear complete or not at all: built under a temporary sibling name, renamed at the end."""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import shutil
import uuid
from pathlib import Path

from hyperclone_dist.checkpoint import lock
from hyperclone_dist.errors import HypercloneError

# Files whose presence marks a directory as a checkpoint this tool may replace with --overwrite.
CHECKPOINT_MARKERS = ("config.json", "model.safetensors.index.json", "model.safetensors",
                      "latest_checkpointed_iteration.txt", "small.pt", "latest")


def looks_like_checkpoint(path: Path) -> bool:
    return any((path / marker).exists() for marker in CHECKPOINT_MARKERS)


def check_output_dir(out: Path, overwrite: bool, source: Path | None = None) -> None:
    """Refuse before any work is done: an existing checkpoint without --overwrite, a non-checkpoint
    directory with files in it, or an output that is (or contains, or lies inside) the source."""
    out = out.resolve()
    if source is not None:
        src = source.resolve()
        if out == src or src.is_relative_to(out):
            raise HypercloneError(f"output {out} would replace the source checkpoint {src}")
        if src.is_dir() and out.is_relative_to(src):  # the source stays exactly as it was, new files included
            raise HypercloneError(f"output {out} is inside the source checkpoint {src}; write it elsewhere")
    if out.exists() and not out.is_dir():
        raise HypercloneError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not looks_like_checkpoint(out):
            raise HypercloneError(f"output {out} holds files that are not a checkpoint; refusing to touch it")
        if not overwrite:
            raise HypercloneError(f"output {out} already holds a checkpoint (pass --overwrite to replace it)")


def make_partial_dir(out: Path, overwrite: bool = False, source: Path | None = None) -> Path:
    """After the checks above, a new empty hidden directory beside ``out`` to build the output in.

    Takes the lock of ``out`` (checkpoint/lock.py) first: a second writer of the same output fails here.
    The lock stays held until ``lock.release(out)``; callers wrap the whole write, publish included, in
    ``lock.held_while_writing(out)`` (without it the lock lasts as long as the process). Holding it, the
    ``.<name>.partial-*`` directories of writers that were killed are removed: no live writer can own them.
    """
    out = Path(out)
    check_output_dir(out, overwrite, source)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HypercloneError(f"cannot write {out}: {exc.strerror or exc}") from None
    held_before = lock.is_held(out)
    lock.acquire(out)
    try:
        check_output_dir(out, overwrite, source)  # again: another writer may have published before we locked
        for stale in out.parent.glob(f".{glob.escape(out.name)}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = out.with_name(f".{out.name}.partial-{uuid.uuid4().hex[:8]}")
        tmp.mkdir()
    except BaseException as exc:
        if not held_before:  # nothing is being written: no reason to keep others out
            lock.release(out)
        if isinstance(exc, OSError):
            raise HypercloneError(f"cannot write {out}: {exc.strerror or exc}") from None
        raise
    return tmp


def publish(tmp: Path, out: Path, manifest: bool = True) -> None:
    """Put the finished ``tmp`` in place of ``out`` (an old checkpoint there is moved aside first), with
    its checksum manifest written last (``manifest=False``: the caller wrote it, e.g. hashed by all ranks)."""
    from hyperclone_dist.checkpoint.manifest import write_manifest

    if manifest:
        write_manifest(tmp)
    if out.exists():
        trash = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(out, trash)
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)


@contextlib.contextmanager
def atomic_output_dir(out: Path, overwrite: bool = False, source: Path | None = None, manifest: bool = True):
    """Yield a fresh temporary directory; on success it replaces ``out`` (with a checksum manifest unless
    ``manifest=False``), on any error it is removed."""
    out = Path(out)
    with lock.held_while_writing(out):
        tmp = make_partial_dir(out, overwrite, source)
        try:
            yield tmp
            publish(tmp, out, manifest)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if exc.errno == errno.ENOSPC:
                raise HypercloneError(f"no space left on the device while writing {out}; "
                                      "nothing was kept") from None
            raise HypercloneError(f"cannot write {out}: {exc.strerror or exc}; nothing was kept") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
