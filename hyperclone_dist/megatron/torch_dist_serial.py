"""torch_dist from fewer processes than ranks: one process plays each model-parallel rank in turn.

megatron's ``dist_checkpointing.save`` is collective: every rank plans its writes, the coordinator
gathers the plans into the checkpoint's global metadata, every rank writes its own ``__<rank>_*.distcp``
files. Here a single process becomes rank r of the layout (a ``fake`` process group: collectives are
no-ops), builds and fills only that rank's GPTModel chunks, lets megatron plan that rank's files, keeps
the rank's plan and write results (a few KB), and goes on to rank r+1. With every plan in hand it writes
the global metadata exactly as the coordinator would. The files are the ones a real tp x pp job writes.

Rank r's files are written (megatron/distcp_writer.py) on a writer thread while the main thread grows
rank r+1 (torch ops, file writes and hashing release the GIL), instead of in the writer processes
megatron forks for each save: at most two ranks' shards are in memory at once, and two cores are busy.
"""

from __future__ import annotations

import argparse
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist

from hyperclone_dist.errors import HypercloneError
from hyperclone_dist.growth.grow import Grower
from hyperclone_dist.layout import Layout
from hyperclone_dist.megatron import internals
from hyperclone_dist.megatron.cpu_shims import apply_cpu_shims
from hyperclone_dist.megatron.distcp_writer import manifest_entries, write_files
from hyperclone_dist.megatron.model import build_gpt_model
from hyperclone_dist.megatron.torch_dist import model_state
from hyperclone_dist.megatron.weights import fill_chunks


class _Recording:
    """megatron's torch_dist writer minus the global step and the writing: a save plans the rank's files
    (and copies the tensors megatron copies) and leaves them in ``pending``."""

    def __init__(self):
        self.pending: tuple | None = None
        self.strategy = internals.save_strategy(self._request)

    def _request(self, strategy, writer, save_state_dict_ret):
        self.pending = (internals.local_plan(strategy), internals.write_buckets(writer),
                        internals.writer_transforms(writer))
        return None, []

    def take_pending(self) -> tuple:
        pending, self.pending = self.pending, None
        return pending


class _ParameterMemory:
    """Hands the memory of a written rank's parameters to a rank built later, tensor by tensor of the
    same shape and dtype (ranks of one pipeline stage match exactly). Freshly mapped pages are what
    growing into new parameters costs most on a VM (each is faulted in, zeroed, and on some hosts first
    fetched from the hypervisor: ~1.5 s per GB on the VM of docs/benchmarks.md, where growing into resident
    memory takes ~0.5 s); reused ones are already resident. Only the first two ranks need fresh memory:
    rank 1's is faulted in ahead (``touch_ahead``) on the otherwise idle writer thread while rank 0 grows.
    Memory stays at two ranks' shards."""

    def __init__(self):
        self._free: dict[tuple, list[torch.Tensor]] = {}
        self._touched: Future | None = None  # memory being faulted in for the next rank built

    def touch_ahead(self, chunks: list, executor: ThreadPoolExecutor) -> None:
        """Fault in, on ``executor``, tensors shaped as ``chunks``' parameters for the next rank to borrow."""
        shapes = [(tuple(param.shape), param.dtype) for param in _parameters(chunks)]
        self._touched = executor.submit(_touched_tensors, shapes, torch.is_inference_mode_enabled())

    def take_back(self, chunks: list) -> None:
        """A written rank: keep its parameters' tensors, drop whatever an earlier rank left unused."""
        self._free = {}
        for param in _parameters(chunks):
            self._free.setdefault((tuple(param.shape), param.dtype), []).append(param.data)
            param.data = torch.empty(0, dtype=param.dtype)  # the module no longer holds the memory

    def lend(self, chunks: list) -> None:
        """A rank just built (its parameters allocated, never touched): reuse memory where shapes match."""
        if self._touched is not None:
            for tensor in self._touched.result():
                self._free.setdefault((tuple(tensor.shape), tensor.dtype), []).append(tensor)
            self._touched = None
        for param in _parameters(chunks):
            free = self._free.get((tuple(param.shape), param.dtype))
            if free:
                param.data = free.pop()


def _touched_tensors(shapes: list[tuple], inference: bool) -> list[torch.Tensor]:
    with torch.inference_mode(inference):  # the mode is per thread: the tensors are of the builder's kind
        return [torch.empty(shape, dtype=dtype).zero_() for shape, dtype in shapes]  # zero_ releases the GIL


def _parameters(chunks: list) -> list[torch.Tensor]:
    return [param for chunk in chunks for param in chunk.parameters()]


def _become_rank(rank: int, layout: Layout) -> None:
    from megatron.core import parallel_state  # heavy: imported when the conversion starts

    apply_cpu_shims()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", store=internals.fake_store(), rank=rank, world_size=layout.world)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=layout.tp,
                                             pipeline_model_parallel_size=layout.pp,
                                             virtual_pipeline_model_parallel_size=layout.vpp,
                                             create_gloo_process_groups=False)  # fake groups only


def save_grown_serially(grower: Grower, layout: Layout, iteration_dir: Path, dtype: torch.dtype,
                        args: argparse.Namespace, progress=None, checksums: bool = True) -> tuple[int, dict[str, dict]]:
    """Write the whole torch_dist checkpoint from this process, rank by rank. Returns the bytes of the
    parameters written and the checksum manifest's entries of the ``.distcp`` files (paths relative to
    the checkpoint directory, the parent of ``iteration_dir``), hashed as they were written ({} without
    ``checksums``). Must not run inside another process group (it creates and destroys its own)."""
    from megatron.core import dist_checkpointing, parallel_state

    if dist.is_initialized():
        raise HypercloneError("serial torch_dist conversion runs in a process without a process group")
    iteration_dir.mkdir(parents=True, exist_ok=True)
    recording = _Recording()
    plans, results, digests = [], [], {}  # each rank's local plan and write results, in rank order
    memory = _ParameterMemory()
    written = 0
    writing: tuple[object, Future, list] | None = None  # the rank whose files the writer thread is writing

    def collect() -> None:
        plan, future, chunks = writing
        rank_results, rank_digests = future.result()  # raises what stopped the writer
        plans.append(plan)
        results.append(rank_results)
        digests.update(rank_digests)
        memory.take_back(chunks)
        if progress is not None:
            progress.update(1)

    try:
        with (ThreadPoolExecutor(1, thread_name_prefix="distcp-writer") as writer,
              internals.in_process_results_queue(), internals.coordinator_sees_only_itself()):
            try:
                for rank in range(layout.world):
                    _become_rank(rank, layout)
                    chunks = build_gpt_model(grower.large, layout, dtype=dtype, perform_initialization=False)
                    memory.lend(chunks)
                    if rank == 0 and layout.tp > 1:  # rank 1 is of the same stage: the same shapes
                        memory.touch_ahead(chunks, writer)
                    fill_chunks(chunks, grower.large, layout, parallel_state.get_tensor_model_parallel_rank(),
                                parallel_state.get_pipeline_model_parallel_rank(), grower.slice, grower.slice_into)
                    dist_checkpointing.save(model_state(chunks, args), str(iteration_dir),
                                            sharded_strategy=recording.strategy, validate_access_integrity=False)
                    plan, buckets, transforms = recording.take_pending()
                    written += sum(p.numel() * p.element_size() for p in _parameters(chunks))
                    if writing is not None:
                        collect()  # rank r-1 is on disk before rank r's files start: two ranks in memory at most
                    writing = (plan, writer.submit(write_files, buckets, transforms, checksums), chunks)
                    del chunks, buckets
                collect()
            finally:
                if writing is not None:
                    writing[1].cancel()
        metadata = internals.write_global_metadata(iteration_dir, plans, results)
    finally:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()
    return written, manifest_entries(iteration_dir, metadata, results, digests) if checksums else {}
