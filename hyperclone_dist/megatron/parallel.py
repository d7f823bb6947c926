"""Process-group and model-parallel setup for megatron-core, the same on a GPU cluster and a CPU box.

Launch with torchrun, which sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT:

    torchrun --standalone --nproc_per_node 4 script.py     # script calls init_model_parallel(Layout(tp=2, pp=2))

Without those variables (a plain ``python script.py``) the job is a single rank.
"""

from __future__ import annotations

import os
import random
from datetime import timedelta

import torch
import torch.distributed as dist

from hyperclone_dist.errors import HypercloneError
from hyperclone_dist.layout import Layout
from hyperclone_dist.megatron.cpu_shims import apply_cpu_shims

DEFAULT_SEED = 1234


class AgreedError(HypercloneError):
    """A bad input every rank of the job knows about: each raises it, one rank reports it."""


def agreed(fn, *args, **kwargs):
    """Run ``fn`` on every rank; if it failed anywhere, raise the first rank's error everywhere (a single
    process without a process group just runs it). Around the checks that precede a job's collectives: a bad
    input found by any rank ends every rank the same way, instead of leaving the others waiting for it."""
    if not dist.is_initialized():
        return fn(*args, **kwargs)
    try:
        result, error = fn(*args, **kwargs), None
    except HypercloneError as exc:
        result, error = None, str(exc)
    except OSError as exc:
        result, error = None, _one_line(exc)
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    first = next((e for e in errors if e), None)
    if first:
        raise AgreedError(first)
    return result


def _one_line(exc: OSError) -> str:
    return f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": ")


def init_distributed(timeout_minutes: int = 30) -> None:
    """Initialise the default process group from torchrun's environment: nccl (and gloo for CPU tensors)
    with one GPU per local rank when CUDA is available, gloo otherwise. A no-op when a process group already exists."""
    apply_cpu_shims()
    if dist.is_initialized():
        return
    timeout = timedelta(minutes=timeout_minutes)
    # With CUDA, NCCL carries megatron-core's and DeepSpeed's collectives on GPU tensors; our own small ones
    # on CPU tensors (agreement on bad input, loss means, symmetry statistics, checksums) go through gloo.
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if "WORLD_SIZE" not in os.environ:  # not under a launcher: one rank, no rendezvous port needed
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        return
    dist.init_process_group(backend, rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
                            timeout=timeout)


def init_model_parallel(layout: Layout = Layout(), seed: int = DEFAULT_SEED) -> None:
    """Create megatron's tensor/pipeline/data-parallel groups (data parallel = world / (tp*pp)) and seed
    its RNGs. Calling it again with another layout tears the previous groups down first.

    Seeding follows Megatron-LM: stage p uses seed + 100·p, so pipeline stages do not draw identical
    initial weights, and megatron's model-parallel RNG tracker derives per-TP-rank states from it."""
    from megatron.core import parallel_state, tensor_parallel  # heavy: imported when a job starts

    init_distributed()
    layout.check_world(dist.get_world_size())
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
    )
    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(stage_seed)
    torch.manual_seed(stage_seed)  # CPU initialisation (use_cpu_initialization) draws from this generator
    tensor_parallel.model_parallel_cuda_manual_seed(stage_seed)


def destroy_parallel() -> None:
    """Tear down megatron's groups and the default process group (end of a job)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
