"""Our processes import megatron-core without TorchDynamo/Inductor and wandb, and what it defers still works;
our commands import without cyclic garbage collection and freeze what they imported."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from hyperclone_dist.megatron.light_imports import deferred_compile


def test_deferred_compile_compiles_at_the_first_call_only():
    compiled = []

    def real_compile(fn, **options):
        compiled.append(options)
        return lambda *args: fn(*args) + 1

    @deferred_compile(real_compile)
    def double(x):
        return 2 * x

    later = deferred_compile(real_compile)(mode="max-autotune")(lambda x: x)
    assert compiled == [] and double.__name__ == "double"
    assert double(3) == 7 and double(4) == 9 and compiled == [{}]
    assert later(1) == 2 and compiled == [{}, {"mode": "max-autotune"}]


def printed_by(code: str) -> list[str]:
    """The lines a fresh interpreter prints running ``code`` (it must succeed)."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"}, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.split("\n")


def test_conversion_imports_leave_out_the_compiler_and_wandb():
    code = ("import sys, torch\n"
            "from hyperclone_dist.megatron.light_imports import import_megatron_core\n"
            "real = torch.compile\n"
            "import_megatron_core()\n"
            "from megatron.core.models.gpt import GPTModel\n"
            "from megatron.core.jit import jit_fuser\n"
            "print(torch.compile is real, jit_fuser is not real, 'megatron.core' in sys.modules,\n"
            "      [m for m in ('torch._dynamo', 'torch._inductor', 'wandb') if m in sys.modules])\n"
            "import importlib.util\n"
            "print(importlib.util.find_spec('wandb') is None or __import__('wandb') is not None)\n")
    assert printed_by(code)[:2] == ["True True True []", "True"]


@pytest.mark.parametrize("entry", [
    "import hyperclone_dist.train\n",  # pretrain.py's trainer
    # hyperclone convert/verify under torchrun: init_distributed's CPU shims import megatron-core first
    "import hyperclone_dist.cli.main\nfrom hyperclone_dist.megatron.cpu_shims import apply_cpu_shims\n"
    "apply_cpu_shims()\n",
])
def test_a_jobs_first_megatron_import_leaves_out_the_compiler_and_wandb(entry):
    """Whatever module of a job imports megatron-core first, after one of this project's entry points: the
    compiler is not imported, torch.compile is restored, wandb imports afterwards."""
    code = ("import sys, torch\n"
            "real = torch.compile\n"
            f"{entry}"
            "from megatron.core import parallel_state\n"
            "from megatron.core.models.gpt import GPTModel\n"
            "from megatron.core.pipeline_parallel import get_forward_backward_func\n"
            "from megatron.core.datasets.gpt_dataset import GPTDataset\n"
            "from megatron.core.jit import jit_fuser\n"
            "print(torch.compile is real, jit_fuser is not real,\n"
            "      [m for m in ('torch._dynamo', 'torch._inductor', 'wandb') if m in sys.modules])\n"
            "import wandb\n"
            "print(wandb.__name__)\n")
    assert printed_by(code)[:2] == ["True True []", "wandb"]


# Run as the program (run_name "__main__"), with process_gc.run_command wrapped to report, when the command
# starts, how many collections ran once torch began importing and what is frozen; the report replaces the
# command itself.
SPY = """
import gc, runpy, sys
import hyperclone_dist.process_gc as process_gc
collections = []
gc.callbacks.append(lambda phase, info: phase == "start" and "torch" in sys.modules and collections.append(1))
real, built = process_gc.run_command, []
def spy(main):
    imports = len(collections)
    def report():
        built.append([])  # an object of the command's own: frozen only by its end
        print(imports, gc.get_freeze_count() > 100_000, gc.isenabled())
        return 0
    return real(report)
process_gc.run_command = spy
sys.argv = [{entry!r}]
try:
    {run}
except SystemExit as exit_:
    assert exit_.code == 0, exit_.code
print(id(built[0]) not in {{id(o) for o in gc.get_objects()}})  # get_objects leaves out the frozen
"""


@pytest.mark.parametrize("run", [
    'runpy.run_module("hyperclone_dist.cli.main", run_name="__main__")',  # python -m hyperclone_dist.cli.main
    'runpy.run_path("launch/pretrain.py", run_name="__main__")',
])
def test_a_command_imports_without_cyclic_collection_then_freezes_them(run):
    """hyperclone_dist/process_gc.py: no collection while torch, megatron-core, DeepSpeed and transformers
    import; what they built frozen when the command starts (collection back on); frozen again at its end."""
    entry = "launch/pretrain.py" if "pretrain" in run else "hyperclone"
    assert printed_by(SPY.format(entry=entry, run=run))[:2] == ["0 True True", "True"]
