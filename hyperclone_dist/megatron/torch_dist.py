"""megatron-core ``torch_dist`` checkpoints (Megatron-LM's default format), reshardable on load.

Each model-parallel rank builds its GPTModel chunks without random init, fills every parameter with its
grown slice (one local tensor at a time), and saves through ``megatron.core.dist_checkpointing``: the
ShardedTensor keys, global shapes and offsets are megatron's own, so Megatron-LM loads the result at any
TP x PP. Layout of the output (as Megatron-LM writes it)::

    DIR/latest_checkpointed_iteration.txt
    DIR/iter_0000000/{metadata.json, common.pt, .metadata, __*_*.distcp}
    state: {"model" | "model0", "model1", ...: sharded model, "args": Namespace, "checkpoint_version", "iteration"}
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import torch

from hyperclone_dist.config import ModelConfig
from hyperclone_dist.errors import HypercloneError
from hyperclone_dist.growth.grow import Grower
from hyperclone_dist.layout import Layout
from hyperclone_dist.megatron import internals, legacy
from hyperclone_dist.megatron.distcp_writer import DirectWrite, manifest_entries
from hyperclone_dist.megatron.lm_config import model_config_from_megatron_args
from hyperclone_dist.megatron.model import build_gpt_model, load_chunk_weights
from hyperclone_dist.megatron.weights import fill_chunks

# megatron.core is imported inside the functions that use it: it takes seconds, and a conversion's bad
# inputs are refused before any of them runs.


def safe_common_load():
    """megatron's common.pt holds Megatron-LM's ``args`` Namespace; allow that class and nothing else
    while megatron loads it with torch.load's default weights_only=True."""
    return torch.serialization.safe_globals([argparse.Namespace])


@contextlib.contextmanager
def damage_reported(iteration_dir: Path):
    """A damaged or incomplete torch_dist directory (a truncated ``.distcp`` or ``common.pt``, no
    ``.metadata``) is reported in one line naming it; torch and megatron raise RuntimeError, AssertionError,
    CheckpointingException or pickle errors for these, with tracebacks through their internals."""
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException wrapping the cause

    try:
        yield
    except HypercloneError:
        raise
    except (Exception, CheckpointException) as exc:
        if isinstance(exc, CheckpointException) and exc.failures:
            exc = next(iter(exc.failures.values()))[0]
        text = str(exc).strip()
        first = (text.splitlines()[0].split(". ")[0] if text else type(exc).__name__)[:200]
        raise HypercloneError(f"cannot read the torch_dist checkpoint {iteration_dir}: corrupt or incomplete "
                              f"({first})") from None


def model_state_keys(chunks: list) -> list[str]:
    return ["model"] if len(chunks) == 1 else [f"model{k}" for k in range(len(chunks))]


def model_state(chunks: list, args: argparse.Namespace) -> dict:
    """What Megatron-LM saves: the sharded model chunks plus args, iteration and checkpoint version. Views
    megatron would clone before writing are aliased instead (``internals.without_view_copies``)."""
    state = {key: internals.without_view_copies(chunk.sharded_state_dict())
             for key, chunk in zip(model_state_keys(chunks), chunks)}
    state.update(args=args, iteration=args.iteration, checkpoint_version=legacy.CHECKPOINT_VERSION)
    return state


def save_grown(grower: Grower, layout: Layout, iteration_dir: Path, dtype: torch.dtype, args: argparse.Namespace,
               checksums: bool = True) -> tuple[int, dict[str, dict]]:
    """Collective over the job: every process holds one model-parallel rank (initialised by
    ``init_model_parallel``). Returns the bytes of this rank's shard and the manifest entries of the files
    it wrote, hashed while writing ({} without ``checksums``)."""
    from megatron.core import dist_checkpointing, parallel_state
    from torch.distributed.checkpoint import FileSystemReader

    chunks = build_gpt_model(grower.large, layout, dtype=dtype, perform_initialization=False)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    fill_chunks(chunks, grower.large, layout, tp_rank, pp_rank, grower.slice, grower.slice_into)
    iteration_dir.mkdir(parents=True, exist_ok=True)
    writer = DirectWrite(checksums)
    with internals.in_process_results_queue():  # no multiprocessing Manager: nothing is written elsewhere
        dist_checkpointing.save(model_state(chunks, args), str(iteration_dir),
                                sharded_strategy=writer.strategy)
    if writer.failure is not None:  # every rank finished the collective save; the caller agrees on failure
        raise writer.failure
    written = sum(p.numel() * p.element_size() for chunk in chunks for p in chunk.parameters())
    if not checksums:
        return written, {}
    results, digests = writer.written
    metadata = FileSystemReader(str(iteration_dir)).read_metadata()  # the coordinator's, complete after the save
    return written, manifest_entries(iteration_dir, metadata, [results], digests)


def read_args(iteration_dir: Path) -> argparse.Namespace:
    """The checkpoint's Megatron-LM args, with our model description in ``hyperclone_config``: the one we
    wrote, or, in a checkpoint Megatron-LM wrote, the one its model arguments describe (lm_config.py)."""
    from megatron.core import dist_checkpointing

    if not (iteration_dir / "metadata.json").is_file():
        raise HypercloneError(f"{iteration_dir} is not a torch_dist checkpoint (no metadata.json)")
    if not (iteration_dir / ".metadata").is_file():  # written last by the coordinator: a save cut short
        raise HypercloneError(f"{iteration_dir} is an incomplete torch_dist checkpoint (no .metadata)")
    with safe_common_load(), damage_reported(iteration_dir):
        common = dist_checkpointing.load_common_state_dict(str(iteration_dir))
    args = common.get("args") if isinstance(common, dict) else None
    if not isinstance(getattr(args, "hyperclone_config", None), dict):
        args.hyperclone_config = model_config_from_megatron_args(args, iteration_dir.parent).to_dict()
    return args


def load_into_gpt_model(iteration_dir: Path, layout: Layout) -> tuple[list, ModelConfig]:
    """GPTModel chunks at ``layout`` (any TP x PP) holding the checkpoint's weights."""
    from megatron.core import dist_checkpointing

    args = read_args(iteration_dir)
    cfg = ModelConfig.from_dict(args.hyperclone_config)
    padded = int(args.padded_vocab_size)
    if padded % layout.tp:
        raise HypercloneError(f"the checkpoint's padded vocab ({padded}) is not divisible by tp={layout.tp}")
    chunks = build_gpt_model(cfg, layout, perform_initialization=False, padded_vocab=padded)
    state = {key: chunk.sharded_state_dict() for key, chunk in zip(model_state_keys(chunks), chunks)}
    with safe_common_load(), damage_reported(iteration_dir):
        loaded = dist_checkpointing.load(state, str(iteration_dir))
    for key, chunk in zip(model_state_keys(chunks), chunks):
        load_chunk_weights(chunk, loaded[key], iteration_dir)
    return chunks, cfg
