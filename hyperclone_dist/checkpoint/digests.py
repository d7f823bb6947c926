"""The digests of a checksum manifest (checkpoint/manifest.py): every byte of a file hashed once.

Version 2 (``xxh3-128``, written now): a file is cut into *segments* — its tensors' byte ranges and the
stretches between them (headers, pickles, zip records). Each segment gets its own XXH3-128 digest; a
tensor's digest is its segment's; the file's digest is the digest of its segment digests (16 bytes each, in
file order), or the one segment's digest when the file is a single segment (a file without tensor ranges:
``xxh128sum`` gives the same). A tensor range that overlaps an earlier one (views of one torch.save storage)
is hashed again on its own: the only bytes hashed twice. So the writer hashes bytes as they pass, and
``inspect --check`` reads a file once and, from the same pass, names the tensors that changed.

XXH3 rather than SHA-256 or BLAKE3: ~0.04 CPU-s per GB on one core (SHA-256 with SHA-NI ~0.5, BLAKE3
~0.2-0.3 a core), faster than disks write, so one core suffices and no thread pool is needed for it. The
promise is integrity against corruption (disk, network, truncation, a bad copy), not against an adversary:
XXH3 is not a cryptographic hash, and a manifest stored beside the files could be rewritten anyway.

Version 1 (``sha256``: each file's SHA-256, each tensor's SHA-256 of its range, bytes hashed twice) is still
read and checked.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import xxhash

ALGORITHM = "xxh3-128"  # manifest version 2
SHA256 = "sha256"  # manifest version 1
CHUNK_BYTES = 4 << 20  # read size: files are streamed, never held whole


def new_hasher(algorithm: str):
    return xxhash.xxh3_128() if algorithm == ALGORITHM else hashlib.new(algorithm)


def combined(digests: list[str]) -> str:
    """A file's version-2 digest from its segments' hex digests, in file order."""
    if len(digests) == 1:
        return digests[0]
    return xxhash.xxh3_128(b"".join(bytes.fromhex(d) for d in digests)).hexdigest()


def segments(size: int, ranges: list[tuple[int, int]]) -> tuple[list[tuple[int, int, int | None]], list[int]]:
    """How a file of ``size`` bytes with tensor ``ranges`` [(offset, length)] is cut: (offset, length, index
    of the range or None for a stretch between them) in file order, and the indices of ranges overlapping an
    earlier one (hashed on their own). Ranges are taken by offset, ties in the order given."""
    cut, extra, pos = [], [], 0
    for i in sorted(range(len(ranges)), key=lambda k: ranges[k][0]):
        lo, n = ranges[i]
        if lo < pos or lo + n > size:
            extra.append(i)
            continue
        if lo > pos:
            cut.append((pos, lo - pos, None))
        cut.append((lo, n, i))
        pos = lo + n
    if pos < size:
        cut.append((pos, size - pos, None))
    return cut, extra


class SegmentHasher:
    """Version-2 digests of a file whose bytes arrive in order (``update`` with each chunk and its offset),
    its tensor ranges marked by ``begin``/``end`` at the offsets where they start and stop."""

    def __init__(self):
        self._segments: list[list] = [[0, None, xxhash.xxh3_128(), False]]  # [start, end, hasher, tensor]
        self._next = 0  # first segment not yet hashed to its end

    def _close(self, at: int) -> None:
        last = self._segments[-1]
        if last[1] is None:
            last[1] = at

    def begin(self, at: int) -> None:
        self._close(at)
        self._segments.append([at, None, xxhash.xxh3_128(), True])

    def end(self, at: int) -> None:
        self._close(at)
        self._segments.append([at, None, xxhash.xxh3_128(), False])

    def update(self, data: memoryview, start: int) -> None:
        end = start + len(data)
        k = self._next
        while k < len(self._segments):
            lo, hi, hasher, _ = self._segments[k]
            if lo >= end:
                break
            top = end if hi is None else hi
            if top > start:
                hasher.update(data[max(lo, start) - start:min(top, end) - start])
            if hi is not None and hi <= end:
                self._next = k + 1
            k += 1

    def finish(self, size: int) -> tuple[str, list[tuple[int, int, str]]]:
        """(the file's digest, [(offset, length, digest)] of its tensor ranges) once ``size`` bytes passed."""
        self._close(size)
        kept = [s for s in self._segments if s[3] or s[1] > s[0]]  # empty stretches are not segments
        digests = [hasher.hexdigest() for _, _, hasher, _ in kept]
        ranges = [(lo, hi - lo, d) for (lo, hi, _, tensor), d in zip(kept, digests) if tensor]
        return combined(digests), ranges


def hash_file(path: Path, ranges: list[tuple[int, int]] = (), algorithm: str = ALGORITHM
              ) -> tuple[int, str, list[str]]:
    """One sequential read: (bytes read, the file's digest, each (offset, length) range's digest)."""
    if algorithm != ALGORITHM:
        return _hash_file_v1(path, ranges, algorithm)
    size = Path(path).stat().st_size
    cut, extra = segments(size, list(ranges))
    work = [(lo, n, xxhash.xxh3_128()) for lo, n, _ in cut] + [(*ranges[i], xxhash.xxh3_128()) for i in extra]
    pos = _stream(path, work)
    digests = [h.hexdigest() for _, _, h in work]
    by_range = [""] * len(ranges)
    for (_, _, i), d in zip(cut, digests):
        if i is not None:
            by_range[i] = d
    for i, d in zip(extra, digests[len(cut):]):
        by_range[i] = d
    return pos, combined(digests[:len(cut)]), by_range


def _stream(path: Path, work: list[tuple[int, int, object]]) -> int:
    """Feed each (offset, length, hasher) its bytes in one read of ``path``; returns the bytes read."""
    order = sorted(range(len(work)), key=lambda i: work[i][0])
    active, nxt, pos = [], 0, 0
    buf = bytearray(CHUNK_BYTES)
    view = memoryview(buf)
    with open(path, "rb") as f:
        while n := f.readinto(buf):
            chunk, end = view[:n], pos + n
            while nxt < len(order) and work[order[nxt]][0] < end:
                active.append(order[nxt])
                nxt += 1
            still = []
            for i in active:
                lo, hi, hasher = work[i][0], work[i][0] + work[i][1], work[i][2]
                if max(lo, pos) < min(hi, end):
                    hasher.update(chunk[max(lo, pos) - pos:min(hi, end) - pos])
                if hi > end:
                    still.append(i)
            active, pos = still, end
    return pos


def _hash_file_v1(path: Path, ranges: list[tuple[int, int]], algorithm: str) -> tuple[int, str, list[str]]:
    """Version 1: the whole file's digest and each range's, so bytes inside ranges are hashed twice."""
    whole = new_hasher(algorithm)
    hashers = [new_hasher(algorithm) for _ in ranges]
    pos = _stream(path, [(0, 1 << 62, whole), *((lo, n, h) for (lo, n), h in zip(ranges, hashers))])
    return pos, whole.hexdigest(), [h.hexdigest() for h in hashers]
