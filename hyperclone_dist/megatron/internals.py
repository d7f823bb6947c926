"""Every private PyTorch, megatron-core and DeepSpeed internal this project touches, in one place, for the
versions it was written for (``WRITTEN_FOR``; the first use checks them and that each internal is there).

Why each is needed:
- megatron-core's torch_dist save strategy writes through processes it forks, via the page cache; the
  converter writes the same bytes in-process (distcp_writer.py) by replacing the strategy's write step
  (``_get_save_and_finalize_callbacks``) and calling PyTorch DCP's ``_write_item`` itself;
- torch.save computes its zip CRC-32s slowly and holding the GIL; torch_zip.py runs torch's own zip writer
  (``torch._C.PyTorchFileWriter``) with CRCs off and fills them in, feeding it ``torch.serialization._save``;
- megatron's writer clones every tensor that is a view into a larger storage (the SwiGLU ``linear_fc1``
  halves its sharded-state factory cuts): the factories are applied first and such views aliased
  (``without_view_copies``), so the bytes are written from the parameter's own memory;
- megatron keeps its write results in a module-level queue (``filesystem_async._results_queue``), a
  multiprocessing Manager by default: replaced by an in-process queue, or by a Manager that dies with its
  owner (writer_queue.py);
- one process playing every rank (torch_dist_serial.py) needs a process group whose collectives do nothing
  (PyTorch's test-only ``FakeStore``) and DCP's coordinator gather limited to its own plan (``_DistWrapper``);
- DeepSpeed links its per-parameter optimizer-state views lazily (``_lazy_init_hp_params_optimizer_state``),
  which grown optimizer state must trigger before the first step (train/moments.py);
- the checkpoint engine that reads with ``weights_only=True`` (train/checkpointing.py) is built, as DeepSpeed
  builds its own, from the engine's parsed config (``DeepSpeedEngine._config``), so that it writes in the
  serialization that config asks for (zip by default, which DeepSpeed's ``zero_to_fp32.py`` memory-maps).
"""

from __future__ import annotations

import contextlib
import functools
import queue
from collections.abc import Callable
from importlib import metadata

import torch

from hyperclone_dist.errors import HypercloneError

# package: (lowest version, first version not supported)
WRITTEN_FOR = {"torch": ((2, 6), (3, 0)), "megatron-core": ((0, 16), (0, 17)), "deepspeed": ((0, 17), (1, 0))}


def _version(package: str) -> tuple[int, int]:
    text = metadata.version(package)
    major, minor = (int("".join(c for c in part if c.isdigit()) or 0) for part in text.split(".")[:2])
    return major, minor


@functools.cache
def require_versions() -> None:
    """Refuse, in one line, versions these internals were not written for (checked once per process)."""
    for package, (low, high) in WRITTEN_FOR.items():
        found = _version(package)
        if not low <= found < high:
            raise HypercloneError(
                f"{package} {metadata.version(package)} is installed; hyperclone_dist/megatron/internals.py was "
                f"written for {package} >= {'.'.join(map(str, low))}, < {'.'.join(map(str, high))} "
                "(install configs/constraints.txt)")


def _missing(what: str) -> HypercloneError:
    return HypercloneError(f"{what} is gone from the installed version; hyperclone_dist/megatron/internals.py "
                           f"needs updating for it")


# ---- megatron-core torch_dist saving ------------------------------------------------------------------
def save_strategy(make_request: Callable) -> object:
    """megatron's ``TorchDistSaveShardedStrategy`` (one writer thread) whose write step is
    ``make_request(strategy, writer, save_state_dict_ret) -> (save_fn or None, [finalize_fn, ...])``: planning,
    tensor copies and megatron's finalisation are megatron's own."""
    require_versions()
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncRequest
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    if not hasattr(TorchDistSaveShardedStrategy, "_get_save_and_finalize_callbacks"):
        raise _missing("megatron-core TorchDistSaveShardedStrategy._get_save_and_finalize_callbacks")

    class Strategy(TorchDistSaveShardedStrategy):
        def __init__(self):
            super().__init__("torch_dist", 1, thread_count=1)

        def _get_save_and_finalize_callbacks(self, writer, save_state_dict_ret):
            save, finalize = make_request(self, writer, save_state_dict_ret)
            return AsyncRequest(save, (), finalize)

    return Strategy()


def without_view_copies(sharded_state_dict: dict) -> dict:
    """The state with megatron's sharded-tensor factories applied (as its save applies them first) and
    every tensor that is a contiguous view into a larger storage (the SwiGLU ``linear_fc1`` halves) replaced
    by an alias of just its bytes: megatron's writer would clone such a view, since ``torch.save`` writes a
    tensor's whole storage. The alias shares the memory, and ``torch.save`` writes the same bytes as for
    the clone."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    apply_factories(sharded_state_dict)
    for value in nested_values(sharded_state_dict):
        if isinstance(value, ShardedTensor) and isinstance(value.data, torch.Tensor):
            value.data = tight_alias(value.data)
    return sharded_state_dict


def tight_alias(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or, for a contiguous CPU view into a larger storage, the same memory as a tensor whose
    storage is exactly its bytes (through numpy, which wraps a pointer and a length)."""
    t = t.detach()
    if (t.device.type != "cpu" or not t.is_contiguous() or t.numel() == 0
            or t.untyped_storage().nbytes() == t.numel() * t.element_size()):
        return t
    return torch.from_numpy(t.reshape(-1).view(torch.uint8).numpy()).view(t.dtype).view(t.shape)


def local_plan(strategy) -> object:
    """The rank's DCP save plan, as the strategy cached it while planning."""
    return strategy.cached_local_plan


def write_buckets(writer) -> list:
    """What megatron's async writer would write: [(path, storage key, (bytes items, tensor items))]."""
    return writer.write_buckets or []


def writer_transforms(writer) -> list:
    """The leading argument megatron passes to DCP's ``_write_item`` for ``writer`` (its stream transforms)."""
    return [writer.transforms] if hasattr(writer, "transforms") else []


def report_write_results(writer, results: list) -> None:
    """Hand the rank's write results to megatron's finalisation (what its writer processes would put)."""
    if writer.results_queue is not None:  # retrieve_write_results reads {writer k: results}
        writer.results_queue.put({0: results})


def finalize_save(save_state_dict_ret) -> None:
    from megatron.core.dist_checkpointing.strategies.state_dict_saver import save_state_dict_async_finalize

    save_state_dict_async_finalize(*save_state_dict_ret)


def torch_zip_writer(stream, crc32: bool):
    """The zip writer ``torch.save`` opens on a stream, with its CRC-32 computation on or off for it alone."""
    require_versions()
    if not hasattr(torch._C, "PyTorchFileWriter") or not hasattr(torch.serialization, "_get_storage_alignment"):
        raise _missing("torch._C.PyTorchFileWriter")
    return torch._C.PyTorchFileWriter(stream, crc32, torch.serialization._get_storage_alignment())


def torch_save_records(obj, zip_writer) -> None:
    """What ``torch.save(obj, f)`` writes into its zip writer, with its default pickling; the caller ends
    the archive (``write_end_of_file``)."""
    if not hasattr(torch.serialization, "_save"):
        raise _missing("torch.serialization._save")
    torch.serialization._save(obj, zip_writer, torch.serialization.pickle, torch.serialization.DEFAULT_PROTOCOL,
                              _disable_byteorder_record=False)


def save_stream(transforms: list, item, stream):
    """DCP's stream for one item's bytes (its extensions, e.g. compression, applied) and the descriptors
    its write result records."""
    return transforms[0].transform_save_stream(item, stream)


def is_bytes_item(item) -> bool:
    from torch.distributed.checkpoint.planner import WriteItemType

    return item.type == WriteItemType.BYTE_IO


def write_result(item, storage_key: str, offset: int, length: int, descriptors: list):
    """The write result DCP's ``_write_item`` returns for an item written at ``offset``."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.storage import WriteResult

    return WriteResult(index=item.index, size_in_bytes=length,
                       storage_data=_StorageInfo(storage_key, offset, length,
                                                 transform_descriptors=descriptors or None))


def write_item(transforms: list, stream, data, item, storage_key: str):
    """PyTorch DCP's own writing of one saved item into ``stream`` (so every chunk has DCP's bytes)."""
    from torch.distributed.checkpoint import filesystem

    if not hasattr(filesystem, "_write_item"):
        raise _missing("torch.distributed.checkpoint.filesystem._write_item")
    return filesystem._write_item(*transforms, stream, data, item, storage_key,
                                  serialization_format=filesystem.SerializationFormat.TORCH_SAVE)


def write_global_metadata(iteration_dir, plans: list, results: list):
    """What the coordinator of a real job writes last: ``.metadata``, from every rank's plan and results."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync
    from megatron.core.dist_checkpointing.strategies.torch import MCoreSavePlanner

    planner = MCoreSavePlanner(dedup_replicated_tensors=False, flatten_state_dict=False)
    _, global_metadata = planner.create_global_plan(plans)
    global_metadata.all_local_plans = plans
    FileSystemWriterAsync(str(iteration_dir)).finish(global_metadata, results)
    return global_metadata


def _filesystem_async():
    require_versions()
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if not hasattr(filesystem_async, "_results_queue"):
        raise _missing("megatron-core filesystem_async._results_queue")
    return filesystem_async


def results_queue_is_set() -> bool:
    return _filesystem_async()._results_queue is not None


def set_results_queue(results) -> None:
    """The queue megatron's torch_dist writer collects its write results through."""
    _filesystem_async()._results_queue = results


@contextlib.contextmanager
def in_process_results_queue():
    """No multiprocessing Manager for megatron's write results: nothing here runs in another process."""
    module = _filesystem_async()
    before = module._results_queue
    module._results_queue = queue.Queue()
    try:
        yield
    finally:
        module._results_queue = before


# ---- one process as every rank --------------------------------------------------------------------------
def fake_store():
    """A store for ``init_process_group("fake")``: collectives that do nothing (PyTorch's test utility)."""
    require_versions()
    from torch.testing._internal.distributed.fake_pg import FakeStore

    return FakeStore()


@contextlib.contextmanager
def coordinator_sees_only_itself():
    """DCP's coordinator gather of local plans becomes [its own plan]."""
    from torch.distributed.checkpoint.utils import _DistWrapper

    original = _DistWrapper.gather_object
    _DistWrapper.gather_object = lambda self, obj: [obj] if self.is_coordinator else None
    try:
        yield
    finally:
        _DistWrapper.gather_object = original


# ---- DeepSpeed optimizer state --------------------------------------------------------------------------
def links_state_lazily(optimizer) -> bool:
    """A ZeRO optimizer whose per-parameter state views are linked on demand."""
    return hasattr(optimizer, "_lazy_init_hp_params_optimizer_state")


def relink_optimizer_state(engine) -> None:
    """Point DeepSpeed's per-parameter views at the optimizer's current state tensors (a checkpoint load
    replaces those tensors and leaves the views unset)."""
    optimizer = engine.optimizer
    if links_state_lazily(optimizer):
        require_versions()
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()


# ---- DeepSpeed checkpoint engine ------------------------------------------------------------------------
def deepspeed_config(engine) -> object:
    """The engine's parsed ``DeepSpeedConfig`` (``engine.config`` is only the JSON it was given)."""
    require_versions()
    if not hasattr(engine, "_config"):
        raise _missing("DeepSpeedEngine._config")
    return engine._config
