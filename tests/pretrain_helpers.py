"""Real pretraining jobs for the acceptance tests (tests/test_pretrain_layouts.py): ``launch/pretrain.py``
forked from one warm process (tests/warm.py: each job's ranks a gloo group, as torchrun makes them) or
started by torchrun or the deepspeed launcher themselves; read back their ``metrics.jsonl``, and compute
reference losses independently of the trainer (the trainer's own datasets rebuilt with
``build_datasets``, the model run through Hugging Face)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from warm import WORKER, failure_text

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PRETRAIN = str(REPO / "launch" / "pretrain.py")
ZERO1, ZERO2 = str(REPO / "configs/deepspeed/zero1.json"), str(REPO / "configs/deepspeed/zero2.json")
JOB_TIMEOUT_S = 900  # one job on a loaded 2-core machine takes 30-120 s
MAX_PROCS = 8  # processes of concurrent jobs at once: two 4-rank jobs overlap their import-bound start-ups

# What every job shares: the trainer's defaults for split (949,50,1) and seed (0) decide the samples.
ITERS, GBS, MBS, SEQ = 20, 8, 2, 64
SPLIT, SEED, EVAL_ITERS = "949,50,1", 0, 1


def schedule_flags(train_iters: int = ITERS) -> list[str]:
    """Batch, optimizer and evaluation flags: one validation batch before step 1 and after the last step."""
    warmup = 2 if train_iters > 2 else 0  # the schedule refuses a warmup longer than the run
    return ["--train-iters", str(train_iters), "--global-batch-size", str(GBS), "--micro-batch-size", str(MBS),
            "--seq-length", str(SEQ), "--lr", "1e-3", "--lr-warmup-iters", str(warmup), "--eval-interval",
            str(train_iters), "--eval-iters", str(EVAL_ITERS), "--no-progress"]


def job_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Job:
    name: str
    nproc: int
    flags: list[str]  # pretrain.py flags; --metrics-file is added
    out: Path  # this job's log and metrics
    launcher: str = "warm"  # forked from the warm process; or "torchrun", "deepspeed": the real launchers
    # the deepspeed launcher's --master_port, chosen as the job starts: one chosen when the job was planned
    # could be taken, minutes later, by another test's gloo connection (EADDRINUSE)
    master_port: int = 0

    @property
    def metrics_file(self) -> Path:
        return self.out / "metrics.jsonl"

    @property
    def argv(self) -> list[str]:
        return [*map(str, self.flags), "--metrics-file", str(self.metrics_file)]

    def warm_step(self) -> dict:
        return {"name": self.name, "entry": "pretrain", "run": self.argv, "nproc": self.nproc,
                "timeout_s": JOB_TIMEOUT_S}

    def command(self) -> list[str]:
        flags = self.argv
        if self.launcher == "deepspeed":
            self.master_port = free_port()
            return [str(BIN / "deepspeed"), "--num_gpus", str(self.nproc), "--master_port", str(self.master_port),
                    PRETRAIN, *flags]
        return [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(self.nproc), PRETRAIN, *flags]


@dataclass
class Result:
    job: Job
    returncode: int
    seconds: float
    timed_out: bool = False
    steps: dict[int, dict] = field(default_factory=dict)  # step -> the last line logged for it

    def log_tail(self, chars: int = 4000) -> str:
        path = self.job.out / "log.txt"
        lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
        kept = [line for line in lines if "warn" not in line.lower()]
        status = f"exit {self.returncode}{' (timed out)' if self.timed_out else ''}"
        head = f"{self.job.name} ({self.job.launcher}, {self.job.nproc} processes): {status}\n"
        return head + "\n".join(kept)[-chars:]

    def check(self) -> Result:
        assert self.returncode == 0, self.log_tail()
        return self

    def series(self, key: str, steps) -> list[float]:
        missing = [s for s in steps if key not in self.steps.get(s, {})]
        assert not missing, f"{self.job.name}: no {key} logged at steps {missing}\n{self.log_tail(1500)}"
        return [self.steps[s][key] for s in steps]


def read_metrics(path: Path) -> dict[int, dict]:
    steps: dict[int, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            steps.setdefault(record["step"], {}).update(record)
    return steps


def run_jobs(jobs: list[Job], max_procs: int = MAX_PROCS, timeout_s: float = JOB_TIMEOUT_S) -> dict[str, Result]:
    """Run the jobs: the warm ones in order by one warm worker, the real-launcher ones beside it, several at
    once while their processes fit in ``max_procs`` (largest first); each real job in its own session so
    that a timed-out job's whole process tree is killed by its group id."""
    warm = [job for job in jobs if job.launcher == "warm"]
    pending = sorted((job for job in jobs if job.launcher != "warm"), key=lambda j: -j.nproc)
    running: dict[str, tuple[Job, subprocess.Popen, float]] = {}
    results: dict[str, Result] = {}
    retried: set[str] = set()
    worker = _start_warm(warm) if warm else None
    try:
        while pending or running:
            used = sum(j.nproc for j, _, _ in running.values())
            for job in list(pending):
                if not running or used + job.nproc <= max_procs:
                    job.out.mkdir(parents=True, exist_ok=True)
                    with open(job.out / "log.txt", "w") as log:  # the child keeps its own copy of the descriptor
                        proc = subprocess.Popen(job.command(), cwd=REPO, env=job_env(), stdout=log,
                                                stderr=subprocess.STDOUT, start_new_session=True)
                    running[job.name] = (job, proc, time.monotonic())
                    pending.remove(job)
                    used += job.nproc
            time.sleep(0.2)
            for name, (job, proc, start) in list(running.items()):
                elapsed = time.monotonic() - start
                timed_out = proc.poll() is None and elapsed > timeout_s
                if timed_out:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                if proc.returncode is not None and _lost_its_port(job, proc.returncode) and name not in retried:
                    # the port was free when chosen and taken before rank 0 bound it (the launcher takes a
                    # number, not a socket): once more on another; any other failure stands
                    print(f"[job] {name}: port {job.master_port} taken before the job bound it; once more")
                    retried.add(name)
                    pending.append(job)
                    del running[name]
                elif proc.returncode is not None:
                    results[name] = Result(job, proc.returncode, elapsed, timed_out, read_metrics(job.metrics_file))
                    print(f"[job] {name}: {job.nproc} processes, exit {proc.returncode}, {elapsed:.1f} s")
                    del running[name]
        if worker is not None:
            results.update(_finish_warm(warm, *worker, timeout_s * len(warm)))
    finally:  # an interrupted test run leaves no job behind
        for _, proc, _ in running.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if worker is not None and worker[0].poll() is None:
            os.killpg(worker[0].pid, signal.SIGKILL)
            worker[0].wait()
    return results


def _lost_its_port(job: Job, returncode: int) -> bool:
    log = job.out / "log.txt"
    return (returncode != 0 and job.launcher == "deepspeed" and log.is_file()
            and f"port: {job.master_port}, useIpv6: false, code: -98" in log.read_text(errors="replace"))


def _start_warm(jobs: list[Job]) -> tuple[subprocess.Popen, Path]:
    root = jobs[0].out.parent / f".warm-{jobs[0].name}"
    (root / "logs").mkdir(parents=True, exist_ok=True)
    for job in jobs:
        job.out.mkdir(parents=True, exist_ok=True)
    (root / "plan.json").write_text(json.dumps({"logs": str(root / "logs"), "steps": [j.warm_step() for j in jobs]}))
    proc = subprocess.Popen([sys.executable, str(WORKER), str(root / "plan.json"), str(root / "report.json")],
                            cwd=REPO, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    return proc, root


def _finish_warm(jobs: list[Job], proc: subprocess.Popen, root: Path, timeout_s: float) -> dict[str, Result]:
    output, _ = proc.communicate(timeout=timeout_s)
    assert proc.returncode == 0, output[-4000:]
    report = {run["name"]: run for run in json.loads((root / "report.json").read_text())}
    results = {}
    for job in jobs:
        run = report[job.name]
        (job.out / "log.txt").write_text(run["stdout"] + run["stderr"])
        results[job.name] = Result(job, run["status"], run["seconds"], False, read_metrics(job.metrics_file))
        print(f"[job] {job.name}: {job.nproc} forked ranks, exit {run['status']}, {run['seconds']:.1f} s")
        if run["status"]:
            print(failure_text(run, 1500))
    return results


def run_sharing_data(jobs: list[Job], train_iters: int) -> dict[str, Result]:
    """Run jobs that read the same samples, once the default corpus is tokenized and the dataset index cache
    of ``train_iters`` steps written here (concurrent jobs would otherwise race to write the same files)."""
    ensure_default_corpus()
    first_batches(train_iters)
    return run_jobs(jobs)


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def max_rel(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    return max(rel(x, y) for x, y in zip(a, b))


def zero_stage(tag_dir: Path) -> int:
    """The ZeRO stage DeepSpeed recorded in a checkpoint's optimizer state (SAVE/global_stepN)."""
    from hyperclone_dist.train.checkpointing import _deepspeed_safe_globals

    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        state = torch.load(tag_dir / "zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=True)
    return int(state["optimizer_state_dict"]["zero_stage"])


# ---- references computed without the trainer ---------------------------------------------------------
def default_corpus() -> tuple[Path, Path]:
    """(prefix, tokenizer) of the embedded corpus the trainer tokenizes for a 512-piece vocabulary."""
    from hyperclone_dist.train.data_feed import default_corpus as trainer_corpus

    return trainer_corpus(Path(os.environ["HYPERCLONE_CACHE"]), 512, build=False)


def ensure_default_corpus() -> None:
    """Tokenize the embedded corpus as the trainer's rank 0 would, if no earlier run has."""
    from hyperclone_dist.train.data_feed import default_corpus as trainer_corpus

    trainer_corpus(Path(os.environ["HYPERCLONE_CACHE"]), 512)


def first_batches(train_iters: int) -> dict[str, dict[str, torch.Tensor]]:
    """Global batch 0 of the train split and validation batch 0, built as Run.setup_data builds them
    (same prefixes, tokenizer, index cache, split, sequence length, seed and sample counts). Building them
    also fills the index cache that the jobs then read instead of writing it concurrently."""
    from hyperclone_dist.data.loader import DataConfig, batch_at, build_datasets

    prefix, tokenizer = default_corpus()
    config = DataConfig(prefixes=(str(prefix),), tokenizer_model=str(tokenizer),
                        cache_dir=str(Path(os.environ["HYPERCLONE_CACHE"]) / "index"), split=SPLIT,
                        sequence_length=SEQ, seed=SEED)
    datasets = build_datasets(config, train_iters * GBS, EVAL_ITERS * GBS)
    batches = {"train": batch_at(datasets.train, 0, GBS), "valid": batch_at(datasets.valid, 0, GBS)}
    for batch in batches.values():
        assert torch.equal(batch["loss_mask"], torch.ones_like(batch["loss_mask"]))  # so the loss is a plain mean
    return batches


@torch.no_grad()
def hf_loss(model_path: Path, batch: dict[str, torch.Tensor]) -> float:
    """Mean next-token cross entropy of an HF directory or small.pt, float32, over every token of the batch."""
    from hyperclone_dist.hf_model import load_hf_model

    model = load_hf_model(model_path)
    logits = model(input_ids=batch["tokens"], position_ids=batch["position_ids"]).logits.float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1)).item()
