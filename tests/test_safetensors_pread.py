"""checkpoint/safetensors_pread.py: the tensors and row ranges it reads equal safetensors' own, for every
floating dtype a source may hold; a file cut short after it was opened is named in one line."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hyperclone_dist.checkpoint.safetensors_pread import DTYPES, SafetensorsData
from hyperclone_dist.errors import HypercloneError


@pytest.fixture
def stored(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {f"w.{str(dtype).removeprefix('torch.')}": torch.randn(37, 5, 3, generator=g).to(dtype)
               for dtype in DTYPES.values()}
    tensors["ids"] = torch.arange(12, dtype=torch.int64)
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    return path, tensors


def test_reads_equal_safetensors_own(stored):
    path, tensors = stored
    data, own = SafetensorsData(path), safe_open(str(path), framework="pt")
    for name in tensors:
        if name == "ids":
            assert data.read(name) is None  # not a dtype it reads: safetensors' own reader is used
            continue
        whole = data.read(name)
        assert whole.dtype == tensors[name].dtype and torch.equal(whole, own.get_tensor(name))
        for lo, hi in ((0, 1), (3, 20), (36, 37), (0, 37)):
            assert torch.equal(data.read(name, (lo, hi)), own.get_slice(name)[lo:hi])
        for lo, hi in ((30, 38), (5, 5), (-1, 3)):  # beyond its rows lie the next tensor's bytes
            with pytest.raises(HypercloneError, match=f"rows {lo}:{hi} of tensor {name} .*it has 37"):
                data.read(name, (lo, hi))
    data.close()


def test_a_file_cut_short_after_opening_is_named(stored):
    path, _ = stored
    data = SafetensorsData(path)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 10)
    floating = [name for name in data._entries if name.startswith("w.")]
    last = max(floating, key=lambda name: data._entries[name]["data_offsets"][1])  # now runs past the end
    with pytest.raises(HypercloneError, match=f"cannot read tensor {last} from .*ends early"):
        data.read(last)
    data.close()
