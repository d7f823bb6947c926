"""Runs of ``hyperclone`` and ``pretrain.py`` forked from one warm process (tests/mp_workers/warm_fork.py):
every run a fresh process, one rank or a gloo job of several, without paying torch, megatron-core,
DeepSpeed and transformers imports again for each."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "mp_workers" / "warm_fork.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}


def run_warm(steps: list[dict], root: Path, *, out: Path | None = None, src: Path | None = None,
             timeout_s: float = 1200) -> dict[str, dict]:
    """Run the plan's ``steps`` (see warm_fork.py) in order; the report of each named run."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "logs").mkdir(exist_ok=True)
    plan = {"logs": str(root / "logs"), "steps": steps,
            **({"out": str(out)} if out else {}), **({"src": str(src)} if src else {})}
    (root / "plan.json").write_text(json.dumps(plan))
    proc = subprocess.run([sys.executable, str(WORKER), str(root / "plan.json"), str(root / "report.json")],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout_s, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {run["name"]: run for run in json.loads((root / "report.json").read_text())}


def failure_text(run: dict, chars: int = 3000) -> str:
    return f"{run['name']}: exit {run['status']}\n{run['stdout'][-chars:]}\n{run['stderr'][-chars:]}"


def pretrain_in_process(*argv: str) -> subprocess.CompletedProcess:
    """``launch/pretrain.py`` in this process, its output captured: for runs that stop before any process
    group (the dry run, bad command lines), which leave nothing behind to tear down."""
    import contextlib
    import importlib.util
    import io

    spec = importlib.util.spec_from_file_location("pretrain_launch", REPO / "launch" / "pretrain.py")
    launch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch)
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            status = launch.main([str(a) for a in argv])
        except SystemExit as exit_:  # argparse and the argument checks
            status = exit_.code
    return subprocess.CompletedProcess(["pretrain.py", *argv], status, stdout.getvalue(), stderr.getvalue())


def hyperclone_in_process(*args) -> subprocess.CompletedProcess:
    """``hyperclone`` run through ``main()`` in this process, reported like a finished subprocess: for
    commands that start no process group and leave nothing running."""
    import contextlib
    import io

    from hyperclone_dist.cli.main import main

    argv = [str(a) for a in args]
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            status = main(argv)
        except SystemExit as exit_:  # argparse
            status = exit_.code
    return subprocess.CompletedProcess(["hyperclone", *argv], status, stdout.getvalue(), stderr.getvalue())
