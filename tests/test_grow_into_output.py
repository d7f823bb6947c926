"""Growing straight into the memory a rank's tensors are written from gives the bytes of the old path
(grow each slice, concatenate, pad the vocab, copy into the parameter; megatron cloning the SwiGLU halves
before ``torch.save``), and the manifest's digests hash each byte once yet name a damaged tensor.

    .venv/bin/python -m pytest tests/test_grow_into_output.py -q
"""

from __future__ import annotations

import io

import pytest
import torch

from hyperclone_dist.checkpoint.digests import ALGORITHM, hash_file, segments
from hyperclone_dist.checkpoint.direct_file import DirectFile
from hyperclone_dist.growth.grow import Grower
from hyperclone_dist.growth.spec import GrowthSpec
from hyperclone_dist.layout import Layout
from hyperclone_dist.megatron.internals import tight_alias
from hyperclone_dist.megatron.mapping import chunk_params, fill_local, local_shape, local_tensor
from hyperclone_dist.sources import open_source

CASES = {  # tiny model: layouts (the MQA model's 2 grown query groups on 4 TP ranks share a group per 2 ranks)
    "llama-gqa2": [Layout(tp=2, pp=2), Layout(tp=4)],
    "llama-mqa-tied-bias": [Layout(tp=4)],
    "gpt2-tied": [Layout(tp=2, pp=2)],
    "qwen3": [Layout(tp=2)],
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_grown_into_the_parameter_equals_concatenated_and_copied(tiny_model_dirs, case, dtype):
    source = open_source(tiny_model_dirs[case])
    for layout in CASES[case]:
        grower = Grower(source.config, GrowthSpec(2, method="noisy", seed=3), source.get, source.get_rows)
        cfg = grower.large
        for pp_rank in range(layout.pp):
            for tp_rank in range(layout.tp):
                for name, row, layer in chunk_params(cfg, layout, pp_rank, 0):
                    before = local_tensor(cfg, layout, row, layer, tp_rank, grower.slice)
                    out = torch.full(local_shape(cfg, layout, row, layer), float("nan"), dtype=dtype)  # stale memory
                    fill_local(cfg, layout, row, layer, tp_rank, grower.slice_into, out)
                    expected = before.to(dtype)
                    assert torch.equal(out.view(torch.uint8), expected.contiguous().view(torch.uint8)), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_alias_of_a_view_saves_the_bytes_of_its_clone(dtype):
    """torch.save writes a tensor's whole storage: megatron clones views; the alias is written the same."""
    whole = torch.randn(6, 5).to(dtype)
    for view in torch.chunk(whole, 2, dim=0):
        alias = tight_alias(view)
        assert alias.data_ptr() == view.data_ptr() and alias.untyped_storage().nbytes() == view.nbytes
        saved, cloned = io.BytesIO(), io.BytesIO()
        torch.save(alias, saved)
        torch.save(view.clone(), cloned)
        assert saved.getvalue() == cloned.getvalue()
    assert tight_alias(whole) is not None and tight_alias(whole).data_ptr() == whole.data_ptr()


def test_written_digests_equal_those_of_one_read(tmp_path):
    """The digests taken while writing (stretches between ranges included) are those of reading the file."""
    parts = [bytes([k % 251]) * n for k, n in enumerate([100, 5000, 0, 7, (4 << 20) + 3, 64])]
    path = tmp_path / "f.bin"
    with DirectFile(path) as f:
        for k, part in enumerate(parts):
            if k % 2:
                f.begin_range()
            f.write(part)
            if k % 2:
                f.end_range()
    ranges = [(lo, n) for lo, n, _ in f.ranges]
    size, digest, digests = hash_file(path, ranges)
    assert size == sum(map(len, parts)) and digest == f.hexdigest()
    assert digests == [d for _, _, d in f.ranges] and len(ranges) == 3


def test_each_byte_is_one_segment_and_overlaps_are_extra():
    cut, extra = segments(100, [(10, 20), (15, 5), (30, 0), (30, 70)])
    assert cut == [(0, 10, None), (10, 20, 0), (30, 0, 2), (30, 70, 3)] and extra == [1]
    assert sum(n for _, n, _ in cut) == 100
    assert ALGORITHM == "xxh3-128"
