"""torch_zip.save writes torch.save's bytes (CRC-32s, central directory, serialization id included) for the
objects DCP saves and the awkward ones, and refuses a write sequence it does not know instead of guessing."""

from __future__ import annotations

import io
import zipfile

import pytest
import torch

from hyperclone_dist.errors import HypercloneError
from hyperclone_dist.megatron import distcp_writer, internals, torch_zip


def _signature_first() -> torch.Tensor:
    """A tensor whose data begins with the data-descriptor signature (torch folds such a write's bytes
    4..8 into the serialization id too)."""
    data = bytearray(torch_zip.DATA_DESCRIPTOR + bytes(range(60)))
    return torch.frombuffer(data, dtype=torch.uint8).clone()


CASES = {
    "float32": lambda: torch.arange(10.0),
    "empty": lambda: torch.empty(0),
    "scalar-bf16": lambda: torch.tensor(3, dtype=torch.bfloat16),
    "matrix-bf16": lambda: torch.randn(300, 77, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16),
    "view-of-larger": lambda: torch.arange(100)[10:20],
    "non-contiguous": lambda: torch.arange(24.0).view(4, 6).t(),
    "signature-first": _signature_first,
    "dict-with-empty": lambda: {"a": torch.ones(3), "b": torch.zeros(0, 4), "c": torch.ones(2, dtype=torch.int8)},
    "shared-storage": lambda: (lambda t: [t, t[1:], t.view(2, 2)])(torch.arange(4.0)),
    "four-mib": lambda: torch.ones(1 << 20),
}


@pytest.mark.parametrize("make", list(CASES.values()), ids=list(CASES))
def test_same_bytes_as_torch_save(make):
    obj = make()
    expected, written = io.BytesIO(), io.BytesIO()
    torch.save(obj, expected)
    torch_zip.save(obj, written)
    assert written.getvalue() == expected.getvalue()
    with zipfile.ZipFile(written) as archive:  # every CRC where a zip reader checks it
        assert archive.testzip() is None


def test_the_crcs_are_filled_not_copied():
    """Two tensors differing in one byte: archives differ exactly where torch's CRCs differ."""
    a, b = torch.zeros(1000, dtype=torch.uint8), torch.zeros(1000, dtype=torch.uint8)
    b[500] = 1
    outs = []
    for t in (a, b):
        expected, written = io.BytesIO(), io.BytesIO()
        torch.save(t, expected)
        torch_zip.save(t, written)
        assert written.getvalue() == expected.getvalue()
        outs.append(written.getvalue())
    assert outs[0] != outs[1]


def test_hash_combine_matches_torch():
    """The serialization id's second half of a one-tensor archive, recomputed from its descriptors."""
    buffer = io.BytesIO()
    torch.save(torch.arange(5.0), buffer)
    data = buffer.getvalue()
    fold, at = 0, data.find(torch_zip.DATA_DESCRIPTOR)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".data/serialization_id"))
        serialization_id = archive.read(name)
    while at != -1 and data[at - 40:at] != serialization_id:  # descriptors before the id's own
        fold = torch_zip.hash_combine(fold, int.from_bytes(data[at + 4:at + 8], "little"))
        at = data.find(torch_zip.DATA_DESCRIPTOR, at + 16)
    assert serialization_id[20:] == b"%020d" % fold


def test_an_unknown_write_sequence_is_refused():
    stream = torch_zip.CrcFillingStream(io.BytesIO())
    with pytest.raises(HypercloneError, match="local header or the central directory"):
        stream.write(b"not a zip header")
    stream = torch_zip.CrcFillingStream(io.BytesIO())
    header = bytearray(30)
    header[:4] = torch_zip.LOCAL_HEADER
    header[26:28] = (4).to_bytes(2, "little")
    stream.announce(3)
    stream.write(bytes(header))
    stream.write(b"name")
    stream.write(b"abc")
    with pytest.raises(HypercloneError, match="data descriptor"):
        stream.write(torch_zip.DATA_DESCRIPTOR + bytes(4) + (3).to_bytes(4, "little") + (4).to_bytes(4, "little"))


@pytest.mark.parametrize("make", [CASES["matrix-bf16"], CASES["empty"], CASES["view-of-larger"]],
                         ids=["matrix-bf16", "empty", "view-of-larger"])
def test_distcp_items_as_dcp_writes_them(make):
    """A tensor item after two others in one stream: the same bytes and write result as PyTorch DCP's own
    ``_write_item`` (what the converter called before)."""
    from torch.distributed.checkpoint.filesystem import _StorageWriterTransforms
    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import WriteItem, WriteItemType

    transforms = [_StorageWriterTransforms()]
    items = [(WriteItem(index=MetadataIndex("bytes"), type=WriteItemType.BYTE_IO), io.BytesIO(b"x" * 77)),
             (WriteItem(index=MetadataIndex("first"), type=WriteItemType.TENSOR), torch.ones(5)),
             (WriteItem(index=MetadataIndex("it"), type=WriteItemType.TENSOR), make())]
    streams, results = [io.BytesIO(), io.BytesIO()], [[], []]
    for item, data in items:
        results[0].append(distcp_writer._write_item(transforms, streams[0], data, item, "__0_0.distcp"))
        results[1].append(internals.write_item(transforms, streams[1], data, item, "__0_0.distcp"))
    assert streams[0].getvalue() == streams[1].getvalue()
    assert results[0] == results[1]


def test_an_extra_field_in_several_writes_gets_its_crc():
    """Past 4 GiB of archive torch writes a record's zip64 fields and its padding as separate writes (seen
    on a 4.6 GB file: the bytes equal torch.save's); the stream follows the lengths its header gives."""
    import zlib

    out = io.BytesIO()
    stream = torch_zip.CrcFillingStream(out)
    name, data = b"archive/data/0", b"\x01\x02\x03"
    header = bytearray(30)
    header[:4] = torch_zip.LOCAL_HEADER
    header[26:30] = len(name).to_bytes(2, "little") + (10).to_bytes(2, "little")
    stream.announce(len(data))
    for write in (bytes(header), name, b"\x01\x00\x08\x00", b"FB\x02\x00ZZ", data,
                  torch_zip.DATA_DESCRIPTOR + bytes(4) + (3).to_bytes(4, "little") * 2):
        stream.write(write)
    central = bytearray(46)
    central[:4] = torch_zip.CENTRAL_ENTRY
    central[28:30] = len(name).to_bytes(2, "little")
    stream.write(bytes(central) + name)
    written = out.getvalue()
    crc = zlib.crc32(data).to_bytes(4, "little")
    descriptor_at = 30 + len(name) + 10 + len(data)
    assert written[descriptor_at + 4:descriptor_at + 8] == crc
    assert written[descriptor_at + 16 + 16:descriptor_at + 16 + 20] == crc  # the central directory entry's
