"""Training checkpoints: DeepSpeed engine state plus the model in megatron-core ``torch_dist``.

    SAVE/global_step{N}/            DeepSpeed: mp_rank_XX_model_states.pt, *_optim_states.pt, trainer_state.json
    SAVE/iter_{N:07d}/              megatron torch_dist model (reshards on load; hyperclone export/verify read it)
    SAVE/latest                     DeepSpeed's tag file
    SAVE/latest_checkpointed_iteration.txt   megatron's tracker: written last, the completion marker

Both directories are written under hidden ``.partial`` names and renamed once every rank has finished,
each with a checksum manifest (``hyperclone-manifest.json``, checkpoint/manifest.py) hashed by all ranks;
the two tag files are replaced atomically afterwards, so a crash at any point leaves the previous
checkpoint as the latest complete one. DeepSpeed files are read back without unpickling code: the engine's
checkpoint loader is swapped for one that uses ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from hyperclone_dist.checkpoint.atomic import publish, write_bytes_atomic
from hyperclone_dist.checkpoint.hf_writer import copy_companions
from hyperclone_dist.checkpoint.manifest import write_manifests_together
from hyperclone_dist.checkpoint.torch_load import torch_load
from hyperclone_dist.checkpoint.training_state import DS_TAG_FILE, STATE_FILE
from hyperclone_dist.errors import HypercloneError
from hyperclone_dist.megatron import internals, legacy
from hyperclone_dist.megatron.load import read_iteration
from hyperclone_dist.megatron.model import load_chunk_weights
from hyperclone_dist.megatron.torch_dist import model_state_keys, safe_common_load
from hyperclone_dist.megatron.writer_queue import own_results_queue
from hyperclone_dist.train.moments import optimizer_step_count, sharded_moments

# DeepSpeed and megatron.core are imported inside the functions that use them: a bad command line is
# refused before a job pays for them.


def _tag(step: int) -> str:
    return f"global_step{step}"


def use_safe_loader(engine) -> None:
    """Make the engine read its checkpoints with ``weights_only=True``: a checkpoint that holds code is
    refused with the file's name instead of running it."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path, map_location=None):
            with torch.serialization.safe_globals(_deepspeed_safe_globals()):
                return torch_load(Path(path), mmap=False)

    # built from the engine's config, as DeepSpeed builds its own: saves keep its serialization (zip by default),
    # which DeepSpeed's zero_to_fp32.py needs (it memory-maps the optimizer files)
    engine.checkpoint_engine = SafeTorchCheckpointEngine(config_params=internals.deepspeed_config(engine))


def _deepspeed_safe_globals() -> list:
    """Plain-data classes DeepSpeed puts in its checkpoint files besides tensors and containers (an enum,
    a named tuple, the loss scaler's attributes); weights_only rebuilds them without running code."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def save_checkpoint(engine, chunks: list, save_dir: str | Path, step: int, trainer_state: dict,
                    megatron_args, rng: dict | None = None, moments: bool = True, checksums: bool = True,
                    tokenizer: Path | None = None) -> Path:
    """Collective: every rank calls it. Returns the published DeepSpeed tag directory. ``checksums``: both
    directories get a manifest (checkpoint/manifest.py) that ``hyperclone inspect --check`` verifies.
    ``tokenizer``: a Hugging Face tokenizer's directory, whose files (and chat template, generation config)
    are copied beside the checkpoints, for export and for a later run's --clone-from to find."""
    from megatron.core import dist_checkpointing

    root = Path(save_dir)
    rank = dist.get_rank()
    tag, it_name = _tag(step), legacy.iteration_dir(Path(), step).name
    ds_tmp, it_tmp = root / f".{tag}.partial", root / f".{it_name}.partial"
    error = [None]
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            for stale in (ds_tmp, it_tmp):
                shutil.rmtree(stale, ignore_errors=True)
            it_tmp.mkdir()
        except OSError as exc:
            error = [f"cannot write checkpoint under {root}: {exc.strerror or exc}"]
    if rank == 0 and tokenizer is not None and error[0] is None:
        try:
            copy_companions(tokenizer, root)
        except OSError as exc:
            error = [f"cannot write the tokenizer beside the checkpoints in {root}: {exc.strerror or exc}"]
    dist.broadcast_object_list(error, src=0)
    if error[0]:
        raise HypercloneError(error[0])
    engine.save_checkpoint(str(root), tag=ds_tmp.name, client_state={"hyperclone": trainer_state, "rng": rng or {}},
                           save_latest=False)
    state = {key: chunk.sharded_state_dict() for key, chunk in zip(model_state_keys(chunks), chunks)}
    state.update(args=megatron_args, iteration=step, checkpoint_version=legacy.CHECKPOINT_VERSION)
    if moments:  # Adam's moments beside the model: a later, larger run can grow them (train/moments.py)
        state["optimizer_moments"] = sharded_moments(engine, chunks)
        megatron_args.hyperclone_optimizer_step = optimizer_step_count(engine)
    own_results_queue()  # megatron's writer Manager, killed with this rank (a SIGKILL would orphan it)
    dist_checkpointing.save(state, str(it_tmp))
    dist.barrier()
    if rank == 0:
        (ds_tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=1, sort_keys=True))
    if checksums:
        write_manifests_together([ds_tmp, it_tmp])
    if rank == 0:
        publish(ds_tmp, root / tag)
        publish(it_tmp, root / it_name)
        write_bytes_atomic(root / DS_TAG_FILE, tag.encode())
        write_bytes_atomic(root / legacy.TRACKER, f"{step}\n".encode())  # the completion marker, last
    dist.barrier()
    return root / tag


def check_resumable(state: dict, layout: dict, config: dict, load_dir: str | Path) -> None:
    """DeepSpeed's optimizer partitions are tied to the layout they were written at."""
    saved = state.get("layout", {})
    if saved != layout:
        raise HypercloneError(f"--load {load_dir} was saved at layout {saved}, this job is {layout}; the "
                              "optimizer state resumes only at the same layout (the model alone reshards: "
                              "export it or pass its iter_* checkpoint to a fresh run)")
    if state.get("model_config") != config:
        raise HypercloneError(f"--load {load_dir}: the checkpoint's model differs from this run's "
                              f"(hidden {state.get('model_config', {}).get('hidden_size')} vs "
                              f"{config.get('hidden_size')}, layers {state.get('model_config', {}).get('num_layers')} "
                              f"vs {config.get('num_layers')})")


def resume(engine, load_dir: str | Path, tag: str) -> tuple[dict, dict]:
    """Restore the engine (model, optimizer, LR schedule); returns (trainer state, RNG states)."""
    path, client = engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if path is None or not isinstance(client, dict) or "hyperclone" not in client:
        raise HypercloneError(f"--load {load_dir}: DeepSpeed found no complete checkpoint under tag {tag}")
    return client["hyperclone"], client.get("rng") or {}


def load_model_only(chunks: list, load_dir: str | Path) -> int:
    """Weights of a torch_dist checkpoint into this layout's chunks (dist_checkpointing reshards);
    returns its iteration."""
    from megatron.core import dist_checkpointing

    root = Path(load_dir)
    iteration = read_iteration(root)
    it_dir = legacy.latest_dir(root)
    state = {key: chunk.sharded_state_dict() for key, chunk in zip(model_state_keys(chunks), chunks)}
    with safe_common_load():
        loaded = dist_checkpointing.load(state, str(it_dir))
    for key, chunk in zip(model_state_keys(chunks), chunks):
        load_chunk_weights(chunk, loaded[key], it_dir)
    return iteration
