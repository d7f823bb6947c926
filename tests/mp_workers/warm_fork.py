"""``hyperclone`` and ``pretrain.py`` runs in forked children of one warm process: one rank, or several
ranks of one gloo job (as torchrun starts them), killed at chosen points, run under a file-size limit or
without root's permission override.

    python tests/mp_workers/warm_fork.py plan.json report.json

torch, megatron-core, DeepSpeed, transformers and hyperclone are imported once here; each run is a fork of
this process that calls ``hyperclone_dist.cli.main.main`` or ``launch/pretrain.py``'s ``main``: a fresh
process, without paying the imports again. Nothing here runs torch ops before the forks, so no thread pool
is copied half-used. A run of N ranks is a launcher child in its own process group that forks the N ranks
with torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and, like torchrun,
stops the others as soon as one fails.

The plan is ``{"out", "src", "logs", "steps": [...]}``, each step one of
- ``{"name", "run": [args], "entry": "hyperclone" | "pretrain", "nproc": N, "env": {...}, "kill": SPEC,
  "fsize": BYTES, "read_only": true, "background": true}`` (entry: hyperclone; nproc: 1);
- ``{"continue": NAME}``: SIGCONT a background run stopped by its SPEC and wait for it;
- ``{"fs": [OP, *ARGS]}``, OP one of ``rmtree``, ``move``, ``copytree``, ``truncate`` (to a size),
  ``unlink``: files prepared or damaged between runs.

A kill SPEC (one-rank runs) is deterministic or external:
- ``{"event": E, "path_has": S, "nth": N, "signal": "SIGKILL" | "SIGSTOP"}``: an audit hook
  (``sys.addaudithook``) in the child acts just before the N-th audit event E (``os.mkdir``, ``open`` for
  writing, ``os.rename``) whose path contains S: SIGKILL to the child's whole process group (processes it
  forked inherit the hook, so a point inside them kills the run too), or SIGSTOP to the child alone, to be
  continued by a later step.
- ``{"after_glob": G, "delay_s": T}``: this process polls for a path matching G, waits T seconds and sends
  SIGKILL to the group, wherever the run has got to (it may have finished).

``fsize`` sets RLIMIT_FSIZE in the child (Python ignores SIGXFSZ, so a write past it fails with EFBIG, as
on a full disk). ``read_only`` drops CAP_DAC_OVERRIDE from the child, so that a ``chmod 555`` directory
refuses root as it refuses anyone else.

For every run the report holds the exit status (negative: killed by that signal; for N ranks the first
failure's, as torchrun reports), seconds, stdout, stderr (the ranks' in rank order), each rank's own, the
names beside ``out``, whether ``out`` and its completion marker exist, and the sha256 of every file of
``out`` and of ``src``.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import glob
import hashlib
import importlib.util
import json
import os
import resource
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TRACKER = "latest_checkpointed_iteration.txt"
CAP_DAC_OVERRIDE = 1
STEP_TIMEOUT_S = 600
ENTRIES = {}  # entry name -> main(argv) -> int, filled in main() before any fork


def digests(root: Path) -> dict[str, str]:
    if not root.is_dir():
        return {}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _opens_for_writing(args: tuple) -> bool:
    """The "open" audit event: (path, mode, flags); mode is None for os.open, which passes flags."""
    mode, flags = args[1], args[2] if len(args) > 2 else 0
    if isinstance(mode, str):
        return mode[:1] in "wax"
    return isinstance(flags, int) and bool(flags & (os.O_WRONLY | os.O_RDWR))


def _audit_hook(spec: dict, pid: int):
    seen, fired = [0], [False]
    sig = getattr(signal, spec.get("signal", "SIGKILL"))

    def hook(event: str, args: tuple) -> None:
        if fired[0] or event != spec["event"] or not args:
            return
        if event == "open" and not _opens_for_writing(args):
            return  # reads do not count
        if spec["path_has"] not in str(args[0]):
            return
        seen[0] += 1
        if seen[0] == spec.get("nth", 1):
            fired[0] = True  # os.kill raises an audit event of its own
            if sig == signal.SIGSTOP:
                os.kill(pid, sig)
            else:
                os.killpg(os.getpgid(0), sig)

    return hook


def _drop_dac_override() -> None:
    """Clear CAP_DAC_OVERRIDE from this process's effective and permitted sets (capset(2), version 3)."""
    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    libc = ctypes.CDLL(None, use_errno=True)
    header, data = Header(0x20080522, 0), (Data * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    data[0].effective &= ~(1 << CAP_DAC_OVERRIDE)
    data[0].permitted &= ~(1 << CAP_DAC_OVERRIDE)
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def _redirect(log: Path) -> None:
    for fd, name in ((1, "stdout"), (2, "stderr")):
        os.dup2(os.open(f"{log}.{name}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)


def _run_entry(step: dict) -> None:
    """In a fork: run the step's entry point and exit with its status (never returns)."""
    status = 1
    try:
        os.environ.update(step.get("env") or {})
        if step.get("read_only") and os.geteuid() == 0:
            _drop_dac_override()
        if step.get("fsize"):
            resource.setrlimit(resource.RLIMIT_FSIZE, (step["fsize"], resource.RLIM_INFINITY))
        kill = step.get("kill")
        if kill and "event" in kill:
            sys.addaudithook(_audit_hook(kill, os.getpid()))
        status = ENTRIES[step.get("entry", "hyperclone")](step["run"])
    except SystemExit as exit_:  # argparse
        status = exit_.code if isinstance(exit_.code, int) else 2
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_ranks(step: dict, log: Path) -> None:
    """In the launcher fork: the ranks of one job, each a fork with torchrun's environment; exits with the
    first failure's status (a signal as 128 + its number) once every rank is done (never returns)."""
    nproc, port = step["nproc"], _free_port()
    ranks = {}
    for rank in range(nproc):
        pid = os.fork()
        if pid == 0:
            _redirect(Path(f"{log}.rank{rank}"))
            os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                              LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            _run_entry(step)
        ranks[pid] = rank
    failure = 0
    while ranks:
        pid, status = os.wait()
        ranks.pop(pid, None)
        code = os.waitstatus_to_exitcode(status)
        if code and not failure:
            failure = code if code > 0 else 128 - code
            for other in ranks:  # as torchrun: one rank failed, the job is over
                os.kill(other, signal.SIGKILL)
    os._exit(failure)


def _read(path: str) -> str:
    return Path(path).read_text(errors="replace") if Path(path).is_file() else ""


def _record(step: dict, pid: int, status: int, start: float, plan: dict, log: Path) -> dict:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)  # processes a killed run forked, if any outlived it
    out, src = Path(plan.get("out", "/nonexistent/out")), Path(plan.get("src", "/nonexistent/src"))
    nproc = step.get("nproc", 1)
    ranks = [{"rank": r, "stdout": _read(f"{log}.rank{r}.stdout"), "stderr": _read(f"{log}.rank{r}.stderr")}
             for r in range(nproc)] if nproc > 1 else []
    stdout = "".join(r["stdout"] for r in ranks) if ranks else _read(f"{log}.stdout")
    stderr = "".join(r["stderr"] for r in ranks) if ranks else _read(f"{log}.stderr")
    return {"name": step.get("name"), "pid": pid, "argv": step["run"], "kill": step.get("kill"),
            "status": os.waitstatus_to_exitcode(status), "seconds": time.monotonic() - start,
            "stdout": stdout, "stderr": stderr, "ranks": ranks,
            "beside_out": sorted(os.listdir(out.parent)) if out.parent.is_dir() else [],
            "partial_files": sorted(str(f.relative_to(out.parent)) for f in out.parent.glob(".*.partial-*/**/*")
                                    if f.is_file()),
            "out_exists": out.exists(), "complete": (out / TRACKER).is_file(), "out": digests(out),
            "src": digests(src)}


def _wait(pid: int, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:
            os.killpg(pid, signal.SIGKILL)
            return os.waitpid(pid, 0)[1]
        time.sleep(0.01)


def _start(step: dict, log: Path) -> int:
    pid = os.fork()
    if pid == 0:
        os.setpgid(0, 0)
        _redirect(log)
        if step.get("nproc", 1) > 1:
            _launch_ranks(step, log)
        _run_entry(step)
    return pid


FS_OPS = {"rmtree": shutil.rmtree, "move": os.replace, "copytree": shutil.copytree, "truncate": os.truncate,
          "unlink": os.unlink}


def _load_entries() -> None:
    """What the runs would import (much of it lazily) in each child, imported once, before the forks."""
    import deepspeed  # noqa: F401
    import megatron.core.dist_checkpointing
    import megatron.core.parallel_state  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from hyperclone_dist.cli.main import main as hyperclone

    spec = importlib.util.spec_from_file_location("pretrain_launch", REPO / "launch" / "pretrain.py")
    pretrain = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pretrain)  # definitions only: the job itself sits behind __main__
    ENTRIES.update(hyperclone=hyperclone, pretrain=pretrain.main)


def main() -> None:
    plan = json.loads(Path(sys.argv[1]).read_text())
    gc.disable()  # as a command's process does (hyperclone_dist/process_gc.py): the imports uncollected, then
    _load_entries()
    gc.freeze()  # frozen, so that no run's collections (nor this process's exit) scan them again, and a
    gc.enable()  # collection in a fork does not write to (and so copy) every page they are on
    report, stopped = [], {}
    for k, step in enumerate(plan["steps"]):
        if "fs" in step:
            op, *args = step["fs"]
            FS_OPS[op](*args)
            continue
        if "continue" in step:
            if step["continue"] not in stopped:
                continue
            pid, start, run_step, log = stopped.pop(step["continue"])
            os.kill(pid, signal.SIGCONT)
            _, status = os.waitpid(pid, 0)
            report.append(_record(run_step, pid, status, start, plan, log))
            continue
        log = Path(plan["logs"]) / f"step{k}"
        start = time.monotonic()
        pid = _start(step, log)
        kill = step.get("kill") or {}
        if step.get("background"):  # stopped by its kill SPEC; a later step continues it
            _, status = os.waitpid(pid, os.WUNTRACED)
            if os.WIFSTOPPED(status):
                stopped[step["name"]] = (pid, start, step, log)
            else:  # it never reached the point
                report.append(_record(step, pid, status, start, plan, log))
            continue
        status = None
        if "after_glob" in kill:
            while status is None and not glob.glob(kill["after_glob"]):
                done, polled = os.waitpid(pid, os.WNOHANG)
                status = polled if done else None
                time.sleep(0.002)
            if status is None:
                time.sleep(kill["delay_s"])
                os.killpg(pid, signal.SIGKILL)
        if status is None:
            status = _wait(pid, step.get("timeout_s", STEP_TIMEOUT_S))
        report.append(_record(step, pid, status, start, plan, log))
    Path(sys.argv[2]).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":  # megatron's torch_dist writer starts a spawn-context Manager that imports this file
    main()
