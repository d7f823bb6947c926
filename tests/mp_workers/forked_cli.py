"""``hyperclone`` commands in forked children of one warm process: killed at chosen points, run under a
file-size limit or without root's permission override. The process half of tests/test_crash_safety.py
and tests/test_bad_input_catalogue.py.

    python tests/mp_workers/forked_cli.py plan.json report.json

torch, megatron-core and hyperclone are imported once here; each run is a child forked from this process
(its own process group) that calls ``hyperclone_dist.cli.main.main``: a fresh process, without paying the
imports again. Nothing here has run torch ops before the forks, so no thread pool is copied half-used.

The plan is ``{"out", "src", "logs", "steps": [...]}``, each step one of
- ``{"name", "run": [args], "kill": SPEC, "fsize": BYTES, "read_only": true, "background": true}``
- ``{"continue": NAME}``: SIGCONT a background run stopped by its SPEC and wait for it;
- ``{"fs": [OP, *ARGS]}``, OP one of ``rmtree``, ``move``, ``copytree``, ``truncate`` (to a size),
  ``unlink``: files prepared or damaged between runs.

A kill SPEC is deterministic or external:
- ``{"event": E, "path_has": S, "nth": N, "signal": "SIGKILL" | "SIGSTOP"}``: an audit hook
  (``sys.addaudithook``) in the child acts just before the N-th audit event E (``os.mkdir``, ``open`` for
  writing, ``os.rename``) whose path contains S: SIGKILL to the child's whole process group (megatron's
  shard writers are forked children that inherit the hook, so a point inside them kills the conversion
  too), or SIGSTOP to the child alone, to be continued by a later step.
- ``{"after_glob": G, "delay_s": T}``: this process polls for a path matching G, waits T seconds and sends
  SIGKILL to the group, wherever the conversion has got to (it may have finished).

``fsize`` sets RLIMIT_FSIZE in the child (Python ignores SIGXFSZ, so a write past it fails with EFBIG, as
on a full disk). ``read_only`` drops CAP_DAC_OVERRIDE from the child, so that a ``chmod 555`` directory
refuses root as it refuses anyone else.

For every run the report holds the exit status (negative: killed by that signal), seconds, stdout,
stderr, the names beside ``out``, whether ``out`` and its completion marker exist, and the sha256 of every
file of ``out`` and of ``src``.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import json
import os
import resource
import shutil
import signal
import sys
import time
from pathlib import Path

TRACKER = "latest_checkpointed_iteration.txt"
CAP_DAC_OVERRIDE = 1


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


def _child(step: dict, log: Path) -> None:
    os.setpgid(0, 0)
    for fd, name in ((1, "stdout"), (2, "stderr")):
        os.dup2(os.open(f"{log}.{name}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    status = 1
    try:
        if step.get("read_only") and os.geteuid() == 0:
            _drop_dac_override()
        if step.get("fsize"):
            resource.setrlimit(resource.RLIMIT_FSIZE, (step["fsize"], resource.RLIM_INFINITY))
        from hyperclone_dist.cli.main import main

        kill = step.get("kill")
        if kill and "event" in kill:
            sys.addaudithook(_audit_hook(kill, os.getpid()))
        status = main(step["run"])
    except SystemExit as exit_:  # argparse
        status = exit_.code if isinstance(exit_.code, int) else 2
    except BaseException:  # noqa: BLE001 - the report shows it: a traceback is what the tests look for
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def _record(step: dict, pid: int, status: int, start: float, plan: dict, log: Path) -> dict:
    try:
        os.killpg(pid, signal.SIGKILL)  # forked shard writers of a killed run, if any outlived it
    except ProcessLookupError:
        pass
    out, src = Path(plan.get("out", "/nonexistent/out")), Path(plan.get("src", "/nonexistent/src"))
    return {"name": step.get("name"), "pid": pid, "argv": step["run"], "kill": step.get("kill"),
            "status": os.waitstatus_to_exitcode(status), "seconds": time.monotonic() - start,
            "stdout": Path(f"{log}.stdout").read_text(errors="replace"),
            "stderr": Path(f"{log}.stderr").read_text(errors="replace"),
            "beside_out": sorted(os.listdir(out.parent)) if out.parent.is_dir() else [],
            "partial_files": sorted(str(f.relative_to(out.parent)) for f in out.parent.glob(".*.partial-*/**/*")
                                    if f.is_file()),
            "out_exists": out.exists(), "complete": (out / TRACKER).is_file(), "out": digests(out),
            "src": digests(src)}


FS_OPS = {"rmtree": shutil.rmtree, "move": os.replace, "copytree": shutil.copytree, "truncate": os.truncate,
          "unlink": os.unlink}


def main() -> None:
    plan = json.loads(Path(sys.argv[1]).read_text())
    # imported once, before the forks: what the commands would import (much of it lazily) in each child
    import megatron.core.dist_checkpointing
    import megatron.core.parallel_state  # noqa: F401
    import torch  # noqa: F401

    import hyperclone_dist.cli.main
    import hyperclone_dist.megatron.convert
    import hyperclone_dist.megatron.export
    import hyperclone_dist.megatron.torch_dist_serial
    import hyperclone_dist.megatron.verify  # noqa: F401

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
        pid = os.fork()
        if pid == 0:
            _child(step, log)
        kill = step.get("kill") or {}
        if step.get("background"):  # stopped by its kill SPEC; a later step continues it
            _, status = os.waitpid(pid, os.WUNTRACED)
            if os.WIFSTOPPED(status):
                stopped[step["name"]] = (pid, start, step, log)
            else:  # it never reached the point
                report.append(_record(step, pid, status, start, plan, log))
            continue
        if "after_glob" in kill:
            while not glob.glob(kill["after_glob"]) and os.waitpid(pid, os.WNOHANG) == (0, 0):
                time.sleep(0.002)
            time.sleep(kill["delay_s"])
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:  # finished first
                pass
        _, status = os.waitpid(pid, 0)
        report.append(_record(step, pid, status, start, plan, log))
    Path(sys.argv[2]).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":  # megatron's torch_dist writer starts a spawn-context Manager that imports this file
    main()
