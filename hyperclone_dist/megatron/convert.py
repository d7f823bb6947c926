"""Shard-direct conversion: each model-parallel rank's tensors, grown straight from the small tensors.

``convert_to_megatron`` writes whole checkpoints, one rank at a time in a single process, or, under
torchrun, each process writing only the ranks assigned to it. (The trainer's ``--clone-from`` grows its
own rank's slices in memory through the same mapping, megatron/weights.py; no files in between.)

    hyperclone convert small/ --out ckpt --format legacy --tp 2 --pp 2 --width-factor 2 --method noisy
    torchrun --nproc_per_node 4 -m hyperclone_dist.cli.main convert small/ --out ckpt --format legacy --tp 2 --pp 2 ...
"""

from __future__ import annotations

import argparse
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from hyperclone_dist.checkpoint import lock
from hyperclone_dist.checkpoint.atomic import make_partial_dir, publish
from hyperclone_dist.checkpoint.hf_writer import copy_companions
from hyperclone_dist.checkpoint.manifest import write_manifest, write_manifests_together
from hyperclone_dist.checkpoint.small_pt import torch_save
from hyperclone_dist.config import ModelConfig
from hyperclone_dist.errors import HypercloneError
from hyperclone_dist.growth.grow import Grower
from hyperclone_dist.growth.spec import GrowthSpec
from hyperclone_dist.layout import Layout
from hyperclone_dist.megatron import legacy, torch_dist
from hyperclone_dist.megatron.light_imports import import_megatron_core
from hyperclone_dist.megatron.lm_args import HF_TOKENIZER, TokenizerRef, hf_tokenizer_at, tokenizer_ref
from hyperclone_dist.megatron.model import check_representable
from hyperclone_dist.megatron.parallel import agreed, init_model_parallel
from hyperclone_dist.megatron.torch_dist_serial import save_grown_serially
from hyperclone_dist.megatron.weights import rank_state_dicts
from hyperclone_dist.progress import progress_bar
from hyperclone_dist.sources import open_source

MEGATRON_FORMATS = ("legacy", "torch_dist")


@dataclass
class MegatronConvertResult:
    out: Path
    large: ModelConfig
    ranks_written: int
    bytes_written: int
    dtype: torch.dtype  # of the written weights


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


@torch.inference_mode()
def convert_to_megatron(src: str | Path, out: str | Path, spec: GrowthSpec, layout: Layout, *, fmt: str = "legacy",
                        dtype: torch.dtype | None = None, overwrite: bool = False,
                        progress: bool = True, checksums: bool = True, release: bool = False) -> MegatronConvertResult:
    """Grow ``src`` into a megatron checkpoint at ``out`` with ``layout``. Under an initialised
    torch.distributed group, process k writes the ranks r with r % world == k. ``dtype``: of the weights
    (default: the source's). ``checksums``: write ``hyperclone-manifest.json`` (checkpoint/manifest.py).
    ``release``: Megatron-LM's ``release`` tag instead of iteration 0 (it then loads no optimizer or RNG
    state, without flags)."""
    if fmt not in MEGATRON_FORMATS:
        raise HypercloneError(f"unknown megatron format {fmt!r} (choose from {', '.join(MEGATRON_FORMATS)})")
    import_megatron_core()  # without the compiler and wandb imports: every process of a torchrun job pays them
    src, out = Path(src), Path(out)
    with lock.held_while_writing(out):  # rank 0 locks ``out`` in make_partial_dir; released once published
        return _grow_and_write(src, out, spec, layout, fmt, dtype, overwrite, progress, checksums, release)


def _grow_and_write(src: Path, out: Path, spec: GrowthSpec, layout: Layout, fmt: str, dtype: torch.dtype | None,
                    overwrite: bool, progress: bool, checksums: bool, release: bool) -> MegatronConvertResult:
    grower, source_dtype = agreed(_grower, src, spec, layout)
    dtype = dtype or source_dtype
    tag = legacy.RELEASE if release else 0
    tokenizer = copied_tokenizer(src, out)
    args = legacy.megatron_args(grower.large, layout, dtype, fmt=fmt, tokenizer=tokenizer)
    if fmt == "torch_dist":
        return _convert_torch_dist(src, out, grower, layout, dtype, args, tag, overwrite, progress, checksums)
    dist = _dist()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)
    tmp = _shared_tmp_dir(out, overwrite, src, dist, rank)
    ranks = [(t, p) for p in range(layout.pp) for t in range(layout.tp)]
    mine = [r for k, r in enumerate(ranks) if k % world == rank]
    written = 0
    failure = None
    try:
        for tp_rank, pp_rank in progress_bar(mine, desc=f"converting (process {rank})", unit="rank",
                                         enabled=progress and rank == 0):
            chunks = rank_state_dicts(grower.large, layout, tp_rank, pp_rank, grower.slice, dtype,
                                      grower.slice_into)
            target = legacy.rank_dir(tmp, tag, layout, tp_rank, pp_rank)
            target.mkdir(parents=True, exist_ok=True)
            torch_save(legacy.rank_payload(chunks, args, 0), target / legacy.RANK_FILE)  # OSError if disk full
            written += sum(t.numel() * t.element_size() for sd in chunks for t in sd.values())
    except Exception as exc:  # every process must reach _finish, or the others wait forever
        failure = exc
    _finish(src, out, tmp, dist, rank, failure, checksums, tag)
    return MegatronConvertResult(out, grower.large, len(mine), written, dtype)


def copied_tokenizer(src: Path, out: Path) -> TokenizerRef | None:
    """The Hugging Face tokenizer of ``src``, as it will be once copied beside the weights in ``out``."""
    source = tokenizer_ref(src) if src.is_dir() else None
    return hf_tokenizer_at(out) if source and source.type == HF_TOKENIZER else None


def _grower(src: Path, spec: GrowthSpec, layout: Layout) -> tuple[Grower, torch.dtype]:
    """The growth of ``src`` and its stored dtype, once the grown model is known to fit megatron-core at
    ``layout``."""
    source = open_source(src)
    grower = Grower(source.config, spec, source.get, source.get_rows)
    check_representable(grower.large)
    layout.validate(grower.large)
    return grower, source.dtype


def _convert_torch_dist(src: Path, out: Path, grower: Grower, layout: Layout, dtype: torch.dtype,
                        args: argparse.Namespace, tag: int | str, overwrite: bool, progress: bool,
                        checksums: bool) -> MegatronConvertResult:
    """One process per model-parallel rank (processes beyond tp x pp are data-parallel replicas that
    megatron's replica ids keep from writing twice)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and _dist() is None:
        return _convert_torch_dist_serially(src, out, grower, layout, dtype, args, tag, overwrite, progress,
                                            checksums)
    if world % layout.world:
        raise HypercloneError(
            f"torch_dist at tp x pp = {layout.tp} x {layout.pp} from several processes needs one process per "
            f"model-parallel rank: torchrun --nproc_per_node {layout.world} (this job has {world}), or run "
            "without torchrun to write every rank from one process")
    init_model_parallel(layout)
    dist = _dist()
    rank = dist.get_rank()
    tmp = _shared_tmp_dir(out, overwrite, src, dist, rank)
    failure, written, hashed = None, 0, {}
    try:
        written, hashed = torch_dist.save_grown(grower, layout, legacy.iteration_dir(tmp, tag), dtype, args,
                                                checksums)
    except Exception as exc:  # every process must reach _finish, or the others wait forever
        failure = exc
    _finish(src, out, tmp, dist, rank, failure, checksums, tag, hashed)
    return MegatronConvertResult(out, grower.large, 1, written, dtype)


def _convert_torch_dist_serially(src: Path, out: Path, grower: Grower, layout: Layout, dtype: torch.dtype,
                                 args: argparse.Namespace, tag: int | str, overwrite: bool, progress: bool,
                                 checksums: bool) -> MegatronConvertResult:
    """A single process writes every rank in turn, holding two ranks' shards at a time (one growing, one
    being written)."""
    tmp = make_partial_dir(out, overwrite, src)
    failure, written, hashed = None, 0, {}
    try:
        with progress_bar(total=layout.world, desc="converting", unit="rank", enabled=progress) as bar:
            written, hashed = save_grown_serially(grower, layout, legacy.iteration_dir(tmp, tag), dtype, args, bar,
                                                  checksums)
    except Exception as exc:  # cleaned up below, whatever it was
        failure = exc
    _finish(src, out, tmp, None, 0, failure, checksums, tag, hashed)
    return MegatronConvertResult(out, grower.large, layout.world, written, dtype)


def _shared_tmp_dir(out: Path, overwrite: bool, src: Path, dist, rank: int) -> Path:
    """One temporary directory beside ``out`` that every process agrees on (rank 0 names it)."""
    names = [None]
    if rank == 0:
        try:
            names = [str(make_partial_dir(out, overwrite, src))]
        except (HypercloneError, OSError) as exc:
            names = [f"error:{exc}"]
    if dist:
        dist.broadcast_object_list(names, src=0)
    if names[0].startswith("error:"):
        raise HypercloneError(names[0].removeprefix("error:"))
    return Path(names[0])


def _finish(src: Path, out: Path, tmp: Path, dist, rank: int, failure: BaseException | None, checksums: bool,
            tag: int | str, hashed: dict[str, dict] | None = None) -> None:
    """All processes agree on success; then rank 0 writes the tracker file (the completion marker), the
    checksum manifest is written (files not in ``hashed`` are hashed now, by every process, shared out),
    and rank 0 renames.
    On any failure the temporary directory is removed and nothing appears at ``out``."""
    failed = torch.tensor([1 if failure else 0])
    if dist:
        dist.all_reduce(failed)
    try:
        if failed.item():
            if isinstance(failure, OSError):
                raise HypercloneError(f"cannot write {out}: {failure.strerror or failure}; nothing was kept")
            if failure is not None:
                raise failure
            raise HypercloneError("another conversion process failed; nothing was kept")
        if rank == 0:
            if src.is_dir():  # the tokenizer and its companions travel with the weights (export carries them on)
                copy_companions(src, tmp)
            (tmp / legacy.TRACKER).write_text(legacy.tracker_text(tag))
        if dist:
            if checksums:  # rank 0 lists the files, after its tracker; the others' files closed before all_reduce
                write_manifests_together([tmp], [hashed or {}])
        elif checksums:
            write_manifest(tmp, hashed=hashed)
        if rank == 0:
            publish(tmp, out)
    except BaseException:
        if dist:
            dist.barrier()
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dist:
        dist.barrier()
