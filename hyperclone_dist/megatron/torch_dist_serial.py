"""torch_dist from fewer processes than ranks: one process plays each model-parallel rank in turn.

megatron's ``dist_checkpointing.save`` is collective: every rank plans its writes, the coordinator
gathers the plans into the checkpoint's global metadata, every rank writes its own ``__<rank>_*.distcp``
files. Here a single process becomes rank r of the layout (a ``fake`` process group: collectives are
no-ops), builds and fills only that rank's GPTModel chunks, lets megatron plan and write that rank's
files, keeps the rank's plan and write results (a few KB), drops the model, and goes on to rank r+1.
With every plan in hand it writes the global metadata exactly as the coordinator would. The files are
the ones a real tp x pp job writes, with one rank's shard in memory at a time.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from pathlib import Path

import torch
import torch.distributed as dist

from hyperclone_dist.checkpoint.small_pt import is_short_write, os_error_behind
from hyperclone_dist.errors import HypercloneError
from hyperclone_dist.growth.grow import Grower
from hyperclone_dist.megatron import legacy
from hyperclone_dist.megatron.mapping import Layout


def _recording_strategy():
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncRequest
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    class RecordingStrategy(TorchDistSaveShardedStrategy):
        """megatron's torch_dist writer minus the global step: keeps (local plan, write results)."""

        def __init__(self):
            super().__init__("torch_dist", 1, thread_count=1)
            self.records: list = []

        def _get_save_and_finalize_callbacks(self, writer, save_state_dict_ret):
            save_fn, preload_fn, args = writer.get_save_function_and_args()

            def record():
                results = writer.retrieve_write_results()
                if isinstance(results, tuple):  # a wrapped worker exception
                    if is_short_write(results[0]):  # disk full or a file-size limit: name it
                        raise os_error_behind(Path(writer.path), results[0])
                    raise HypercloneError(f"writing a torch_dist shard failed: {results[0]}")
                self.records.append((self.cached_local_plan, results))

            return AsyncRequest(save_fn, args, [record], preload_fn=preload_fn)

    return RecordingStrategy()


@contextlib.contextmanager
def _coordinator_sees_only_itself():
    """The coordinator's gather of local plans becomes [its own plan] (the real global step runs at
    the end, from all recorded plans)."""
    from torch.distributed.checkpoint.utils import _DistWrapper

    original = _DistWrapper.gather_object
    _DistWrapper.gather_object = lambda self, obj: [obj] if self.is_coordinator else None
    try:
        yield
    finally:
        _DistWrapper.gather_object = original


@contextlib.contextmanager
def _quiet_writer_log():
    """megatron logs a failed shard write before the error reaches ``record``, which reports it once."""
    log = logging.getLogger("megatron.core.dist_checkpointing.strategies.filesystem_async")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def _become_rank(rank: int, layout: Layout) -> None:
    from megatron.core import parallel_state
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from hyperclone_dist.megatron.cpu_shims import apply_cpu_shims

    apply_cpu_shims()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=layout.world)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=layout.tp,
                                             pipeline_model_parallel_size=layout.pp,
                                             virtual_pipeline_model_parallel_size=layout.vpp,
                                             create_gloo_process_groups=False)  # fake groups only


def save_grown_serially(grower: Grower, layout: Layout, iteration_dir: Path, dtype: torch.dtype,
                        progress=None) -> int:
    """Write the whole torch_dist checkpoint from this process, rank by rank; returns bytes written.
    Must not run inside another process group (it creates and destroys its own)."""
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync
    from megatron.core.dist_checkpointing.strategies.torch import MCoreSavePlanner

    from hyperclone_dist.megatron.model import build_gpt_model
    from hyperclone_dist.megatron.torch_dist import fill_from_grower, model_state
    from hyperclone_dist.megatron.writer_queue import own_results_queue

    if dist.is_initialized():
        raise HypercloneError("serial torch_dist conversion runs in a process without a process group")
    iteration_dir.mkdir(parents=True, exist_ok=True)
    own_results_queue()  # megatron's writer Manager dies with this process, even by SIGKILL
    strategy = _recording_strategy()
    written = 0
    try:
        with _coordinator_sees_only_itself(), _quiet_writer_log():
            for rank in range(layout.world):
                _become_rank(rank, layout)
                chunks = build_gpt_model(grower.large, dtype=dtype, perform_initialization=False,
                                         vocab_divisible_by=layout.vocab_divisible_by)
                fill_from_grower(chunks, grower, layout, parallel_state.get_tensor_model_parallel_rank(),
                                 parallel_state.get_pipeline_model_parallel_rank())
                state = model_state(chunks, grower, layout, dtype)
                dist_checkpointing.save(state, str(iteration_dir), sharded_strategy=strategy,
                                        validate_access_integrity=False)
                written += sum(p.numel() * p.element_size() for c in chunks for p in c.parameters())
                del chunks, state
                gc.collect()
                if progress is not None:
                    progress.update(1)
        plans = [plan for plan, _ in strategy.records]
        results = [result for _, result in strategy.records]
        planner = MCoreSavePlanner(dedup_replicated_tensors=False, flatten_state_dict=False)
        _, metadata = planner.create_global_plan(plans)
        metadata.all_local_plans = plans
        FileSystemWriterAsync(str(iteration_dir)).finish(metadata, results)
    finally:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()
    return written
