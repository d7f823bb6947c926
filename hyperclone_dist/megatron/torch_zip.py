"""``torch.save`` of one object, byte for byte, with the zip's CRC-32s computed by zlib-ng off the GIL.

torch.save computes each record's CRC-32 with miniz's table-driven loop (~1 GB/s) inside its pybind
``write_record``, which holds the GIL: in the 374M -> 1.36B conversion of docs/benchmarks.md that was 62%
of the writer thread's CPU, and the thread growing the next rank's slices waited on it. Here torch's own
zip writer runs with its CRC computation switched off for this one writer (not the process-wide
``set_crc32_options``, which would change the bytes of every other save running at the same time) and
writes through ``CrcFillingStream``, which computes each record's CRC-32 with zlib-ng (~10-20 GB/s, GIL
released) and puts it where torch would have: the record's data descriptor (written after its data), its
central-directory entry, and the second half of ``.data/serialization_id`` (torch folds every data
descriptor's CRC into it with ``c10::hash_combine``). Nothing else in the bytes depends on the CRC.

The stream checks torch's write sequence as it goes (local header, name, extra field in one write or more,
data, descriptor; the central directory in one write) and refuses, in one line, anything it does not
recognise, so a torch that writes differently fails loudly instead of writing a zip with wrong CRCs
(tests/test_torch_zip.py compares the bytes with torch.save's).
"""

from __future__ import annotations

import io
import struct

import torch
from zlib_ng import zlib_ng

from hyperclone_dist.errors import HypercloneError
from hyperclone_dist.megatron import internals

LOCAL_HEADER = b"PK\x03\x04"  # 30 bytes, then the name and the extra field
DATA_DESCRIPTOR = b"PK\x07\x08"  # signature, CRC-32, sizes (4 bytes each; 8 with zip64)
CENTRAL_ENTRY = b"PK\x01\x02"  # 46 bytes, then name, extra, comment
SERIALIZATION_ID = b".data/serialization_id"  # 20 digits of record-name hash, 20 of the folded CRCs
MASK64 = (1 << 64) - 1


def hash_combine(seed: int, value: int) -> int:
    """c10::hash_combine on 64-bit size_t: how torch folds each descriptor's CRC into the serialization id."""
    return (seed ^ (value + 0x9E3779B9 + (seed << 6) + (seed >> 2))) & MASK64


class _Record:
    def __init__(self, size: int | None):
        self.size = size  # announced by the writer proxy; None: the record's data is its next write
        self.name = b""
        self.name_left = self.extra_left = 0  # bytes of the name and the extra field still to come
        self.crc = 0
        self.received = 0


class CrcFillingStream(io.RawIOBase):
    """Between torch's zip writer (CRC off) and ``out``: forwards every write, with the CRC fields filled."""

    def __init__(self, out):
        super().__init__()
        self.out = out
        self.records: list[_Record] = []
        self._announced: int | None = None
        self._state = "header"  # header | name | data | descriptor | tail
        self._torch_fold = 0  # what torch folds (zero CRCs): checked against the id it writes
        self._true_fold = 0  # what torch would fold with its CRCs on

    def writable(self) -> bool:
        return True

    def announce(self, size: int) -> None:
        """The next record's data size (the proxy calls this just before torch writes the record)."""
        self._announced = size

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        patched = self._patch(view)
        for chunk, fold in ((view, "_torch_fold"), (patched, "_true_fold")):
            if len(chunk) >= 8 and chunk[:4] == DATA_DESCRIPTOR:  # torch's rule: any write that starts so
                setattr(self, fold, hash_combine(getattr(self, fold), struct.unpack_from("<I", chunk, 4)[0]))
        self.out.write(patched)
        return len(view)

    def flush(self) -> None:
        self.out.flush()

    @property
    def complete(self) -> bool:
        """The central directory has been written (and its CRCs filled)."""
        return self._state == "tail"

    def _patch(self, view: memoryview):
        state = self._state
        if state == "header":
            return self._header_or_central(view)
        record = self.records[-1]
        if state == "name":  # the name, then the extra field (zip64 fields and padding: one write or more)
            if record.name_left:
                if len(view) > record.name_left:
                    raise _unexpected(f"a {len(view)}-byte write where {record.name_left} bytes of name were due")
                record.name += bytes(view)
                record.name_left -= len(view)
            elif len(view) <= record.extra_left:
                record.extra_left -= len(view)
            else:
                raise _unexpected(f"a {len(view)}-byte write where {record.extra_left} bytes of extra field were due")
            if not record.name_left and not record.extra_left:
                self._state = "header" if record.size == 0 else "data"
            return view
        if state == "data":
            if record.name.endswith(SERIALIZATION_ID):
                view = self._true_serialization_id(view)
            record.crc = zlib_ng.crc32(view, record.crc)
            record.received += len(view)
            if record.size is None or record.received >= record.size:
                self._state = "descriptor"
            return view
        if state == "descriptor":
            return self._descriptor(view, record)
        return view  # tail: zip64 end records and the end of central directory hold no CRC

    def _header_or_central(self, view: memoryview):
        if len(view) == 30 and view[:4] == LOCAL_HEADER:
            record = _Record(self._announced)
            self._announced = None
            record.name_left, record.extra_left = struct.unpack_from("<HH", view, 26)
            self.records.append(record)
            self._state = "name" if record.name_left or record.extra_left else ("header" if record.size == 0
                                                                                 else "data")
            return view
        if view[:4] == CENTRAL_ENTRY:
            self._state = "tail"
            return self._central_directory(view)
        raise _unexpected(f"a {len(view)}-byte write where a local header or the central directory was due")

    def _descriptor(self, view: memoryview, record: _Record):
        if len(view) not in (16, 24) or view[:4] != DATA_DESCRIPTOR:
            raise _unexpected(f"a {len(view)}-byte write where a data descriptor was due")
        size = struct.unpack_from("<I" if len(view) == 16 else "<Q", view, 12 if len(view) == 16 else 16)[0]
        crc = struct.unpack_from("<I", view, 4)[0]
        if size != record.received or crc != 0 or (record.size is not None and size != record.size):
            raise _unexpected(f"a data descriptor for {size} bytes, CRC {crc:#x}, after {record.received} "
                              "bytes of data and with CRCs off")
        patched = bytearray(view)
        struct.pack_into("<I", patched, 4, record.crc)
        self._state = "header"
        return patched

    def _central_directory(self, view: memoryview):
        patched = bytearray(view)
        offset = 0
        for index, record in enumerate(self.records):
            if patched[offset:offset + 4] != CENTRAL_ENTRY or struct.unpack_from("<I", patched, offset + 16)[0]:
                raise _unexpected(f"central directory entry {index} not where expected, or with a CRC")
            name_length, extra_length, comment_length = struct.unpack_from("<HHH", patched, offset + 28)
            name = bytes(patched[offset + 46:offset + 46 + name_length])
            if name != record.name:
                raise _unexpected(f"central directory names {name!r} where {record.name!r} was written")
            struct.pack_into("<I", patched, offset + 16, record.crc)
            offset += 46 + name_length + extra_length + comment_length
        if offset != len(patched):
            raise _unexpected(f"central directory of {len(patched)} bytes for {len(self.records)} records "
                              f"of {offset}")
        return patched

    def _true_serialization_id(self, view: memoryview):
        text = bytes(view)
        if len(text) != 40 or text[20:] != b"%020d" % self._torch_fold:
            raise _unexpected(f"serialization id {text[:48]!r} does not end in the folded CRCs "
                              f"{self._torch_fold:020d}")
        return memoryview(text[:20] + b"%020d" % self._true_fold)


class _AnnouncingWriter:
    """torch's zip writer as ``torch.serialization._save`` uses it, telling the stream each record's size."""

    def __init__(self, writer, stream: CrcFillingStream):
        self._writer, self._stream = writer, stream

    def write_record(self, name: str, data, size: int) -> None:
        self._stream.announce(size)
        self._writer.write_record(name, data, size)

    def __getattr__(self, name: str):
        return getattr(self._writer, name)


def save(obj, out) -> None:
    """``torch.save(obj, out)``: the same bytes, the CRCs computed off the GIL."""
    stream = CrcFillingStream(out)
    writer = internals.torch_zip_writer(stream, crc32=False)
    internals.torch_save_records(obj, _AnnouncingWriter(writer, stream))
    writer.write_end_of_file()
    stream.flush()
    if not stream.complete:
        raise _unexpected("the archive ended without its central directory")


def _unexpected(what: str) -> HypercloneError:
    return HypercloneError(f"torch.save wrote {what} (hyperclone_dist/megatron/torch_zip.py does not know "
                           f"this torch {torch.__version__}'s zip layout)")
