"""A write-only file that bypasses the page cache (O_DIRECT) and hashes its bytes as they pass.

Checkpoint shards are written once and not read back by the writer. Through the page cache each byte
costs a copy into a freshly allocated cache page, and on virtual machines a fresh page is expensive: on the
2-core VM of docs/benchmarks.md, torch.save of 640 MB into a new file with fsync spends ~1.7 CPU-s, 370 MB/s
of CPU, where ``dd oflag=direct`` writes the same disk at ~1.3 GB/s. Here every ``write`` is copied into one
reused, page-aligned buffer, whole buffers go to the disk with O_DIRECT, and the checksums the manifest needs
(one XXH3 digest per byte range and per stretch between ranges, the file's made of those: each byte hashed
once, checkpoint/digests.py) are computed from the bytes in hand, so the manifest never reads the file again.
There are two such buffers: while one goes to the disk (and is hashed) on a thread of its own, the caller
fills the other, so an O_DIRECT write, which returns only once the disk has the bytes, does not stall the
caller's serialization (torch.save into this file spent half its wall time waiting on the disk before).

Hand-written because nothing in the dependencies does it where this runs: DeepSpeed's ``FastFileWriter``
(deepspeed.io) writes O_DIRECT through its ``async_io`` op, which needs libaio headers to build, and
computes no checksums. File systems that refuse O_DIRECT (tmpfs; some network mounts) get ordinary
buffered writes with the same hashing; ``fsync`` at close either way.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import mmap
import os
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from hyperclone_dist.checkpoint.digests import ALGORITHM, SegmentHasher

ALIGN = 4096  # O_DIRECT offsets, lengths and buffer addresses: a multiple of the logical block size
BUFFER_BYTES = 4 << 20  # one O_DIRECT write; two of them, small beside a shard (they count in the memory bound)


class DirectFile(io.RawIOBase):
    """``open(path, "wb")`` for large sequential writes; ``begin_range``/``end_range`` around the bytes
    that one digest should cover (one saved tensor). Each full buffer is written on one thread and hashed on
    another while the caller fills the next (``os.write`` and XXH3 release the GIL); ``algorithm=None``: no
    hashing."""

    def __init__(self, path: str | os.PathLike, algorithm: str | None = ALGORITHM):
        super().__init__()
        if algorithm not in (ALGORITHM, None):
            raise ValueError(f"DirectFile hashes with {ALGORITHM} or not at all, not {algorithm}")
        self.path = os.fspath(path)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        self.direct = hasattr(os, "O_DIRECT")
        try:
            self._fd = os.open(self.path, flags | (os.O_DIRECT if self.direct else 0), 0o644)
        except OSError as exc:
            if exc.errno != errno.EINVAL or not self.direct:
                raise
            self.direct = False  # the file system does not do O_DIRECT
            self._fd = os.open(self.path, flags, 0o644)
        # anonymous maps: page-aligned; the caller fills one while the other is written and hashed
        self._buffers = [mmap.mmap(-1, BUFFER_BYTES) for _ in range(2)]
        self._views = [memoryview(buffer) for buffer in self._buffers]
        # writes are copied in by numpy, which releases the GIL (a memoryview slice assignment holds it, ~0.5 s
        # per GB here, stalling the thread that grows the next slices)
        self._arrays = [np.frombuffer(buffer, dtype=np.uint8) for buffer in self._buffers]
        self._in_flight: list[list[Future]] = [[], []]  # per buffer: its write and hash jobs
        self._current = 0  # the buffer write() fills
        self._view = self._views[0]
        self._filled = 0
        self._written = 0  # bytes accepted by write()
        self._drained = 0  # bytes handed to the disk (and hashed)
        self._segments = SegmentHasher() if algorithm else None
        self._digests: tuple[str | None, list] = (None, [])  # the file's and its ranges', after close
        # one thread each, so that the disk gets the buffers in order and the hasher sees them in order
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="direct-file-write")
        self._hashers = ThreadPoolExecutor(1, thread_name_prefix="direct-file-hash") if algorithm else None

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._written

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            n = min(len(view) - done, BUFFER_BYTES - self._filled)
            np.copyto(self._arrays[self._current][self._filled:self._filled + n],
                      np.frombuffer(view[done:done + n], dtype=np.uint8))
            self._filled += n
            self._written += n
            done += n
            if self._filled == BUFFER_BYTES:
                self._drain()
        return len(view)

    def flush(self) -> None:
        """Nothing: O_DIRECT writes whole aligned blocks; ``close`` writes the tail and syncs."""

    def begin_range(self) -> None:
        if self._segments:
            self._segments.begin(self._written)

    def end_range(self) -> None:
        if self._segments:
            self._segments.end(self._written)

    @property
    def ranges(self) -> list[tuple[int, int, str]]:
        """(offset, length, digest) of every range; after ``close``."""
        return self._digests[1]

    def hexdigest(self) -> str | None:
        """The file's digest (checkpoint/digests.py, manifest version 2); after ``close``."""
        return self._digests[0]

    def close(self) -> None:
        if self.closed:
            return
        try:
            if self._filled:
                self._drain()
            for index in (0, 1):
                self._wait(index)
            os.fsync(self._fd)
            if self._segments:
                self._digests = self._segments.finish(self._written)
        finally:
            for executor in (self._writer, self._hashers):
                if executor:
                    executor.shutdown()  # waits for a job still running when an error got here first
            os.close(self._fd)
            views, buffers, self._views, self._buffers, self._view = self._views, self._buffers, None, None, None
            self._arrays = None  # numpy's exports of the maps go first, or closing them fails
            with contextlib.suppress(BufferError):  # a traceback being raised may still hold a slice of one
                for view, buffer in zip(views, buffers):
                    view.release()
                    buffer.close()
            super().close()

    def _drain(self) -> None:
        """Hand the filled buffer to the writer and hash threads and go on filling the other one, once the
        disk has had what was last written from it. An error of a write surfaces here or in ``close``."""
        index, n, start = self._current, self._filled, self._drained
        data = self._view[:n]
        jobs = [self._writer.submit(self._write_out, index, n, start)]
        if self._hashers:
            jobs.append(self._hashers.submit(self._segments.update, data, start))
        self._in_flight[index] = jobs
        self._drained += n
        self._filled = 0
        self._current = 1 - index
        self._view = self._views[self._current]
        self._wait(self._current)

    def _wait(self, index: int) -> None:
        jobs, self._in_flight[index] = self._in_flight[index], []
        for job in jobs:
            job.result()  # raises what stopped it

    def _write_out(self, index: int, n: int, start: int) -> None:
        """Write buffer ``index``'s first ``n`` bytes at ``start`` (the writer thread, in order); a tail
        shorter than ALIGN is padded and cut off again."""
        view = self._views[index]
        padded = -(-n // ALIGN) * ALIGN if self.direct else n
        view[n:padded] = bytes(padded - n)
        done = 0
        while done < (padded if self.direct else n):
            try:
                wrote = os.write(self._fd, view[done:padded if self.direct else n])
            except OSError as exc:
                # O_DIRECT refuses a write cut to an unaligned length (near a file-size limit or a full
                # disk): go on buffered, so that the error raised is the limit's own (EFBIG, ENOSPC)
                if exc.errno != errno.EINVAL or not self.direct:
                    raise
                self._buffered()
                continue
            if wrote == 0:
                raise OSError(errno.EIO, f"cannot write {self.path}: the disk took no bytes")
            done += wrote
            if done % ALIGN and self.direct:  # cut short at an unaligned offset: O_DIRECT cannot go on
                self._buffered()
        if padded != n:
            os.ftruncate(self._fd, start + n)  # the padding goes: the file is exactly what was written

    def _buffered(self) -> None:
        fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        self.direct = False
