"""DirectFile: the bytes on disk are exactly those written, the digests those of reading the file back
(checkpoint/digests.py: each range's XXH3-128, the file's made of its segments'), with and without
O_DIRECT, for tails of every alignment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import xxhash

from hyperclone_dist.checkpoint import direct_file
from hyperclone_dist.checkpoint.digests import hash_file
from hyperclone_dist.checkpoint.direct_file import ALIGN, DirectFile


def chunks(sizes: list[int], seed: int) -> list[bytes]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g).numpy().tobytes() for n in sizes]


@pytest.mark.parametrize("sizes", [[1], [ALIGN], [ALIGN + 1, 3], [5000, 70000, 1, 4095],
                                   [direct_file.BUFFER_BYTES - 7, 9, 2 * direct_file.BUFFER_BYTES + 123]],
                         ids=["one-byte", "one-block", "block-plus", "mixed", "across-buffers"])
def test_bytes_and_digests_match_a_reread(tmp_path, sizes):
    parts = chunks(sizes, len(sizes))
    path = tmp_path / "out.bin"
    with DirectFile(path) as f:
        for k, part in enumerate(parts):
            if k % 2 == 0:
                f.begin_range()
            assert f.write(memoryview(part)) == len(part)
            if k % 2 == 0:
                f.end_range()
        size = f.tell()
    data = b"".join(parts)
    assert path.read_bytes() == data and size == len(data) == os.path.getsize(path)
    offsets = [sum(sizes[:k]) for k in range(len(sizes))]
    expected = [(offsets[k], sizes[k], xxhash.xxh3_128(parts[k]).hexdigest()) for k in range(0, len(parts), 2)]
    assert f.ranges == expected
    assert f.hexdigest() == hash_file(path, [(lo, n) for lo, n, _ in expected])[1]


def test_without_odirect_and_without_hashing(tmp_path, monkeypatch):
    """A file system refusing O_DIRECT (EINVAL at open) gets buffered writes; algorithm=None hashes nothing."""
    real_open = os.open

    def refusing(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(22, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refusing)
    parts = chunks([ALIGN + 17, 3], 7)
    with DirectFile(tmp_path / "a.bin") as hashed:
        for part in parts:
            hashed.write(part)
    with DirectFile(tmp_path / "b.bin", None) as plain:
        plain.begin_range()
        plain.write(b"".join(parts))
        plain.end_range()
    assert not hashed.direct and not plain.direct
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes() == b"".join(parts)
    assert hashed.hexdigest() == xxhash.xxh3_128(b"".join(parts)).hexdigest()  # one segment: the file's digest
    assert plain.hexdigest() is None and plain.ranges == []


def test_torch_save_through_it_loads_back(tmp_path):
    """torch.save writes into it as into open(path, "wb"): the same bytes, loadable."""
    t = torch.randn(1000, 37)
    with DirectFile(tmp_path / "t.pt") as f:
        torch.save(t, f)
    with open(tmp_path / "ref.pt", "wb") as ref:
        torch.save(t, ref)
    assert (tmp_path / "t.pt").read_bytes() == (tmp_path / "ref.pt").read_bytes()
    assert torch.equal(torch.load(tmp_path / "t.pt", weights_only=True), t)


def test_write_error_surfaces_as_oserror(tmp_path, monkeypatch):
    """A failing write (a full disk) raises the OSError, not a silent short file."""
    def full(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError) as caught, DirectFile(tmp_path / "x.bin") as f:
        f.write(bytes(10))
    assert caught.value.errno == 28
    assert Path(tmp_path / "x.bin").stat().st_size == 0


def test_file_size_limit_mid_buffer_is_efbig(tmp_path):
    """Under RLIMIT_FSIZE (like ``ulimit -f``) the write is cut short at an unaligned size; the error is the
    limit's own (EFBIG), not O_DIRECT's EINVAL for the unaligned remainder. In a child: the limit is per process."""
    import subprocess
    import sys

    code = (
        "import errno, resource, signal, sys\n"
        "from hyperclone_dist.checkpoint.direct_file import DirectFile\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (10000, 10000))\n"
        "try:\n"
        "    with DirectFile(sys.argv[1]) as f:\n"
        "        f.write(bytes(50000))\n"
        "except OSError as exc:\n"
        "    print(errno.errorcode[exc.errno])\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.bin")], capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.stdout.strip() == "EFBIG", out.stdout + out.stderr
