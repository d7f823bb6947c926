"""megatron-core ``torch_dist`` shard files written by this process, without megatron's forked writers.

megatron's ``FileSystemWriterAsync`` writes each rank's ``__<rank>_<k>.distcp`` files in processes it
forks for every save, through the page cache, and the checksum manifest then reads them all back. Here the
same items go through PyTorch DCP's own item writer (so every saved chunk has the same bytes; for tensors
its steps are repeated here with torch.save's CRCs computed off the GIL, torch_zip.py) into
a DirectFile (checkpoint/direct_file.py): O_DIRECT, each byte hashed once as written. Used by one process playing every
rank (torch_dist_serial.py) and by each process of a torchrun job (torch_dist.py); Megatron-LM's training
saves keep megatron's own writers.
"""

from __future__ import annotations

from pathlib import Path

from hyperclone_dist.checkpoint.digests import ALGORITHM
from hyperclone_dist.checkpoint.direct_file import DirectFile
from hyperclone_dist.checkpoint.manifest import chunk_name
from hyperclone_dist.errors import HypercloneError
from hyperclone_dist.megatron import internals, torch_zip


def write_files(buckets: list, transforms: list, hashed: bool) -> tuple[list, dict[str, tuple]]:
    """Write one rank's ``.distcp`` files in this thread; returns megatron's write results and, per file
    name, (size, digest, [(offset, length, digest) of each saved item]) for the checksum manifest.

    The loop of megatron's ``FileSystemWriterAsync.write_preloaded_data`` (each item written as PyTorch
    DCP's item writer writes it, so the bytes are the same), into a DirectFile instead of ``open(path, "wb")``."""
    results, digests = [], {}
    for path, storage_key, (bytes_data, tensor_data) in buckets:
        with DirectFile(path, ALGORITHM if hashed else None) as stream:
            for item, data in [*bytes_data, *tensor_data]:
                stream.begin_range()
                results.append(_write_item(transforms, stream, data, item, storage_key))
                stream.end_range()
        digests[Path(path).name] = (stream.tell(), stream.hexdigest(), stream.ranges)
    return results, digests


def _write_item(transforms: list, stream, data, item, storage_key: str):
    """PyTorch DCP's ``_write_item`` for a tensor item (offset, its extensions' stream, ``torch.save``,
    length from the stream), with ``torch.save`` done by torch_zip.py (the same bytes, CRCs off the GIL);
    byte items, and a DCP without stream transforms, go through DCP's own."""
    if internals.is_bytes_item(item) or not transforms:
        return internals.write_item(transforms, stream, data, item, storage_key)
    offset = stream.tell()
    transformed, descriptors = internals.save_stream(transforms, item, stream)
    torch_zip.save(data, transformed)
    transformed.close()
    return internals.write_result(item, storage_key, offset, stream.tell() - offset, descriptors)


class DirectWrite:
    """megatron's torch_dist save with the rank's files written in this process (``write_files``) during the
    save; megatron's own finalisation (write results gathered, ``.metadata`` written by the coordinator) runs
    unchanged. After the save: ``written`` = (write results, digests), or ``failure``."""

    def __init__(self, checksums: bool):
        self.checksums = checksums
        self.written: tuple[list, dict] = ([], {})
        self.failure: Exception | None = None
        self.strategy = internals.save_strategy(self._request)

    def _request(self, strategy, writer, save_state_dict_ret):
        transforms = internals.writer_transforms(writer)

        def save() -> None:
            try:
                self.written = write_files(internals.write_buckets(writer), transforms, self.checksums)
            except Exception as exc:
                self.failure = exc
            internals.report_write_results(writer, self.written[0])

        return save, [lambda: internals.finalize_save(save_state_dict_ret)]


def manifest_entries(iteration_dir: Path, metadata, results: list, digests: dict) -> dict[str, dict]:
    """Manifest entries of the ``.distcp`` files, named as ``manifest.file_entries`` names them, from the
    digests taken while writing."""
    entries = {}
    by_offset = {(r.storage_data.relative_path, r.storage_data.offset): r for rank in results for r in rank}
    for name, (size, digest, ranges) in digests.items():
        tensors = []
        for offset, length, range_digest in ranges:
            found = by_offset[(name, offset)]
            if found.storage_data.length != length:  # the write results and the bytes hashed must agree
                raise HypercloneError(f"{name}: item at {offset} is {found.storage_data.length} bytes in the "
                                      f"write results, {length} hashed")
            tensors.append({"name": chunk_name(metadata, found.index), "offset": offset, "length": length,
                            "hash": range_digest})
        entries[f"{iteration_dir.name}/{name}"] = {"size": size, "hash": digest, "tensors": tensors}
    return entries
