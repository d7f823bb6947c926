"""Crash safety: conversions killed with SIGKILL, two writers of one output, a training rank killed.

- A conversion killed at any point leaves nothing marked complete at ``--out`` and the source as it was;
  the same command run again completes, bit for bit as a conversion that was never interrupted, and
  removes what the killed run left (its ``.partial-*`` directory; its lock file).
- A second conversion to an output that is being written fails at once: one line naming the output and
  the holder, exit 2; the first one finishes undisturbed. A holder killed with SIGKILL leaves no lock.
- One rank of a 4-rank TP2 x PP2 training job killed with SIGKILL in the middle of a checkpoint save: the
  whole job exits non-zero within seconds, no process of it is left, and ``--load`` resumes from the last
  complete checkpoint with the losses of the run that was killed, bit for bit.

How a dead rank ends the job: torchrun's agent polls its workers, sees one gone and stops the others
(SIGTERM, then SIGKILL after 30 s). A rank that is alive but stuck (a hung GPU, a stopped process) is
not a dead worker: the other ranks wait in their next collective until ``--distributed-timeout-minutes``
(default 10) passes, then gloo/NCCL raise on every one of them and the job exits non-zero.

The kill points of conversions are deterministic: tests/mp_workers/warm_fork.py forks each run from one
warm process and an audit hook kills it just before a chosen file-system event (a rank directory made,
the completion marker opened, the final rename), plus kills after random delays.

    .venv/bin/python -m pytest -n 0 tests/test_crash_safety.py -x -q -s   # -n 0 -s: one process, printing the times
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hyperclone_dist.checkpoint import lock

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "mp_workers" / "warm_fork.py"
TORCHRUN = Path(sys.executable).with_name("torchrun")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
TRACKER = "latest_checkpointed_iteration.txt"
TORCH_DIST_METADATA = ("iter_0000000/.metadata", "hyperclone-manifest.json")  # differ per save: see its test
EXIT_BOUND_S = 120  # a job with a dead rank must be gone within this
JOB_TIMEOUT_S = 600

GROW = ["--tp", "2", "--pp", "2", "--width-factor", "2", "--method", "noisy", "--no-progress"]
LEGACY_POINTS = {  # what the killed run had done: (audit event, a substring of its path)
    "lock taken, no partial directory yet": ("os.mkdir", ".partial-"),
    "1 of 4 rank files written": ("os.mkdir", "mp_rank_01_000"),
    "3 of 4 rank files written": ("os.mkdir", "mp_rank_01_001"),
    "every rank written, completion marker not yet": ("open", TRACKER),
    "complete, not yet renamed into place": ("os.rename", ".partial-"),
}
RANDOM_KILLS, SEED = 3, 0  # SIGKILL a random 0-15 ms after the partial directory appears
TORCH_DIST_POINTS = {"2 of 4 shard files being written": ("open", "__1_0.distcp")}

pytestmark = pytest.mark.slow


def convert_args(src: Path, out: Path, fmt: str) -> list[str]:
    return ["convert", str(src), "--out", str(out), "--format", fmt, *GROW]


def kill_at(point: tuple[str, str], sig: str = "SIGKILL") -> dict:
    return {"event": point[0], "path_has": point[1], "signal": sig}


@pytest.fixture(scope="module")
def forked(tiny_model_dirs, tmp_path_factory) -> dict:
    """One worker run: references, every kill point followed by a rerun, and two writers at once."""
    src = tiny_model_dirs["llama-gqa2"]
    root = tmp_path_factory.mktemp("crash")
    out, refs = root / "outs" / "ckpt", root / "refs"
    (root / "logs").mkdir()
    (root / "outs").mkdir()
    refs.mkdir()
    legacy, torch_dist = convert_args(src, out, "legacy"), convert_args(src, out, "torch_dist")
    rng = random.Random(SEED)
    steps = [{"name": "reference legacy", "run": legacy}, {"fs": ["move", str(out), str(refs / "legacy")]}]
    kills = [(name, kill_at(point)) for name, point in LEGACY_POINTS.items()]
    kills += [(f"random {d:.3f} s", {"after_glob": str(out.parent / ".ckpt.partial-*"), "delay_s": d})
              for d in (rng.uniform(0, 0.015) for _ in range(RANDOM_KILLS))]
    for name, kill in kills:
        steps += [{"name": f"killed: {name}", "run": legacy, "kill": kill}, {"name": f"rerun: {name}", "run": legacy}]
        steps.append({"fs": ["rmtree", str(out)]})
    steps += [  # a second writer while the first is stopped just before its final rename
        {"name": "first writer", "run": legacy, "kill": kill_at(LEGACY_POINTS["complete, not yet renamed into place"],
                                                                   "SIGSTOP"), "background": True},
        {"name": "second writer legacy", "run": legacy},
        {"name": "second writer hf", "run": ["convert", str(src), "--out", str(out), "--no-progress"]},
        {"continue": "first writer"},
        {"fs": ["rmtree", str(out)]},
        {"name": "reference torch_dist", "run": torch_dist}, {"fs": ["move", str(out), str(refs / "torch_dist")]},
    ]
    for k, (name, point) in enumerate(TORCH_DIST_POINTS.items()):
        steps += [{"name": f"killed torch_dist: {name}", "run": torch_dist, "kill": kill_at(point)},
                  {"name": f"rerun torch_dist: {name}", "run": torch_dist},
                  {"fs": ["move", str(out), str(refs / f"torch_dist-rerun{k}")]}]
    # the last kill is left for the test to rerun with the real command
    steps.append({"name": "killed, rerun by the test", "run": legacy, "kill": kill_at(LEGACY_POINTS[
        "3 of 4 rank files written"])})
    plan = {"out": str(out), "src": str(src), "logs": str(root / "logs"), "steps": steps}
    (root / "plan.json").write_text(json.dumps(plan))
    before = digests(src)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(WORKER), str(root / "plan.json"), str(root / "report.json")],
                          check=False, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = {r["name"]: r for r in json.loads((root / "report.json").read_text())}
    print(f"\n{len(runs)} forked runs in {time.monotonic() - start:.1f} s")
    return {"runs": runs, "src": src, "src_digests": before, "out": out, "refs": refs}


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def assert_killed_cleanly(run: dict, forked: dict) -> None:
    """Killed before it finished; nothing complete at --out; the source untouched."""
    assert run["status"] == -signal.SIGKILL, f"{run['name']}: exit {run['status']}\n{run['stderr'][-2000:]}"
    assert not run["out_exists"] and not run["complete"], f"{run['name']}: --out exists after the kill"
    assert run["src"] == forked["src_digests"], f"{run['name']}: the source changed"


def assert_rerun_matches(run: dict, reference: dict, forked: dict) -> None:
    assert run["status"] == 0, f"{run['name']}: exit {run['status']}\n{run['stderr'][-2000:]}"
    assert run["beside_out"] == ["ckpt"], f"{run['name']}: left beside the output: {run['beside_out']}"
    assert run["out"] == reference, f"{run['name']}: files differ from the uninterrupted conversion"
    assert run["src"] == forked["src_digests"]


def test_sigkilled_conversion_leaves_nothing_complete_and_rerun_is_bitwise_equal(forked):
    runs, reference = forked["runs"], forked["runs"]["reference legacy"]["out"]
    assert reference == digests(forked["refs"] / "legacy") and len(reference) >= 5
    table = []
    for name in [*LEGACY_POINTS, *(n.removeprefix("killed: ") for n in runs if n.startswith("killed: random"))]:
        killed, rerun = runs[f"killed: {name}"], runs[f"rerun: {name}"]
        partials = [n for n in killed["beside_out"] if ".partial-" in n]
        table.append(f"{name:46s} exit {killed['status']:>3}, partial directories {len(partials)}, files in them "
                     f"{len(killed['partial_files'])}")
        if name.startswith("random") and killed["status"] == 0:  # finished before the kill landed
            assert killed["out"] == reference, name
            assert rerun["status"] == 2 and "already holds a checkpoint" in rerun["stderr"], rerun["stderr"]
            continue
        assert_killed_cleanly(killed, forked)
        assert_rerun_matches(rerun, reference, forked)
    print("\nkill point                                     outcome\n" + "\n".join(table))


def test_rerun_by_the_same_command_cleans_up_and_completes(forked):
    killed = forked["runs"]["killed, rerun by the test"]
    assert_killed_cleanly(killed, forked)
    assert any(n.startswith(".ckpt.partial-") for n in killed["beside_out"]), killed["beside_out"]
    assert ".ckpt.lock" in killed["beside_out"]  # the file stays; the kernel released the lock itself
    out = forked["out"]
    proc = subprocess.run([sys.executable, "-m", "hyperclone_dist.cli.main",
                           *convert_args(forked["src"], out, "legacy")], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(os.listdir(out.parent)) == ["ckpt"]
    assert digests(out) == digests(forked["refs"] / "legacy")
    assert digests(forked["src"]) == forked["src_digests"]


def test_sigkilled_torch_dist_conversion_reruns_to_the_same_checkpoint(forked):
    """Every file bitwise except DCP's ``.metadata``, which pickles a random save id and the directory it
    was written in (the partial one), and the manifest holding its hash: compared by content instead."""
    from torch.distributed.checkpoint import FileSystemReader

    def metadata(root: Path) -> dict:
        found = FileSystemReader(str(root / "iter_0000000")).read_metadata()
        assert found.storage_meta.checkpoint_id.startswith(str(root.parent.parent / "outs" / ".ckpt.partial-"))
        return {k: v for k, v in vars(found).items() if k != "storage_meta"}

    runs, refs = forked["runs"], forked["refs"]
    reference = runs["reference torch_dist"]["out"]
    for k, name in enumerate(TORCH_DIST_POINTS):
        assert_killed_cleanly(runs[f"killed torch_dist: {name}"], forked)
        rerun = runs[f"rerun torch_dist: {name}"]
        assert rerun["status"] == 0, rerun["stderr"][-2000:]
        assert rerun["beside_out"] == ["ckpt"], rerun["beside_out"]
        assert rerun["out"].keys() == reference.keys()
        differ = sorted(k for k in reference if rerun["out"][k] != reference[k])
        assert set(differ) <= set(TORCH_DIST_METADATA), differ
        assert metadata(refs / f"torch_dist-rerun{k}") == metadata(refs / "torch_dist")


def test_second_writer_fails_fast_naming_output_and_holder(forked):
    runs, out = forked["runs"], forked["out"]
    first = runs["first writer"]
    for name in ("second writer legacy", "second writer hf"):
        second = runs[name]
        lines = second["stderr"].splitlines()
        assert second["status"] == 2 and len(lines) == 1, second["stderr"]
        assert f"output {out} is being written by pid {first['pid']} on {socket.gethostname()}" in lines[0]
        assert second["seconds"] < 30, second["seconds"]
        print(f"\n{name} ({second['seconds']:.2f} s): {lines[0]}")
    assert first["status"] == 0 and first["complete"], first["stderr"]  # the first writer was not disturbed
    assert first["out"] == runs["reference legacy"]["out"]
    assert first["beside_out"] == ["ckpt"]


def _hold_lock(out: Path) -> subprocess.Popen:
    """Another process holding the lock of ``out`` until its stdin closes."""
    code = ("import sys; from hyperclone_dist.checkpoint import lock; lock.acquire(sys.argv[1]); "
            "print('held', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], cwd=REPO, env=ENV, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_lock_of_a_sigkilled_holder_is_free(tmp_path):
    from hyperclone_dist.errors import HypercloneError

    out = tmp_path / "ckpt"
    holder = _hold_lock(out)
    with pytest.raises(HypercloneError, match=f"being written by pid {holder.pid} on"):
        lock.acquire(out)
    holder.kill()
    holder.wait()
    assert lock.lock_path(out).exists()  # the file outlives its holder ...
    lock.acquire(out)  # ... the lock does not
    lock.release(out)
    assert list(tmp_path.iterdir()) == []


# ---- a training rank killed ------------------------------------------------------------------------------
def _ranks(torchrun_pid: int) -> dict[int, int]:
    """rank -> pid of torchrun's workers, read from their environment."""
    ranks = {}
    for pid in subprocess.run(["ps", "-o", "pid=", "--ppid", str(torchrun_pid)], capture_output=True,
                              text=True, check=False).stdout.split():
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ranks.update({int(kv[5:]): int(pid) for kv in env if kv.startswith(b"RANK=")})
    return ranks


def _left_alive(sessions: set[int], wait_s: float = 10.0) -> list[int]:
    """Live processes still in any of ``sessions`` (torchrun's, and each worker's own: torchrun starts every
    rank in a new session, so what a rank spawned is found there), after up to ``wait_s`` of dying. A zombie
    is dead already: it waits only for this machine's init to reap it, which may take a while under load."""
    deadline = time.monotonic() + wait_s
    while True:
        alive = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if os.getsid(int(entry)) in sessions and _state(int(entry)) != "Z":
                        alive.append(int(entry))
                except ProcessLookupError:
                    pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def _state(pid: int) -> str:
    """The process's state letter (/proc/PID/stat): R, S, D, Z..., or "" once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def _describe(pids: list[int]) -> list[str]:
    """pid, parent and command line of each process, for the failure message."""
    out = []
    for pid in pids:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
            ppid = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
        except OSError:
            cmd, ppid = "(gone)", "?"
        out.append(f"{pid} (state {_state(pid)}, parent {ppid}): {cmd}")
    return out


def _metrics(path: Path) -> dict[int, dict]:
    steps: dict[int, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                steps.setdefault(record["step"], {}).update(record)
    return steps


def _train_flags(small: Path, ckpt: Path, metrics: Path) -> list[str]:
    return ["--clone-from", str(small), "--width-factor", "2", "--method", "noisy", "--tp", "2", "--pp", "2",
            "--train-iters", "4", "--global-batch-size", "4", "--micro-batch-size", "2", "--seq-length", "32",
            "--lr", "1e-3", "--lr-warmup-iters", "1", "--save", str(ckpt), "--save-interval", "2",
            "--metrics-file", str(metrics), "--no-progress"]


def _torchrun(flags: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([str(TORCHRUN), "--standalone", "--nproc_per_node", "4",
                                 str(REPO / "launch" / "pretrain.py"), *flags], cwd=REPO, env=ENV, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _wait(proc: subprocess.Popen, timeout: float, log: Path) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"still running after {timeout} s:\n{log.read_text()[-3000:]}")


def test_sigkilled_rank_ends_the_job_and_load_resumes_bit_for_bit(tmp_path):
    from hyperclone_dist.builtin import BUILTIN, random_state_dict
    from hyperclone_dist.checkpoint import small_pt

    small, ckpt = small_pt.save(tmp_path / "small.pt", BUILTIN, random_state_dict(BUILTIN, seed=0)), tmp_path / "ckpt"
    killed_log, resumed_log = tmp_path / "killed.log", tmp_path / "resumed.log"
    start = time.monotonic()
    job = _torchrun(_train_flags(small, ckpt, tmp_path / "killed.jsonl"), killed_log)
    try:  # kill rank 2 once step 4 is logged and its checkpoint is being saved (step 2's is complete)
        while job.poll() is None and time.monotonic() - start < JOB_TIMEOUT_S:
            saving = any(ckpt.glob(".*4.partial")) if ckpt.is_dir() else False
            if saving and 4 in _metrics(tmp_path / "killed.jsonl"):
                break
            time.sleep(0.02)
        ranks = _ranks(job.pid)
        assert job.poll() is None and sorted(ranks) == [0, 1, 2, 3], (ranks, killed_log.read_text()[-3000:])
        assert (ckpt / TRACKER).read_text().strip() == "2", "the step-4 save finished before the kill"
        os.kill(ranks[2], signal.SIGKILL)
        killed_at = time.monotonic()
        status = _wait(job, EXIT_BOUND_S, killed_log)
        exit_s = time.monotonic() - killed_at
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    left = _left_alive({job.pid, *ranks.values()})  # megatron's writer Manager of rank 2 included
    print(f"\nkilled rank 2 (pid {ranks[2]}) {killed_at - start:.1f} s into the job; torchrun exited {status} "
          f"{exit_s:.1f} s later; processes left: {_describe(left)}")
    assert status != 0 and exit_s < EXIT_BOUND_S and not left, _describe(left)
    assert (ckpt / TRACKER).read_text().strip() == "2"  # the interrupted save was never marked complete
    killed = _metrics(tmp_path / "killed.jsonl")

    resumed_job = _torchrun([*_train_flags(small, ckpt, tmp_path / "resumed.jsonl"), "--load", str(ckpt)],
                            resumed_log)
    started = time.monotonic()
    assert _wait(resumed_job, JOB_TIMEOUT_S, resumed_log) == 0, resumed_log.read_text()[-3000:]
    print(f"resumed job: {time.monotonic() - started:.1f} s")
    resumed = _metrics(tmp_path / "resumed.jsonl")
    assert sorted(s for s in resumed if "train/loss" in resumed[s]) == [3, 4], sorted(resumed)
    for key in ("train/loss", "train/grad_norm", "train/lr"):
        got, want = [resumed[s][key] for s in (3, 4)], [killed[s][key] for s in (3, 4)]
        assert got == want, (key, got, want)
    assert (ckpt / TRACKER).read_text().strip() == "4"
    assert not [p.name for p in ckpt.iterdir() if "partial" in p.name]  # the killed save's leftovers are gone
