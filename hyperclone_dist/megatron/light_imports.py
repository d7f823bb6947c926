"""megatron-core imported without what our processes never run at import time.

``import megatron.core`` costs a process ~3.6 CPU-s after torch, ~2 of them for two things nothing here
needs at import time: its fused kernels are decorated with ``torch.compile`` when their modules load
(``megatron.core.jit.jit_fuser``), which imports TorchDynamo and Inductor, and its inference and timer
modules import wandb. Every rank of a job pays the imports again: on few cores they are a large part of a
small conversion's time, and of every training and verification job's start-up.

``lighten_megatron_core_import()`` (called by the packages that import megatron-core, before they do)
makes the process's first ``import megatron.core`` run with ``torch.compile`` deferred (a decorated
function is compiled at its first call, as ``torch.compile`` itself compiles at the first call: nothing
changes for code that calls them) and ``import wandb`` failing, as when wandb is not installed
(megatron-core then logs nothing to it; our own logging imports wandb itself, afterwards); both are
restored once that import is done. It wraps the loader of that one import (an import-system hook, since
the first import happens wherever a job first needs megatron-core), and does nothing in a process that
has already imported megatron-core. ``import_megatron_core()`` imports what a conversion uses, up front.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.abc
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


class _LighterLoader(importlib.abc.Loader):
    """The loader of ``megatron.core`` itself, running its module (and so every submodule its
    ``__init__`` imports) inside ``_lighter()``; anything else asked of it goes to the real loader."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        with _lighter():
            self._loader.exec_module(module)

    def __getattr__(self, name):  # get_filename, get_resource_reader, ...: the real loader's
        return getattr(self._loader, name)


class _FirstMegatronCoreImport(importlib.abc.MetaPathFinder):
    """Finds ``megatron.core`` the ordinary way, once, and hands its loader a lighter import."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "megatron.core":
            return None
        sys.meta_path.remove(self)  # one import to lighten; the other finders find it
        for finder in sys.meta_path:
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _LighterLoader(spec.loader)
                return spec
        return None


def lighten_megatron_core_import() -> None:
    """Make this process's first ``import megatron.core`` a lighter one (idempotent; nothing once imported)."""
    if "megatron.core" in sys.modules or any(isinstance(f, _FirstMegatronCoreImport) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _FirstMegatronCoreImport())


def import_megatron_core() -> None:
    """Import the megatron-core modules a conversion uses now, all of them lightened as above."""
    if "megatron.core" in sys.modules:
        return
    with _lighter():
        for name in CONVERSION_MODULES:
            importlib.import_module(name)
