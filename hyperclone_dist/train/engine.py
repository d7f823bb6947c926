"""The DeepSpeed engine around this rank's megatron-core GPTModel chunks.

DeepSpeed owns what it is good at: the optimizer (ZeRO-1/2 partitioning over the data-parallel group),
gradient reduction and clipping, bf16 master weights on GPU, and engine checkpoints. megatron-core owns
the model (TP layers) and the pipeline schedule (see step.py for how the two meet).
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
from pathlib import Path

import torch
import torch.distributed as dist

from hyperclone_dist.errors import HypercloneError
from hyperclone_dist.jsonfile import read_json_object
from hyperclone_dist.train.mpu import MegatronMPU
from hyperclone_dist.train.schedules import lr_scheduler
from hyperclone_dist.train.step import ChunkStack

# deepspeed is imported where the engine is built: it takes seconds, and bad input is refused before.

# What pretrain.py decides and writes into the DeepSpeed config: the JSON may leave each of these out or
# say "auto" (the Hugging Face convention), and a different explicit value is an error, not a silent win.
_OWNED = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
          "gradient_clipping")


def read_deepspeed_config(path: str | Path | None) -> dict:
    if path is None:
        return {"zero_optimization": {"stage": 0}}
    return read_json_object(path, "DeepSpeed config")


def zero_stage(config: dict) -> int:
    return int((config.get("zero_optimization") or {}).get("stage", 0))


def complete_deepspeed_config(user: dict, *, micro_batch_size: int, num_micro_batches: int, dp: int,
                              pp: int, clip_grad: float, bf16: bool) -> dict:
    """The user's DeepSpeed config with the values this trainer owns filled in and checked."""
    config = copy.deepcopy(user)
    wanted = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": num_micro_batches,
        "train_batch_size": micro_batch_size * num_micro_batches * dp,
        "gradient_clipping": clip_grad,
    }
    for key in _OWNED:
        given = config.get(key, "auto")
        if given != "auto" and given != wanted[key]:
            raise HypercloneError(f"DeepSpeed config says {key}={given} but the command line gives "
                                  f"{wanted[key]}; drop it from the JSON or set it to \"auto\"")
        config[key] = wanted[key]
    stage = zero_stage(config)
    if stage == 0:
        # DeepSpeed's non-ZeRO fp32 clipping sums norms over the TP x PP group counting replicated
        # parameters on model-parallel rank 0 only, which drops later stages' norms; ZeRO-1 counts them
        # right and, at one data-parallel rank, is the same optimizer.
        stage = 1
        config.setdefault("zero_optimization", {})["stage"] = 1
    if stage > 2:
        raise HypercloneError(f"ZeRO stage {stage} is not supported: megatron-core shards the model with "
                              "TP/PP; use ZeRO-1 or ZeRO-2 for the optimizer over data parallel")
    if stage == 2 and pp > 1:
        raise HypercloneError("ZeRO-2 reduces gradients inside backward hooks, which a pipeline schedule "
                              "does not drive; with pp > 1 use ZeRO stage 1 (as DeepSpeed's pipeline engine)")
    if pp > 1:
        # megatron's schedule accumulates gradients over the micro-batches outside ZeRO's backward, and
        # engine.step() is the accumulation boundary (see step.py)
        zero = config["zero_optimization"]
        zero.setdefault("contiguous_gradients", False)
        zero.setdefault("overlap_comm", False)
        config["managed_gradient_accumulation"] = False
    if bf16:
        config.setdefault("bf16", {})["enabled"] = True
    elif (config.get("bf16") or {}).get("enabled") or (config.get("fp16") or {}).get("enabled"):
        raise HypercloneError("the DeepSpeed config enables bf16/fp16 but this run is float32 "
                              "(pass --bf16 on a GPU, or disable it in the JSON)")
    config.setdefault("steps_per_print", 10**9)  # progress is ours to print
    config.setdefault("wall_clock_breakdown", False)
    return config


def parameter_groups(chunks: list, weight_decay: float, lr: float,
                     lr_multipliers: dict[str, float] | None = None) -> dict[tuple[bool, float], list]:
    """AdamW groups keyed by (decayed, LR multiplier): no weight decay on vectors (norm gains, biases), as
    Megatron-LM; one group per distinct μP multiplier, so multipliers are plain per-group LRs."""
    groups: dict[tuple[bool, float], list] = {}
    seen: set[int] = set()
    for chunk_index, chunk in enumerate(chunks):
        for name, param in chunk.named_parameters():
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            mult = (lr_multipliers or {}).get(f"{chunk_index}:{name}", 1.0)
            groups.setdefault((param.dim() > 1, mult), []).append(param)
    return groups


def _same_groups_everywhere(groups: dict[tuple[bool, float], list], stack) -> list[tuple[tuple[bool, float], list]]:
    """DeepSpeed runs one gradient-norm collective per parameter group, so every rank must have the same
    groups in the same order, even a pipeline stage that holds no parameter of some kind (no embedding, no
    μP-scaled output layer): such a stage gets a one-element placeholder parameter (zero gradient) there."""
    keys = [None] * dist.get_world_size()
    dist.all_gather_object(keys, sorted(groups))
    for key in sorted({k for rank_keys in keys for k in rank_keys}):
        if key not in groups:
            groups[key] = [stack.placeholder()]
    return sorted(groups.items(), key=lambda kv: kv[0])


def initialize_engine(chunks: list, ds_config: dict, groups: dict[tuple[bool, float], list], schedule, *,
                      weight_decay: float, lr: float, vocab_size: int,
                      seq_length: int, logit_scale: float = 1.0, betas=(0.9, 0.95), eps: float = 1e-8):
    """deepspeed.initialize over the chunks with a torch AdamW (no JIT-built kernels on CPU) and a
    LambdaLR; returns the engine."""
    import deepspeed

    stack = ChunkStack(chunks, vocab_size, seq_length, logit_scale)
    param_groups = [{"params": params, "weight_decay": weight_decay if decay else 0.0, "lr": lr * mult,
                     "lr_mult": mult} for (decay, mult), params in _same_groups_everywhere(groups, stack)]
    # foreach: torch's default on CUDA; on the CPU its default is the per-tensor loop, whose update of
    # DeepSpeed's flat fp32 partition makes two partition-sized temporaries instead of one (the same bits)
    optimizer = torch.optim.AdamW(param_groups, betas=betas, eps=eps, foreach=True)
    scheduler = lr_scheduler(optimizer, schedule)
    _comm_backend_without_banner(deepspeed)
    engine, _, _, _ = deepspeed.initialize(model=stack, optimizer=optimizer,
                                           lr_scheduler=scheduler, mpu=MegatronMPU(), config=ds_config,
                                           dist_init_required=False)
    return engine


def _comm_backend_without_banner(deepspeed) -> None:
    """DeepSpeed's comm backend over our process group, made before ``deepspeed.initialize`` would make it:
    on CPU, loading its shared-memory op prints "DeepSpeed ... built successfully" to stdout on every rank
    of every run (deepspeed/comm/torch.py, build_shm_op), ahead of the trainer's own first line. Only that
    print is dropped: a failed build raises, and DeepSpeed's logger keeps the stream it was given."""
    with contextlib.redirect_stdout(io.StringIO()):
        deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)
    _unlink_shared_memory_names()


SHM_DIR = Path("/dev/shm")  # where Linux keeps POSIX shared memory (shm_open) objects


def shm_allreduce_name(rank: int) -> Path:
    """One rank's DeepSpeed CPU all-reduce segment of this job (deepspeed/ops/csrc/cpu/comm/shm.cpp names them
    ``deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>``)."""
    return SHM_DIR / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
                      f"{os.environ.get('MASTER_PORT', '')}_{rank}")


def _unlink_shared_memory_names() -> None:
    """On a CPU node started by the deepspeed launcher (its LOCAL_SIZE says every rank is local), DeepSpeed's
    all-reduce maps one 69 MB shared-memory segment per rank and never unlinks them (shm.cpp has a
    ``shared_close`` that nothing calls): each job, finished or killed, leaves world size x 69 MB of RAM in
    /dev/shm until the node reboots. Every rank maps every segment while DeepSpeed's backend starts, so once
    all ranks are past that (the barrier) each removes its own name: the mappings stay valid until the
    processes exit, and the kernel frees the memory then, however they exit."""
    if os.environ.get("LOCAL_SIZE") != str(dist.get_world_size()):  # DeepSpeed's own test: every rank agrees
        return
    dist.barrier()
    with contextlib.suppress(FileNotFoundError):
        shm_allreduce_name(dist.get_rank()).unlink()
