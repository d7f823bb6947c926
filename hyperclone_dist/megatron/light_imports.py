"""megatron-core imported for a conversion without what a conversion never runs.

``import megatron.core`` costs a process ~4 CPU-s, half of it for two things a conversion does not use:
its fused kernels are decorated with ``torch.compile`` at import time (``megatron.core.jit.jit_fuser``),
which imports TorchDynamo and Inductor, and its inference and timer modules import wandb. Under torchrun
every process pays the imports again, so on few cores they are most of a small conversion's time.

``import_megatron_core()`` imports the megatron-core modules a conversion uses with ``torch.compile``
deferred (a decorated function is compiled at its first call, as ``torch.compile`` itself compiles at
the first call: nothing changes for code that calls them) and ``import wandb`` failing, as when wandb is
not installed (megatron-core then logs nothing to it); both are restored before it returns. Called where
a conversion first needs megatron-core; in a process that has already imported it, it does nothing.
"""

from __future__ import annotations

import contextlib
import functools
import sys

import torch

# what a conversion imports from megatron-core, one process playing every rank or one rank per process
CONVERSION_MODULES = ("megatron.core", "megatron.core.parallel_state", "megatron.core.tensor_parallel",
                      "megatron.core.dist_checkpointing", "megatron.core.models.gpt",
                      "megatron.core.models.gpt.gpt_layer_specs",
                      "megatron.core.dist_checkpointing.strategies.torch",
                      "megatron.core.dist_checkpointing.strategies.filesystem_async")
NOT_IMPORTED = ("wandb",)  # optional for megatron-core: it checks with try/except ImportError


def deferred_compile(real_compile):
    """``torch.compile`` for functions, compiling at the first call instead of importing its backends now."""

    def compile_later(model=None, **options):
        if model is None:  # used as @torch.compile(...options)
            return lambda fn: compile_later(fn, **options)
        if isinstance(model, torch.nn.Module):
            return real_compile(model, **options)
        compiled = None

        @functools.wraps(model)
        def run(*args, **kwargs):
            nonlocal compiled
            if compiled is None:
                compiled = real_compile(model, **options)
            return compiled(*args, **kwargs)

        return run

    return compile_later


@contextlib.contextmanager
def _lighter():
    real_compile = torch.compile
    hidden = [name for name in NOT_IMPORTED if name not in sys.modules]
    torch.compile = deferred_compile(real_compile)
    for name in hidden:
        sys.modules[name] = None  # ``import wandb`` raises ImportError
    try:
        yield
    finally:
        torch.compile = real_compile
        for name in hidden:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]


def import_megatron_core() -> None:
    if "megatron.core" in sys.modules:
        return
    import importlib

    with _lighter():
        for name in CONVERSION_MODULES:
            importlib.import_module(name)
