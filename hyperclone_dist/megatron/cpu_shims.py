"""Every workaround megatron-core 0.16.1 needs to run on a CPU-only torch build (gloo), in one place.

``apply_cpu_shims()`` installs them once and does nothing when CUDA is available, so GPU runs execute
megatron-core untouched. What is covered: model construction, forward and backward (also with
activation recomputation), all three pipeline schedules, and ``dist_checkpointing`` save/load.
Not covered: megatron's DDP wrapper and optimizers (``clip_grads.py``, ``optimizer.py``,
``param_and_grad_buffer.py`` also hard-code CUDA devices and check ``torch.cuda.FloatTensor`` types).

Three kinds of shim:
- the RNG tracker keeps CPU generator states instead of CUDA ones;
- ``torch.cuda.current_device()`` / ``torch.cuda.synchronize()``, which raise on a CPU-only build, return
  the CPU device / do nothing (megatron uses them as a device argument and as a barrier);
- the few megatron functions that hard-code ``device="cuda"`` or call ``.cuda()`` run inside
  ``cuda_to_cpu()``, a TorchFunctionMode that rewrites those device arguments. It is entered only while
  those functions run, since it costs a Python call per torch op. One of them is the pipeline schedule,
  so a forward/backward through get_forward_backward_func() pays it: a few percent at hidden size 512,
  about 40% on the tiny test models.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_applied = False
_SHIM_MARK = "__hyperclone_cpu_shim__"


def _is_cuda(device: Any) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments of torch calls to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]  # already on the only device there is
        if _is_cuda(kwargs.get("device")):
            kwargs = {**kwargs, "device": "cpu"}
        if kwargs.get("pin_memory"):
            kwargs = {**kwargs, "pin_memory": False}  # pinning needs an accelerator
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_to_cpu():
    """Run a block that hard-codes CUDA devices on the CPU; a no-op when CUDA is available."""
    if torch.cuda.is_available():
        yield
        return
    with _CudaToCpuMode():
        yield


def _run_on_cpu(fn: Callable) -> Callable:
    if getattr(fn, _SHIM_MARK, False):
        return fn

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _CudaToCpuMode():
            return fn(*args, **kwargs)

    setattr(wrapper, _SHIM_MARK, True)
    return wrapper


def _make_cpu_rng_tracker_class(base: type) -> type:
    from megatron.core.tensor_parallel.random import _MODEL_PARALLEL_RNG_TRACKER_NAME

    class CpuRNGStatesTracker(base):
        """megatron's named RNG states (data-parallel, tensor-parallel, expert), held as CPU generator
        states: ``fork(name)`` swaps the global CPU generator to that state and back."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name=_MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer_state, outer_name = torch.get_rng_state(), self._current_state_name
            if outer_name != "default-rng":
                self.states_[outer_name] = outer_state
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                if self._current_state_name != name:
                    raise Exception(f"rng state {self._current_state_name} is current, expected {name}")
                self.states_[name] = torch.get_rng_state()
                if outer_name != "default-rng":
                    outer_state = self.states_[outer_name]
                torch.set_rng_state(outer_state)
                self._current_state_name = outer_name

    return CpuRNGStatesTracker


def _cpu_current_device() -> torch.device:
    return torch.device("cpu")


def _no_synchronize(device=None) -> None:
    return None


def _install_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mcore_random

    cpu_tracker = _make_cpu_rng_tracker_class(mcore_random.CudaRNGStatesTracker)
    # tensor_parallel/random.py: initialize_rng_tracker() builds this class, whose add() uses the CUDA RNG.
    mcore_random.CudaRNGStatesTracker = cpu_tracker
    if not isinstance(mcore_random._CUDA_RNG_STATE_TRACKER, cpu_tracker):
        mcore_random._CUDA_RNG_STATE_TRACKER = None  # a CUDA tracker made before the shims: rebuild
        mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = False
    # tensor_parallel/random.py CheckpointFunction (activation recompute) saves/restores the CUDA RNG state.
    mcore_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda new_state, *args, **kwargs: torch.set_rng_state(new_state)


def _wrap_cuda_device_call_sites() -> None:
    from megatron.core.fusions import fused_softmax
    from megatron.core.models.common.language_module.language_module import LanguageModule
    from megatron.core.pipeline_parallel import schedules

    # pipeline_parallel/schedules.py, all three schedules: total_num_tokens = torch.zeros(..., device="cuda").
    for name in ("forward_backward_no_pipelining", "forward_backward_pipelining_without_interleaving",
                 "forward_backward_pipelining_with_interleaving"):
        setattr(schedules, name, _run_on_cpu(getattr(schedules, name)))
    # models/common/language_module/language_module.py: weight.data.cuda() to sync tied embeddings (PP > 1).
    LanguageModule.setup_embeddings_and_output_layer = _run_on_cpu(
        LanguageModule.setup_embeddings_and_output_layer)
    # transformer/utils.py get_sliding_window_causal_mask, called from fused_softmax.py: device="cuda".
    fused_softmax.get_sliding_window_causal_mask = _run_on_cpu(fused_softmax.get_sliding_window_causal_mask)


def apply_cpu_shims() -> bool:
    """Install the CPU workarounds (idempotent). Returns True when they are in place, False on a CUDA
    machine, where nothing is changed."""
    global _applied
    if torch.cuda.is_available():
        return False
    if _applied:
        return True
    # utils.py GlobalMemoryBuffer, tensor_parallel/*.py, p2p_communication.py: current_device() as a device.
    torch.cuda.current_device = _cpu_current_device
    # pipeline_parallel/p2p_communication.py, dist_checkpointing/strategies/*.py: torch.cuda.synchronize().
    torch.cuda.synchronize = _no_synchronize
    _install_rng_tracker()
    _wrap_cuda_device_call_sites()
    _applied = True
    return True


def cpu_shims_applied() -> bool:
    return _applied
