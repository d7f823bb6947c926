"""``check.sh --dry-run``: on any CPU, check what the GPU run needs and would run, without training anything.

- the carried wheels: all there, one version each, installable on the GPU machine's interpreter, their
  requirements closed (without the folder, e.g. in CI's fresh clone: the list checked against this .venv);
- what travels to the GPU machine fits its 64 MiB (the working tree and the carried folders);
- every stage's exact command: pretrain.py's through pretrain.py's own ``--dry-run`` (shapes, layout, memory
  on one GPU), each helper's through its own argument parser, the recipe's through its parser and the
  dry run of both of its model shapes;
- the report renders with no results.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import stages as stage_defs
from gpu_common import REPO

DRY_FLAGS = ["--dry-run", "--world-size", "1", "--gpu-memory-gib", str(stage_defs.GPU_MEMORY_GIB)]


def load_file(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def captured(fn, *args) -> tuple[int, str]:
    """(exit status, stdout + stderr) of fn(*args): what it returns when that is an int (a main), else 0;
    argparse's exits included."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        try:
            result = fn(*args)
            status = result if isinstance(result, int) else 0
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else 2
    return status, buffer.getvalue()


def folder_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20 if path.is_dir() else 0.0


def tree_mib() -> float | None:
    """Tracked and untracked-but-not-ignored files: what travels besides the carried folders."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                             capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    files = [REPO / name for name in out.decode().split("\0") if name]
    return sum(f.stat().st_size for f in files if f.is_file()) / 2**20


class DryRun:
    def __init__(self, args, say, py: str):
        self.args, self.say, self.py = args, say, py
        self.problems: list[str] = []
        self.checks = 0

    def ok(self, what: str) -> None:
        self.checks += 1
        self.say(f"  ok: {what}")

    def problem(self, what: str) -> None:
        self.checks += 1
        self.problems.append(what)
        self.say(f"  PROBLEM: {what}")

    def check(self, passed: bool, what: str) -> None:
        if passed:
            self.ok(what)
        else:
            self.problem(what)

    def wheels(self) -> None:
        import wheels

        folder = self.args.wheels  # relative to the repository root, where check.sh runs
        self.say(f"wheels (target CPython {self.args.python_version}, manylinux x86_64):")
        if folder.is_dir():
            try:
                for line in wheels.check(folder, self.args.python_version):
                    self.say("  " + line)
                self.ok("every carried wheel is there and installs on the target")
            except wheels.WheelError as exc:
                self.problem(str(exc))
        else:
            self.say(f"  no wheel folder {self.args.wheels} (bash benchmarks/gpu/prepare_wheels.sh makes it): "
                     "checked the list against this interpreter only")
            try:
                self.ok(f"this interpreter has all {len(wheels.listing('all'))} carried packages to download")
            except wheels.WheelError as exc:
                self.problem(str(exc))
        try:
            installing = wheels.plan(wheels.scan(folder) if folder.is_dir() else {}, wheels.installed_version,
                                     wheels.roots(), wheels.target_markers(platform.python_version()))
            self.ok(f"on this interpreter the install step would add {', '.join(installing) or 'nothing'}")
        except wheels.WheelError as exc:
            self.problem(f"this interpreter: {exc}")

    def carry(self) -> None:
        import wheels

        tree = tree_mib()
        carried = folder_mib(self.args.wheels) + folder_mib(self.args.corpus_cache)
        if tree is None:
            self.say(f"carry: not a git checkout, tree not measured; carried folders {carried:.1f} MiB")
            return
        total = tree + carried
        line = (f"working tree {tree:.1f} MiB + carried {self.args.wheels} and {self.args.corpus_cache} "
                f"{carried:.1f} MiB = {total:.1f} MiB of {wheels.CARRY_LIMIT_MIB}")
        self.check(total <= wheels.CARRY_LIMIT_MIB, line)

    def corpus(self) -> tuple[str, str]:
        import prepare_inputs

        prefix, tokenizer = prepare_inputs.corpus_paths(self.args.corpus_cache,
                                                        prepare_inputs.vocab_of(stage_defs.SMALL_CONFIG))
        there = Path(f"{prefix}.idx").is_file() and Path(tokenizer).is_file()
        self.say(f"corpus: {prefix} " + ("is prepared (carried)" if there else
                                         "is missing: the inputs stage tokenizes it on the GPU machine"))
        return str(prefix), str(tokenizer)

    def helper(self, stage) -> None:
        module = importlib.import_module(Path(stage.argv[1]).stem)
        status, out = captured(module.build_parser().parse_args, list(stage.argv[2:]))
        what = f"{stage.key}: {Path(stage.argv[1]).name} accepts its arguments"
        self.check(status == 0, what if status == 0 else f"{what}: {out.strip()}")

    def pretrain(self, label: str, flags: list[str]) -> None:
        main = load_file("pretrain", REPO / "launch" / "pretrain.py").main
        status, out = captured(main, [*flags, *DRY_FLAGS])
        fits = [line for line in out.splitlines() if line.startswith("largest rank")]
        shape = [line for line in out.splitlines() if line.startswith("dry run:")]
        if status == 0 and fits:
            self.ok(f"{label}: pretrain.py --dry-run: {shape[0][len('dry run: '):].split(':')[0]}; {fits[0]}")
        else:
            self.problem(f"{label}: pretrain.py --dry-run exit {status}: {out.strip().splitlines()[-1:]}")

    def recipe(self, stage) -> None:
        module = load_file("gpu_recipe", REPO / stage_defs.RECIPE / "run.py")
        status, out = captured(module.parse_args, list(stage.argv[2:]))
        what = f"{stage.key}: {stage_defs.RECIPE}/run.py accepts its arguments"
        self.check(status == 0, what if status == 0 else f"{what}: {out.strip()}")
        steps = str(stage_defs.RECIPE_STEPS["--steps"])
        config = ["--config", f"{stage_defs.RECIPE}/train.json", "--train-iters", steps]
        small = ["--init", "random", "--model-config", stage_defs.SMALL_CONFIG]
        self.pretrain(f"{stage.key} small arm", [*config, *small])
        self.pretrain(f"{stage.key} large arms", config)

    def budget(self, all_stages) -> None:
        """Every stage can start within the budget when the ones before it take no more than their minimum."""
        from check import REPORT_RESERVE_S

        needed = sum(s.min_s for s in all_stages) + REPORT_RESERVE_S
        self.check(needed <= self.args.budget_s, f"budget: the stages' minimums and the report need {needed} s of "
                   f"the {self.args.budget_s:.0f} s budget")

    def report(self, work: Path) -> None:
        import report

        empty = report.Report(work, None, self.args.budget_s)
        block, _, _ = empty.render()
        unmeasured = all(ok is None for _, _, ok, _ in empty.accept)
        self.check(unmeasured, f"the report renders with no results ({len(block.splitlines())} lines, "
                   f"{len(empty.accept)} requirements 'not measured')")

    def run(self) -> int:
        self.say(f"GPU check, dry run on {platform.machine()} Python {platform.python_version()}: nothing is trained")
        self.wheels()
        self.carry()
        prefix_tok = self.corpus()
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            all_stages = (stage_defs.setup(self.py, work, self.args.corpus_cache, self.args.site)
                          + stage_defs.measured(self.py, work, prefix_tok, self.args.steps))
            self.say("stages (each checked as the GPU run would start it):")
            for stage in all_stages:
                self.say(f" {stage.key}: {stage.title} (limit {stage.cap_s} s)")
                if stage.kind == "helper":
                    self.helper(stage)
                elif stage.kind == "pretrain":
                    self.pretrain(stage.key, list(stage.argv[2:]))
                else:
                    self.recipe(stage)
                if stage.key == "c":  # the bare loop builds its model from (b)'s flags, checked with (b)
                    b_flags = next(s.argv[2:] for s in all_stages if s.key == "b")
                    same = list(stage.argv[stage.argv.index("--") + 1:]) == list(b_flags)
                    self.check(same, "c: trains the model and data of (b)'s pretrain.py flags")
            self.budget(all_stages)
            self.report(work)
        verdict = "OK" if not self.problems else f"{len(self.problems)} PROBLEM(S)"
        self.say(f"dry run: {verdict} ({self.checks} checks)")
        return 0 if not self.problems else 1


def run(args, say, py: str) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    return DryRun(args, say, py).run()
