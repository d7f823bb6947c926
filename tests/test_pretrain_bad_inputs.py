"""Bad input to ``launch/pretrain.py``: a non-zero exit (2 for one process), exactly one line
``pretrain.py: error: ...`` naming the problem, no traceback from the trainer, and no hang.

Most cases run one process (a world of one rank): the argument, model-shape, source, data and DeepSpeed
checks all fire before the first step. The cases that need several ranks (the world size, data
parallelism, a pipeline, a checkpoint written at another layout) run as a gloo job of several: every rank
finds the problem, one rank says it. Each case is a fresh process forked from one warm process
(tests/warm.py); one runs under ``torchrun --standalone`` itself, whose own report of the failed child is
filtered out: only lines starting with ``pretrain.py:`` are the trainer's.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from warm import run_warm

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = REPO / "launch" / "pretrain.py"
TORCHRUN = Path(sys.executable).with_name("torchrun")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
BAD_INPUT = 2
TORCHRUN_TIMEOUT = 360
CORPUS_BYTES = 200_000  # of the default corpus: enough documents for a few 32-token steps
# trainer frames in a traceback; torchrun's own "ChildFailedError" traceback names only torch's files
TRAINER_FRAME = re.compile(r'File "[^"]*(hyperclone_dist|launch/pretrain\.py|megatron|deepspeed)')

pytestmark = pytest.mark.slow


# ---- running the trainer ------------------------------------------------------------------------
def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run in its own session so that a hang kills the launcher and every rank it started."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"hung for {timeout} s: {shlex.join(cmd)}\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def torchrun(nproc: int, *args: str | Path) -> subprocess.CompletedProcess:
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node", str(nproc), str(PRETRAIN), *map(str, args)]
    return _run(cmd, TORCHRUN_TIMEOUT)


def assert_one_line_error(proc: subprocess.CompletedProcess, *names: str, launcher: bool = False) -> str:
    """The failure contract. One process: exit 2 and stderr is the error line alone. Under torchrun: a
    non-zero exit, a child that exited 2, and one ``pretrain.py:`` line among torchrun's report."""
    ours = [line for line in proc.stderr.splitlines() if line.startswith("pretrain.py:")]
    assert proc.returncode != 0, f"exit 0 for bad input:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
    assert not TRAINER_FRAME.search(proc.stderr), f"a traceback instead of one line:\n{proc.stderr[-4000:]}"
    assert len(ours) == 1, f"expected one pretrain.py line, got {len(ours)}:\n{proc.stderr[-4000:]}"
    line = ours[0]
    print(line)  # shown by pytest -rA: the record of what each case says
    assert line.startswith("pretrain.py: error: "), line
    if launcher:
        assert re.search(r"exitcode\s*:\s*2\b", proc.stderr), f"no rank exited 2:\n{proc.stderr[-3000:]}"
    else:
        assert proc.returncode == BAD_INPUT, proc.stderr[-3000:]
        assert [x for x in proc.stderr.splitlines() if x.strip()] == ours, proc.stderr[-3000:]
    for name in names:
        assert name in line, f"{name!r} not named in: {line}"
    return line


# ---- inputs -------------------------------------------------------------------------------------
class RunsCode:
    """Unpickling this touches ``marker``: proof that the unpickler executed something."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """The built-in small model (good, truncated, carrying a code payload), a GPT-NeoX directory with
    parallel residual, tokenizers of 512 (the model's vocabulary) and 1024 pieces with a dataset each,
    and the JSON files the cases pass."""
    import transformers

    from hyperclone_dist.builtin import BUILTIN, random_state_dict
    from hyperclone_dist.checkpoint import small_pt
    from hyperclone_dist.data.prepare import prepare_dataset
    from hyperclone_dist.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("pretrain_inputs")
    small_pt.save(root / "small.pt", BUILTIN, random_state_dict(BUILTIN, seed=0))
    data = (root / "small.pt").read_bytes()
    (root / "truncated.pt").write_bytes(data[: len(data) // 2])
    payload = small_pt.pack(BUILTIN, random_state_dict(BUILTIN))
    payload["meta"] = {"note": RunsCode(root / "code-ran")}
    torch.save(payload, root / "evil.pt")

    transformers.logging.set_verbosity_error()
    neox = transformers.GPTNeoXConfig(hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                                      num_attention_heads=2, use_parallel_residual=True, vocab_size=64,
                                      max_position_embeddings=32)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(neox).save_pretrained(root / "neox")

    for vocab in (BUILTIN.vocab_size, 2 * BUILTIN.vocab_size):
        tok = train_tokenizer(None, root / f"tok{vocab}", vocab, default_corpus_bytes=CORPUS_BYTES).model
        prepare_dataset(None, tok, root / "ds" / f"stdlib{vocab}", default_corpus_bytes=CORPUS_BYTES,
                        progress=False)
    shutil.copy(root / "ds" / "stdlib512.idx", root / "ds" / "nobin.idx")  # an index whose .bin is gone

    json_files = {
        "zero3.json": {"zero_optimization": {"stage": 3}},
        "zero2.json": {"zero_optimization": {"stage": 2}},
        "mbs4.json": {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 1}},
        "unknown_key.json": {"train_iters": 2, "global_batch_size": 4, "no_such_flag": 1},
    }
    for name, value in json_files.items():
        (root / name).write_text(json.dumps(value))
    return {"root": root, "small": root / "small.pt", "tok": root / "tok512.model",
            "ds": root / "ds" / "stdlib512"}


def flags(inputs: dict[str, Path], tmp_path: Path, *extra: str) -> list[str]:
    """A small valid run (2 steps of 4 x 32 tokens on the 512-piece data) with ``extra`` appended: a later
    flag wins, so a case overrides what it breaks. ``{root}`` in ``extra`` is the inputs directory."""
    base = ["--clone-from", str(inputs["small"]), "--width-factor", "2", "--method", "noisy",
            "--train-iters", "2", "--global-batch-size", "4", "--micro-batch-size", "2", "--seq-length", "32",
            "--data-path", str(inputs["ds"]), "--tokenizer-model", str(inputs["tok"]),
            "--data-cache-path", str(tmp_path / "cache"), "--save", str(tmp_path / "out"), "--no-progress"]
    return base + [arg.format(root=inputs["root"]) for arg in extra]


# ---- the cases ------------------------------------------------------------------------------------
SINGLE_PROCESS_CASES = {  # id: (flags appended to a valid run, what the error line must name)
    "clone-from-missing": (["--clone-from", "{root}/no-such.pt"], ["{root}/no-such.pt"]),
    "clone-from-parallel-residual": (["--clone-from", "{root}/neox"], ["gpt_neox", "parallel residual"]),
    "clone-from-truncated": (["--clone-from", "{root}/truncated.pt"], ["{root}/truncated.pt", "truncated"]),
    "data-prefix-missing": (["--data-path", "{root}/ds/nothing"], ["{root}/ds/nothing.idx", "missing"]),
    "data-bin-missing": (["--data-path", "{root}/ds/nobin"], ["{root}/ds/nobin.bin", "missing"]),
    "tokenizer-missing": (["--tokenizer-model", "{root}/none.model"],
                          ["{root}/none.model", "does not exist"]),
    "tokenizer-larger-than-vocab": (["--data-path", "{root}/ds/stdlib1024", "--tokenizer-model",
                                     "{root}/tok1024.model"], ["{root}/tok1024.model", "1024", "512"]),
    "zero3": (["--deepspeed_config", "{root}/zero3.json"], ["ZeRO stage 3"]),
    "deepspeed-micro-batch-conflict": (["--deepspeed_config", "{root}/mbs4.json"],
                                       ["train_micro_batch_size_per_gpu=4", "gives 2"]),
    "config-unknown-key": (["--config", "{root}/unknown_key.json"],
                           ["{root}/unknown_key.json", "'no_such_flag'"]),
    "seq-length-past-context": (["--seq-length", "129"], ["--seq-length 129", "128"]),
    # the grown model: 8 heads, 4 layers
    "heads-by-tp": (["--tp", "3"], ["attention heads (8)", "tp=3", "--tp in {{1, 2, 4, 8}}"]),
    "layers-by-pp": (["--pp", "3"], ["layers (4)", "pp x vpp = 3 x 1 = 3", "--pp in {{1, 2, 4}}"]),
    "layers-by-pp-vpp": (["--pp", "2", "--vpp", "3"], ["layers (4)", "pp x vpp = 2 x 3 = 6", "--vpp in {{2}}"]),
    "small-pt-with-code": (["--clone-from", "{root}/evil.pt"], ["{root}/evil.pt", "nothing in it was executed"]),
}
SEVERAL_RANK_CASES = {  # id: (ranks, flags appended to a valid run, what the error line must name)
    "global-batch-by-micro-times-dp": (2, ["--global-batch-size", "6"],  # 2 ranks, tp=pp=1: dp=2
                                       ["global batch 6", "micro batch 2", "data-parallel size 2"]),
    "zero2-with-pipeline": (2, ["--pp", "2", "--deepspeed_config", "{root}/zero2.json"], ["ZeRO-2", "pp > 1"]),
    # the checkpoint holds the x2 clone (hidden 128) at TP2 x DP1; resuming it at TP1 x DP2 cannot reuse
    # DeepSpeed's partitions, and resuming it as a x3 clone (hidden 192) must not silently train x2
    "resume-at-another-layout": (2, ["--tp", "1", "--train-iters", "4", "--load", "{saved}"],
                                 ["{saved}", r"re:tp\W{{0,4}}2", r"re:dp\W{{0,4}}1", r"re:tp\W{{0,4}}1",
                                  r"re:dp\W{{0,4}}2"]),
    "resume-as-another-shape": (2, ["--width-factor", "3", "--tp", "2", "--train-iters", "4", "--load", "{saved}"],
                                ["{saved}", "128", "192"]),
}


@pytest.fixture(scope="module")
def runs(inputs, tmp_path_factory) -> dict:
    """Every case, in one warm worker, after the TP2 x PP1 training checkpoint the resume cases read (the x2
    clone, stopped after step 2 of 4)."""
    root = tmp_path_factory.mktemp("cases")
    saved = root / "saved" / "ckpt"
    steps = [{"name": "checkpoint", "entry": "pretrain", "nproc": 2,
              "run": flags(inputs, root / "saved", "--tp", "2", "--train-iters", "4", "--exit-interval", "2",
                           "--save", str(saved))}]
    for case, (extra, _) in SINGLE_PROCESS_CASES.items():
        steps.append({"name": case, "entry": "pretrain", "run": flags(inputs, root / case, *extra)})
    for case, (nproc, extra, _) in SEVERAL_RANK_CASES.items():
        steps.append({"name": case, "entry": "pretrain", "nproc": nproc,
                      "run": flags(inputs, root / case, *(a.format(saved=saved, root="{root}") for a in extra))})
    found = run_warm(steps, root / "warm", src=saved)  # each run's report hashes the checkpoint after it
    assert found["checkpoint"]["status"] == 0, found["checkpoint"]["stderr"][-4000:]
    assert (saved / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    return {"root": root, "saved": saved, **found}


def completed(run: dict) -> subprocess.CompletedProcess:
    return subprocess.CompletedProcess(run["argv"], run["status"], run["stdout"], run["stderr"])


@pytest.mark.parametrize("case", list(SINGLE_PROCESS_CASES))
def test_one_process_bad_input_is_one_line(inputs, runs, case):
    _, names = SINGLE_PROCESS_CASES[case]
    assert_one_line_error(completed(runs[case]), *(name.format(root=inputs["root"]) for name in names))
    assert not (runs["root"] / case / "out").exists()  # a run that never started leaves no run directory


def test_small_pt_with_code_is_not_executed(inputs, runs):
    marker, evil = inputs["root"] / "code-ran", inputs["root"] / "evil.pt"
    assert runs["small-pt-with-code"]["status"] == BAD_INPUT and not marker.exists()
    torch.load(evil, weights_only=False)  # the refusal means something only if the payload is live
    assert marker.exists()
    marker.unlink()


@pytest.mark.parametrize("case", list(SEVERAL_RANK_CASES))
def test_several_ranks_bad_input_is_one_line_from_one_rank(inputs, runs, case):
    """Every rank finds the problem; rank 0 alone prints it, and every rank exits 2."""
    _, _, names = SEVERAL_RANK_CASES[case]
    names = [n.format(saved=runs["saved"], root=inputs["root"]) for n in names]
    line = assert_one_line_error(completed(runs[case]), *(n for n in names if not n.startswith("re:")))
    for pattern in (n[3:] for n in names if n.startswith("re:")):
        assert re.search(pattern, line, re.IGNORECASE), f"{pattern} not in: {line}"
    assert all(not rank["stderr"].strip() for rank in runs[case]["ranks"][1:]), runs[case]["ranks"]
    assert not (runs["root"] / case / "out").exists()
    if "{saved}" in SEVERAL_RANK_CASES[case][1]:  # a refused resume leaves the checkpoint byte for byte
        assert runs[case]["src"] == runs["checkpoint"]["src"] and runs["checkpoint"]["src"]


def test_world_size_not_divisible_by_tp_pp_under_torchrun(inputs, tmp_path):
    """torchrun itself: 3 ranks for tp=2; the job fails with a rank's exit status 2 and one line from rank 0."""
    proc = torchrun(3, *flags(inputs, tmp_path, "--tp", "2"))
    assert_one_line_error(proc, "world size 3", "tp x pp", "2", launcher=True)
