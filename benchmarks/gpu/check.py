"""The GPU check's driver (benchmarks/gpu/check.sh calls it): installs what the interpreter lacks from the
carried wheels, runs each stage of stages.py within one time budget, writes the GPU section of
docs/benchmarks.md and prints it; ``--dry-run`` checks all of it on a CPU instead (dry_run.py).

    bash benchmarks/gpu/check.sh [--budget-s 480] [--steps 50] [--copy-to DIR]
    bash benchmarks/gpu/check.sh --dry-run

A stage that fails or runs out of its time is reported with its log's last lines and the next stage still
runs, so one broken part of the CUDA path does not hide the figures of the others; a stage whose inputs
failed is skipped. Exit status: 0 when every stage ran and every requirement is met, 1 otherwise, 2 for bad
input or a machine without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import stages as stage_defs
from gpu_common import REPO, OneLineParser, read_json, write_json

REPORT_RESERVE_S = 15  # kept back from the budget for the report and the copies
MARKER = ".gpu-check"  # a working folder holding this is ours to empty
MEASURED = ("a", "b", "c", "d", "e")


class Console:
    """Prints and keeps a copy in the working folder's check.log."""

    def __init__(self, log: Path | None = None):
        self.log = log

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        if self.log:
            with open(self.log, "a") as out:
                out.write(line + "\n")


def positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise ValueError(text)
    return value


def stage_keys(text: str) -> tuple[str, ...]:
    keys = tuple(k.strip() for k in text.split(",") if k.strip())
    if not keys or any(k not in MEASURED for k in keys):
        raise ValueError(text)
    return keys


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="check.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="on a CPU: check wheels, commands and helpers; run nothing")
    p.add_argument("--budget-s", type=positive, default=480, help="seconds for everything, the install included")
    p.add_argument("--steps", type=int, default=50, help="steps of stages (b) and (c)")
    p.add_argument("--only", type=stage_keys, default=MEASURED, help="a rerun of some stages, e.g. b,c "
                   "(env and inputs always run)")
    p.add_argument("--workdir", type=Path, default=Path("runs/gpu-check"))
    p.add_argument("--wheels", type=Path, default=Path(".cache/gpu-wheels"), help="carried wheel folder")
    p.add_argument("--corpus-cache", type=Path, default=Path(".cache/gpu-corpus"),
                   help="carried tokenized corpus ($HYPERCLONE_CACHE of every stage)")
    p.add_argument("--site", default="/tmp/hyperclone-gpu-site", help="where missing packages are installed")
    p.add_argument("--doc", type=Path, default=Path("docs/benchmarks.md"))
    p.add_argument("--copy-to", type=Path, help="also copy the doc, the log and the results here")
    p.add_argument("--python-version", default="3.12", help="dry run: the GPU machine's interpreter")
    p.add_argument("--started", type=float, help=argparse.SUPPRESS)  # check.sh's start: the install counts too
    return p


def prepare_workdir(work: Path) -> None:
    if work.exists() and any(work.iterdir()) and not (work / MARKER).is_file():
        build_parser().error(f"{work} exists and is not a GPU check's folder; pass another --workdir")
    shutil.rmtree(work, ignore_errors=True)
    (work / "logs").mkdir(parents=True)
    (work / MARKER).write_text("emptied by each run of benchmarks/gpu/check.sh\n")


def last_error(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower() and "warn" not in line.lower()]
    return (errors or lines or ["(no output)"])[-1][:300]


def run_stage(stage, env: dict, log: Path, timeout: float, say: Console) -> dict:
    started = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(stage.argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own group: a timeout ends torchrun's children too
        try:
            rc = proc.wait(timeout=timeout)
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc, status = None, "timed out"
    record = {"title": stage.title, "status": status, "rc": rc, "started": started,
              "seconds": round(time.time() - started, 1), "log": str(log)}
    if status != "ok":
        record["error"] = last_error(log) if status == "failed" else f"stopped at its {timeout:.0f} s limit"
        tail = [line for line in log.read_text(errors="replace").splitlines() if "warn" not in line.lower()][-12:]
        say("\n".join(f"      | {line[:200]}" for line in tail))
    return record


def copy_out(dest: Path | None, work: Path, doc: Path | None) -> None:
    """At most a handful of files, none in subfolders: what a remote GPU machine's results folder takes back."""
    if dest is None:
        return
    dest.mkdir(parents=True, exist_ok=True)
    for path in (work / "check.log", doc):
        if path and path.is_file():
            shutil.copyfile(path, dest / path.name)
    results = {p.stem: json.loads(p.read_text()) for p in sorted((work / "results").glob("*.json"))}
    (dest / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    with tarfile.open(dest / "logs.tar.gz", "w:gz") as tar:
        for path in sorted(work.rglob("*")):
            if path.is_file() and (path.suffix in (".log", ".jsonl") or path.name == "results.md"):
                tar.add(path, arcname=str(path.relative_to(work)))


def gpu_run(args, say: Console, py: str) -> int:
    started = args.started or time.time()
    deadline = started + args.budget_s
    work = args.workdir
    install = subprocess.run([py, "benchmarks/gpu/wheels.py", "install", "--wheels", str(args.wheels), "--target",
                              args.site], cwd=REPO, capture_output=True, text=True)
    say((install.stdout + install.stderr).strip())
    if install.returncode:
        return 2
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [args.site, os.environ.get("PYTHONPATH")])),
           "HYPERCLONE_CACHE": str((REPO / args.corpus_cache).resolve()), "PYTHONUNBUFFERED": "1",
           "PYTHONWARNINGS": "ignore", "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"}
    records: dict[str, dict] = {}
    todo = stage_defs.setup(py, work, args.corpus_cache, args.site)
    while todo:
        stage = todo.pop(0)
        left = deadline - time.time() - REPORT_RESERVE_S
        if any(records.get(n, {}).get("status") != "ok" for n in stage.needs):
            records[stage.key] = {"title": stage.title, "status": "skipped", "seconds": 0,
                                  "error": f"needs stage {', '.join(stage.needs)}"}
        elif left < stage.min_s:
            records[stage.key] = {"title": stage.title, "status": "skipped", "seconds": 0,
                                  "error": f"{left:.0f} s of the budget left, it needs {stage.min_s}"}
        else:
            say(f"[{time.time() - started:4.0f} s] {stage.key}: {stage.title} (limit {min(stage.cap_s, left):.0f} s)")
            records[stage.key] = run_stage(stage, env, work / "logs" / f"{stage.key}.log", min(stage.cap_s, left), say)
        say(f"[{time.time() - started:4.0f} s] {stage.key}: {records[stage.key]['status']}"
            f"{': ' + records[stage.key]['error'] if 'error' in records[stage.key] else ''}")
        write_json(work / "results" / "stages.json", records)
        copy_out(args.copy_to, work, None)
        if stage.key == "env":
            gpu = (read_json(work / "results" / "env.json") or {}).get("gpu")
            if records["env"]["status"] == "ok" and gpu is None:
                print("check.sh: error: torch sees no GPU here (on a CPU: bash benchmarks/gpu/check.sh --dry-run)",
                      file=sys.stderr)
                return 2
        if stage.key == "inputs":
            inputs = read_json(work / "results" / "inputs.json") or {}
            corpus = (inputs.get("prefix", "?"), inputs.get("tokenizer", "?"))
            todo += [s for s in stage_defs.measured(py, work, corpus, args.steps) if s.key in args.only]
    import report

    result = report.Report(work, time.time() - started, args.budget_s)
    block, ok, table = result.render()
    say(block)
    doc = report.write(REPO / args.doc, result.section(block, table))
    say(f"wrote the GPU section of {doc}")
    copy_out(args.copy_to, work, doc)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.steps < 10:
        build_parser().error(f"--steps {args.steps}: at least 10 (the first fifth are left out of the medians)")
    py = sys.executable
    if args.dry_run:
        import dry_run

        return dry_run.run(args, Console(), py)
    work = (REPO / args.workdir) if not args.workdir.is_absolute() else args.workdir
    prepare_workdir(work)
    args.workdir = work
    return gpu_run(args, Console(work / "check.log"), py)


if __name__ == "__main__":
    sys.exit(main())
