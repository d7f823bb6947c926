"""Outputs appear complete or not at all: built under a hidden temporary sibling name, renamed at the end.

Files (``write_bytes_atomic``, ``publish_files``) and checkpoint directories (``make_partial_dir``,
``publish``, ``atomic_output_dir``) alike; an OSError while writing becomes one line naming the output.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from hyperclone_dist.checkpoint import lock
from hyperclone_dist.errors import HypercloneError

# Files whose presence marks a directory as a checkpoint this tool may replace with --overwrite.
CHECKPOINT_MARKERS = ("config.json", "model.safetensors.index.json", "model.safetensors",
                      "latest_checkpointed_iteration.txt", "small.pt", "latest")


NOTHING_KEPT = "; nothing was kept"


def partial_path(path: Path) -> Path:
    """A hidden sibling of ``path`` (same directory, so the final rename is atomic)."""
    return path.with_name(f".{path.name}.partial-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def one_line_os_errors(target: Path, kept: str = ""):
    """An OSError while writing ``target`` becomes a one-line HypercloneError (a full disk named as such);
    ``kept``: what the message adds about what is left, e.g. "; nothing was kept"."""
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise HypercloneError(f"no space left on the device while writing {target}{kept}") from None
        raise HypercloneError(f"cannot write {target}: {exc.strerror or exc}{kept}") from None


def publish_files(pairs: list[tuple[Path, Path]]) -> None:
    """Rename each finished temporary file onto its final name, in order. Old finals are removed first, so
    that a reader never pairs a new file with an old one (e.g. a new ``.bin`` with the old ``.idx``)."""
    for _, final in pairs:
        final.unlink(missing_ok=True)
    for tmp, final in pairs:
        os.replace(tmp, final)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """``path`` holds ``data`` or what it held before, never part of it (OSError propagates)."""
    tmp = partial_path(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_file_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` writes the whole file at a temporary name, renamed onto ``path`` once it returns;
    on any error nothing is left behind and a failed write is one line naming ``path``."""
    path = Path(path)
    with one_line_os_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = partial_path(path)
        try:
            write(tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


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
        tmp = partial_path(out)
        tmp.mkdir()
    except BaseException as exc:
        if not held_before:  # nothing is being written: no reason to keep others out
            lock.release(out)
        if isinstance(exc, OSError):
            raise HypercloneError(f"cannot write {out}: {exc.strerror or exc}") from None
        raise
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
def atomic_output_dir(out: Path, overwrite: bool = False, source: Path | None = None,
                      finish: Callable[[Path], object] | None = None):
    """Yield a fresh temporary directory; on success ``finish(tmp)`` runs last (e.g. writing the checksum
    manifest) and it replaces ``out``; on any error it is removed."""
    out = Path(out)
    with lock.held_while_writing(out):
        tmp = make_partial_dir(out, overwrite, source)
        try:
            with one_line_os_errors(out, NOTHING_KEPT):
                yield tmp
                if finish is not None:
                    finish(tmp)
                publish(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
