"""Output that reads like a tool's: a clean run of ``hyperclone`` convert/verify/export or a ``pretrain.py``
start-up prints no warnings, a command's last stdout line is its verdict, progress bars are drawn only on a
terminal, ``hyperclone inspect | head`` exits quietly, and ``verify --tp 2 --pp 2`` started without a
launcher runs its ranks itself.

Every command runs in a fresh process (a library warns at import once per process), with stderr a pipe
(not a terminal, as in CI and in a job's log) and the user's default warning filters (no PYTHONWARNINGS).
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import textwrap
import threading
import warnings
from pathlib import Path

import pytest
import torch

from hyperclone_dist.builtin import BUILTIN, random_state_dict
from hyperclone_dist.checkpoint import small_pt
from hyperclone_dist.cli.ranks import run_ranks
from hyperclone_dist.progress import show_progress
from hyperclone_dist.quiet_imports import quiet_libraries

REPO = Path(__file__).resolve().parents[1]
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS" and k not in LAUNCHER_VARS}
ENV.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
VERDICT = r"max abs logit diff \S+  max rel \S+  \(tol \S+, .*\)  {}"  # .format("OK") or ("FAIL")


def hyperclone(*args: str | Path, stderr=subprocess.PIPE) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "hyperclone_dist.cli.main", *map(str, args)]
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, timeout=300, env=ENV, cwd=REPO)


def assert_quiet(proc: subprocess.CompletedProcess, status: int, last_line: str) -> None:
    """Exit ``status``, nothing at all on stderr, and the last stdout line matching ``last_line``."""
    assert proc.stderr == "", f"stderr of a clean run:\n{proc.stderr[-3000:]}"
    assert proc.returncode == status, proc.stdout[-2000:]
    lines = proc.stdout.rstrip("\n").splitlines()
    assert lines and re.fullmatch(last_line, lines[-1]), proc.stdout[-2000:]


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    import transformers

    transformers.logging.set_verbosity_error()
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("out") / "small"
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def torch_dist_ckpt(small, tmp_path_factory) -> Path:
    """torch_dist at TP2 x PP2, written by one process (DCP without a process group, megatron-core imported)."""
    out = tmp_path_factory.mktemp("td") / "ckpt"
    proc = hyperclone("convert", small, "--out", out, "--format", "torch_dist", "--tp", "2", "--pp", "2",
                      "--width-factor", "2")
    assert_quiet(proc, 0, r"wrote .*: torch_dist tp=2 pp=2, llama .*")
    return out


def test_hf_convert_and_verify_print_only_their_result(small, tmp_path):
    big = tmp_path / "big"
    assert_quiet(hyperclone("convert", small, "--out", big, "--width-factor", "2", "--method", "noisy"), 0,
                 r"wrote .*: llama hidden 16->32, .*")
    assert_quiet(hyperclone("verify", small, big), 0, VERDICT.format("OK"))
    assert_quiet(hyperclone("verify", small, big, "--tol", "0"), 1, VERDICT.format("FAIL"))


def test_megatron_verify_and_export_print_only_their_result(small, torch_dist_ckpt, tmp_path):
    assert_quiet(hyperclone("verify", small, torch_dist_ckpt), 0, VERDICT.format("OK"))
    assert_quiet(hyperclone("export", torch_dist_ckpt, "--out", tmp_path / "hf"), 0, r"wrote .*: hf, llama .*")


@pytest.mark.slow
def test_verify_at_tp2_pp2_without_a_launcher_runs_its_ranks(small, torch_dist_ckpt):
    """Four local ranks started by the command itself: the verdict of GPTModel at TP2 x PP2, their exit
    status, and none of megatron-core's TP-layer or DCP warnings from any rank."""
    proc = hyperclone("verify", small, torch_dist_ckpt, "--tp", "2", "--pp", "2")
    assert_quiet(proc, 0, r"max abs .*GPTModel tp=2 pp=2, .*  OK")


def test_a_layout_the_model_refuses_is_said_before_any_rank_starts(small, torch_dist_ckpt):
    proc = hyperclone("verify", small, torch_dist_ckpt, "--tp", "3")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == ["hyperclone verify: error: attention heads (8) are not divisible by tp=3: "
                                        "this model allows --tp in {1, 2, 4, 8}"], proc.stderr


def test_ranks_return_the_failed_ranks_status_and_stop_the_others(tmp_path, monkeypatch, capfd):
    """A rank that exits 3 while its peers wait (as in a collective) ends the job with 3, its peers stopped."""
    (tmp_path / "rank_job.py").write_text(textwrap.dedent("""
        import os, sys, time
        assert os.environ["WORLD_SIZE"] == "3" and os.environ["MASTER_PORT"].isdigit()
        if os.environ["RANK"] == "1":
            sys.exit(3)
        time.sleep(120)
    """))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    assert run_ranks(3, [], "hyperclone verify", module="rank_job", straggler_grace_s=0.5) == 3
    assert capfd.readouterr().err == "hyperclone verify: rank 1 exited with status 3; stopped the ranks still running\n"


def test_inspect_into_a_pipe_closed_early_exits_quietly(tmp_path):
    """``inspect --tensors | head -1`` through a real pipe, with far more than a pipe buffer to print."""
    cfg = dataclasses.replace(BUILTIN, vocab_size=16, hidden_size=8, num_layers=400, num_heads=2, num_kv_heads=1,
                              head_dim=4, ffn_hidden_size=8, max_position_embeddings=16)  # ~200 KiB of lines
    path = small_pt.save(tmp_path / "deep.pt", cfg, random_state_dict(cfg))
    cmd = [sys.executable, "-m", "hyperclone_dist.cli.main", "inspect", str(path), "--tensors"]
    writer = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, cwd=REPO)
    head = subprocess.run(["head", "-1"], stdin=writer.stdout, capture_output=True, text=True, timeout=120)
    writer.stdout.close()  # only head holds the reading end: once it exits, the pipe is closed
    stderr = writer.communicate(timeout=120)[1].decode()
    assert head.stdout.startswith(f"path        {path} (small.pt)"), head.stdout
    assert stderr == "", stderr
    assert writer.returncode == 141  # 128 + SIGPIPE, what the shell reports for any tool in that place


def test_a_progress_bar_is_drawn_on_a_terminal(small, tmp_path):
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # tqdm sizes bars to it
    drawn = []
    reader = threading.Thread(target=_drain, args=(primary, drawn))  # read while it runs: a pty buffer is small
    reader.start()
    try:
        proc = hyperclone("convert", small, "--out", tmp_path / "big", "--width-factor", "2", "--shard-size",
                          "0.00002", stderr=secondary)
    finally:
        os.close(secondary)
        reader.join(timeout=60)
        os.close(primary)
    terminal = b"".join(drawn).decode(errors="replace")
    # the bar went to the terminal (how far it got before it was cleared depends on tqdm's refresh timing)
    assert re.search(r"writing: +\d+%\|", terminal), terminal
    assert proc.returncode == 0 and re.fullmatch(r"wrote .*", proc.stdout.rstrip("\n").splitlines()[-1])


def _drain(fd: int, into: list[bytes]) -> None:
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: every writer of the terminal has closed it
            return
        if not chunk:
            return
        into.append(chunk)


def test_show_progress_needs_a_terminal(monkeypatch):
    class Terminal:
        def isatty(self):
            return True

    assert not show_progress(True)  # pytest's captured stderr is no terminal
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert show_progress(True) and not show_progress(False)


def test_filters_are_for_the_libraries_own_warnings_only():
    """The same message is dropped when megatron-core or torch issue it and shown when anyone else does."""
    apex = "Transformer Engine and Apex are not installed. Falling back to Torch optimizers."
    no_dist = ("torch.distributed is disabled, unavailable or uninitialized, assuming the intent is to load in a "
               "single process.")
    with warnings.catch_warnings(record=True) as seen:
        warnings.resetwarnings()
        warnings.simplefilter("always")  # below the filters installed next, which go in front
        quiet_libraries()
        for module in ("megatron.core.optimizer", "torch.distributed.checkpoint.utils", "user_script"):
            for message in (apex, no_dist):
                warnings.warn_explicit(message, UserWarning, f"{module}.py", 1, module)
    shown = [(Path(w.filename).stem, str(w.message)[:5]) for w in seen]
    assert shown == [("megatron.core.optimizer", "torch"), ("torch.distributed.checkpoint.utils", "Trans"),
                     ("user_script", "Trans"), ("user_script", "torch")], shown


@pytest.mark.slow
def test_pretrain_start_up_prints_no_warnings(builtin_small_pt, tmp_path):
    """One process, one step: megatron-core and DeepSpeed are imported and set up, nothing on stderr, and the
    trainer's own line comes first (no DeepSpeed build banner)."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "pretrain.py"), "--clone-from", str(builtin_small_pt),
         "--width-factor", "2", "--method", "noisy", "--train-iters", "1", "--global-batch-size", "2",
         "--micro-batch-size", "1", "--seq-length", "32", "--eval-iters", "1"],
        capture_output=True, text=True, timeout=300, env=ENV, cwd=tmp_path)
    assert_quiet(proc, 0, r"step 1/1 \| loss .*")  # stderr no terminal: no bar, one line per logged step
    assert proc.stdout.startswith("pretrain: cloned from "), proc.stdout[:500]
