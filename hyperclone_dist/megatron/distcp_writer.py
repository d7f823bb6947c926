"""megatron-core ``torch_dist`` shard files written by this process, without megatron's forked writers.

megatron's ``FileSystemWriterAsync`` writes each rank's ``__<rank>_<k>.distcp`` files in processes it
forks for every save, through the page cache, and the checksum manifest then reads them all back. Here the
same items go through the same PyTorch DCP ``_write_item`` (so every saved chunk has the same bytes) into
a DirectFile (checkpoint/direct_file.py): O_DIRECT, hashed as written. Used by one process playing every
rank (torch_dist_serial.py) and by each process of a torchrun job (torch_dist.py); Megatron-LM's training
saves keep megatron's own writers.
"""

from __future__ import annotations

import contextlib
import queue
from pathlib import Path

from hyperclone_dist.checkpoint.direct_file import DirectFile
from hyperclone_dist.checkpoint.manifest import ALGORITHM, chunk_name
from hyperclone_dist.errors import HypercloneError


def write_files(buckets: list, transforms: list, hashed: bool) -> tuple[list, dict[str, tuple]]:
    """Write one rank's ``.distcp`` files in this thread; returns megatron's write results and, per file
    name, (size, digest, [(offset, length, digest) of each saved item]) for the checksum manifest.

    The loop of megatron's ``FileSystemWriterAsync.write_preloaded_data`` (each item through PyTorch DCP's
    ``_write_item``, so the bytes are the same), into a DirectFile instead of ``open(path, "wb")``."""
    from torch.distributed.checkpoint.filesystem import SerializationFormat, _write_item

    results, digests = [], {}
    for path, storage_key, (bytes_data, tensor_data) in buckets:
        with DirectFile(path, ALGORITHM if hashed else None) as stream:
            for item, data in [*bytes_data, *tensor_data]:
                stream.begin_range()
                results.append(_write_item(*transforms, stream, data, item, storage_key,
                                           serialization_format=SerializationFormat.TORCH_SAVE))
                stream.end_range()
        digests[Path(path).name] = (stream.tell(), stream.hexdigest(), stream.ranges)
    return results, digests


def writer_transforms(writer) -> list:
    """The leading argument megatron passes to ``_write_item`` for ``writer`` (its stream transforms)."""
    return [writer.transforms] if hasattr(writer, "transforms") else []


def direct_write_strategy(checksums: bool):
    """megatron's torch_dist save strategy with the rank's files written in this process (``write_files``)
    during the save; megatron's own finalisation (write results gathered, ``.metadata`` written by the
    coordinator) runs unchanged. After the save: ``written`` = (write results, digests), or ``failure``."""
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncRequest
    from megatron.core.dist_checkpointing.strategies.state_dict_saver import save_state_dict_async_finalize
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    class DirectWriteStrategy(TorchDistSaveShardedStrategy):
        def __init__(self):
            super().__init__("torch_dist", 1, thread_count=1)
            self.written: tuple[list, dict] = ([], {})
            self.failure: Exception | None = None

        def _get_save_and_finalize_callbacks(self, writer, save_state_dict_ret):
            transforms = writer_transforms(writer)

            def save() -> None:
                try:
                    self.written = write_files(writer.write_buckets or [], transforms, checksums)
                except Exception as exc:  # noqa: BLE001 - kept for the caller; the collective save goes on
                    self.failure = exc
                if writer.results_queue is not None:  # what retrieve_write_results reads: {writer k: results}
                    writer.results_queue.put({0: self.written[0]})

            def finalize() -> None:
                save_state_dict_async_finalize(*save_state_dict_ret)

            return AsyncRequest(save, (), [finalize])

    return DirectWriteStrategy()


@contextlib.contextmanager
def in_process_results_queue():
    """No multiprocessing Manager for megatron's write results: nothing here runs in another process."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    before = filesystem_async._results_queue
    filesystem_async._results_queue = queue.Queue()
    try:
        yield
    finally:
        filesystem_async._results_queue = before


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
