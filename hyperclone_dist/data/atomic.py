"""Data files appear complete or not at all: written under a hidden sibling name, renamed when finished.

The directory-level helpers of ``hyperclone_dist.checkpoint.atomic`` do the same for checkpoints; data
outputs are single files (``PREFIX.model``) or a pair (``PREFIX.bin`` + ``PREFIX.idx``) beside other files.
"""

from __future__ import annotations

import contextlib
import errno
import os
import uuid
from pathlib import Path

from hyperclone_dist.errors import HypercloneError


def partial_path(path: Path) -> Path:
    """A hidden sibling of ``path`` (same directory, so the final rename is atomic)."""
    return path.with_name(f".{path.name}.partial-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def os_errors_as_hyperclone(target: Path):
    """An OSError while writing ``target`` becomes a one-line HypercloneError (disk full named as such)."""
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise HypercloneError(f"no space left on the device while writing {target}; nothing was kept") \
                from None
        raise HypercloneError(f"cannot write {target}: {exc.strerror or exc}") from None


def publish_files(pairs: list[tuple[Path, Path]]) -> None:
    """Rename each finished temporary file onto its final name, in order. Old finals are removed first, so
    that a reader never pairs a new file with an old one (e.g. a new ``.bin`` with the old ``.idx``)."""
    for _, final in pairs:
        final.unlink(missing_ok=True)
    for tmp, final in pairs:
        os.replace(tmp, final)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path = Path(path)
    with os_errors_as_hyperclone(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = partial_path(path)
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
