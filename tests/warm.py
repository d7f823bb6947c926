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
