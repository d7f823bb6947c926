"""One writer per output: a second conversion or export to the same ``--out`` fails at once, naming the holder.

The lock is ``fcntl.flock`` on ``.<name>.lock`` beside the output (in the same parent directory). The
kernel drops a flock when its holder's descriptor closes, and a process killed by SIGKILL closes all of
them: a crashed writer never leaves a stale lock, only the file, which the next writer reuses and removes.
On NFS, Linux maps flock to POSIX byte-range locks, so writers on different hosts exclude each other too.

While it holds the lock of ``out``, a writer owns every ``.<name>.partial-*`` directory beside it: any
that exists then was left by a writer that died, and ``make_partial_dir`` removes it
(hyperclone_dist/checkpoint/atomic.py).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
from pathlib import Path

from hyperclone_dist.errors import HypercloneError

_HELD: dict[Path, int] = {}  # lock file -> descriptor, the locks this process holds


def lock_path(out: Path) -> Path:
    out = Path(out).resolve()  # one file whatever the spelling of --out
    return out.with_name(f".{out.name}.lock")


def holder(path: Path) -> str:
    """``pid N on HOST`` as written by the holder, or a placeholder if it has not written it yet."""
    try:
        pid, host = path.read_text().split()[:2]
        return f"pid {pid} on {host}"
    except (OSError, ValueError):
        return "another process"


def acquire(out: Path) -> Path:
    """Take the lock of ``out`` for this process (a no-op if it holds it already). Raises a one-line
    HypercloneError if another process holds it or the lock file cannot be created."""
    path = lock_path(out)
    if path in _HELD:
        return path
    for _ in range(10):  # a holder that unlinks between our open and our flock leaves us a dead inode: retry
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise HypercloneError(f"cannot write {out}: cannot create the lock file {path}: "
                                  f"{exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise HypercloneError(f"cannot lock {path}: {exc.strerror or exc}") from None
            raise HypercloneError(f"output {out} is being written by {holder(path)} (lock {path}); wait "
                                  "for it to finish or choose another --out") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        except OSError:  # a full disk or a file-size limit: the lock holds without the holder's name
            pass
        _HELD[path] = fd
        return path
    raise HypercloneError(f"cannot lock {path}: it keeps being replaced by other processes")


def release(out: Path) -> None:
    """Give up the lock of ``out`` (if held) and remove its file, unlinked while still locked: a process
    that opened it just before then locks a file no longer at that path, which ``acquire`` detects."""
    path = lock_path(out)
    fd = _HELD.pop(path, None)
    if fd is None:
        return
    with contextlib.suppress(OSError):
        path.unlink()
    os.close(fd)


def is_held(out: Path) -> bool:
    return lock_path(out) in _HELD


@contextlib.contextmanager
def held_while_writing(out: Path):
    """A lock of ``out`` taken inside the block (``make_partial_dir`` takes it) is released when the block
    ends, after the output has been published or cleaned up; one held before the block stays held."""
    before = is_held(out)
    try:
        yield
    finally:
        if not before:
            release(out)
