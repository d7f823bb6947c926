"""Grown checkpoints in megatron's legacy and torch_dist formats, written by one process or one process per
rank and loaded into a real megatron-core GPTModel at TP x PP (and interleaved, and resharded): logits
equal the small model's, and exporting them back gives what growing straight to HF gives.

Every command runs as its own process: forked from one warm process (tests/warm.py), a command of N ranks
as N forked processes in a gloo group with torchrun's environment. One conversion and one verification
run under torchrun itself, so the launcher's own path is exercised too.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from warm import failure_text, run_warm

from hyperclone_dist.checkpoint.manifest import MANIFEST, file_entries, list_files

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
TOL = 1e-5

pytestmark = pytest.mark.slow


def torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node", str(nproc), "-m", "hyperclone_dist.cli.main", *args]
    return subprocess.run(cmd, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)


LEGACY_CASES = {  # id: (tiny model, growth flags, layout flags)
    "llama-noisy-tp2-pp2": ("llama-gqa2", ["--width-factor", "2", "--method", "noisy"], ["--tp", "2", "--pp", "2"]),
    "llama-x3-ffn2-tp2-pp2": ("llama-gqa2", ["--width-factor", "3", "--ffn-factor", "2", "--method",
                                             "noisy-diagonal"], ["--tp", "2", "--pp", "2"]),
    "gpt2-tied-tp2-pp2": ("gpt2-tied", ["--width-factor", "2", "--method", "noisy"], ["--tp", "2", "--pp", "2"]),
    "gpt2-depth-vpp2": ("gpt2-tied", ["--width-factor", "2", "--insert-layers", "every:1"],
                        ["--tp", "2", "--pp", "2", "--vpp", "2"]),
    # uneven pipeline stages (megatron-core's first/last-stage layer counts): 1 + 2 + 1 of the 4 grown layers
    "llama-depth-pp3-uneven": ("llama-gqa2", ["--width-factor", "2", "--insert-layers", "every:1"],
                               ["--pp", "3", "--decoder-first-pipeline-num-layers", "1",
                                "--decoder-last-pipeline-num-layers", "1"]),
    # 1 kv head grown x2: 2 query groups on 4 TP ranks, each group shared by 2 ranks
    "llama-mqa-kv-below-tp4": ("llama-mqa-tied-bias", ["--width-factor", "2", "--method", "noisy"], ["--tp", "4"]),
    # q/k norms per head: megatron-core's qk_layernorm
    "qwen3-x3-tp2-pp2": ("qwen3", ["--width-factor", "3", "--method", "noisy"], ["--tp", "2", "--pp", "2"]),
    "qwen3-tied-x2-tp2-pp2": ("qwen3-tied", ["--width-factor", "2", "--method", "noisy"], ["--tp", "2", "--pp", "2"]),
    # RoPE scaling: megatron-core's llama3 rope_scaling and linear seq_len_interpolation_factor
    "rope-llama3-x2-tp2-pp2": ("llama-rope-llama3", ["--width-factor", "2", "--method", "noisy"],
                               ["--tp", "2", "--pp", "2"]),
    "rope-linear-tied-x3-tp2-pp2": ("llama-rope-linear", ["--width-factor", "3", "--method", "noisy"],
                                    ["--tp", "2", "--pp", "2"]),
}
# families megatron-core cannot compute exactly: (tiny model, words the one-line refusal must contain)
UNREPRESENTABLE = {"gpt_neox": "parallel residual", "gemma-tied": "sqrt(hidden_size)",
                   "gemma3-tied": "sqrt(hidden_size)", "olmo2": "outputs (output: Gemma 2/3, OLMo-2)"}
TORCH_DIST_CASES = {  # id: (tiny model, growth flags, processes writing, layouts loaded at: [(processes, flags)])
    "llama-1-writer": ("llama-gqa2", ["--width-factor", "2", "--insert-layers", "every:1", "--method", "noisy"], 1,
                       [(1, []), (4, ["--tp", "4"]), (4, ["--tp", "2", "--pp", "2"]),
                        (3, ["--pp", "3", "--decoder-first-pipeline-num-layers", "1",
                             "--decoder-last-pipeline-num-layers", "1"])]),
    "gpt2-4-writers": ("gpt2-tied", ["--width-factor", "2", "--insert-layers", "every:1", "--method",
                                     "noisy-diagonal"], 4, [(4, ["--pp", "4"]), (4, ["--tp", "2", "--pp", "2",
                                                                                      "--vpp", "2"])]),
}
TD_FLAGS = ["--format", "torch_dist", "--tp", "2", "--pp", "2", "--width-factor", "2", "--method", "noisy",
            "--no-progress"]


def ranks(layout: list[str]) -> int:
    """tp x pp of layout flags: the processes a verification at that layout takes."""
    sizes = {flag: int(value) for flag, value in zip(layout, layout[1:]) if flag in ("--tp", "--pp")}
    return sizes.get("--tp", 1) * sizes.get("--pp", 1)


def step(name: str, *argv, nproc: int = 1) -> dict:
    return {"name": name, "run": [str(a) for a in argv], "nproc": nproc}


def export_steps(name: str, src: Path, ckpt: Path, growth: list[str], root: Path) -> list[dict]:
    """hyperclone export of a checkpoint, and growing the source straight to HF, for comparison."""
    return [step(f"{name} export", "export", ckpt, "--out", root / name / "exported", "--no-progress"),
            step(f"{name} direct", "convert", src, "--out", root / name / "direct", "--no-progress", *growth)]


@pytest.fixture(scope="module")
def runs(tiny_model_dirs, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("megatron_convert")
    steps = []
    for name, (model, growth, layout) in LEGACY_CASES.items():
        src, out = tiny_model_dirs[model], root / name / "ckpt"
        steps += [step(f"{name} convert", "convert", src, "--out", out, "--format", "legacy", "--no-progress",
                       *growth, *layout, nproc=2),
                  step(f"{name} verify", "verify", src, out, *layout, nproc=ranks(layout)),
                  *export_steps(name, src, out, growth, root)]
    for name, (model, growth, writers, loads) in TORCH_DIST_CASES.items():
        src, out = tiny_model_dirs[model], root / name / "ckpt"
        steps.append(step(f"{name} convert", "convert", src, "--out", out, "--format", "torch_dist", "--tp", "2",
                          "--pp", "2", "--no-progress", *growth, nproc=writers))
        steps += [step(f"{name} verify {' '.join(flags) or 'tp1'}", "verify", src, out, *flags, nproc=nproc)
                  for nproc, flags in loads]
        steps += [*export_steps(name, src, out, growth, root),
                  step(f"{name} small.pt", "export", out, "--out", root / name / "again.pt", "--format", "small.pt"),
                  step(f"{name} verify small.pt", "verify", src, root / name / "again.pt"),
                  step(f"{name} grown again", "convert", out, "--out", root / name / "regrown", "--width-factor", "2",
                       "--method", "noisy", "--no-progress"),
                  step(f"{name} verify grown again", "verify", out, root / name / "regrown")]
    llama, mqa = tiny_model_dirs["llama-gqa2"], tiny_model_dirs["llama-mqa-tied-bias"]
    steps += [
        step("one process legacy", "convert", mqa, "--out", root / "one", "--format", "legacy", "--tp", "2", "--pp",
             "2", "--width-factor", "2", "--method", "noisy", "--no-progress"),
        step("warmstart convert", "convert", llama, "--out", root / "warmstart", "--format", "legacy", "--tp", "2",
             "--width-factor", "2", "--method", "warmstart", "--no-progress"),
        step("warmstart verify", "verify", llama, root / "warmstart", "--tp", "2", nproc=2),
        *[step(f"unrepresentable {model}", "convert", tiny_model_dirs[model], "--out", root / f"no-{model}",
               "--format", "legacy", "--tp", "2", "--width-factor", "2") for model in UNREPRESENTABLE],
        step("too few processes", "convert", llama, "--out", root / "few", "--format", "torch_dist", "--tp", "2",
             "--pp", "2", "--width-factor", "2", nproc=3),
        step("td one process", "convert", llama, "--out", root / "td-one", *TD_FLAGS),
        step("td one process per rank", "convert", llama, "--out", root / "td-four", *TD_FLAGS, nproc=4),
        step("td no checksums", "convert", llama, "--out", root / "td-bare", "--no-checksums", *TD_FLAGS),
    ]
    return {"root": root, **run_warm(steps, root / "warm")}


def ok(run: dict) -> dict:
    assert run["status"] == 0, failure_text(run)
    return run


def verify_line(run: dict) -> str:
    lines = [line for line in run["stdout"].splitlines() if line.startswith("max abs logit diff")]
    assert len(lines) == 1, failure_text(run)
    return lines[0]


def assert_verified(run: dict) -> None:
    line = verify_line(ok(run))
    assert line.endswith("OK") and float(line.split("max rel ")[1].split()[0]) <= TOL, line


def assert_export_matches_direct_hf(root: Path, name: str, runs: dict) -> None:
    """hyperclone export of a megatron checkpoint equals growing straight to HF, tensor for tensor."""
    from safetensors.torch import load_file

    ok(runs[f"{name} export"]), ok(runs[f"{name} direct"])

    def tensors(directory: Path) -> dict:
        out = {}
        for file in sorted(directory.glob("*.safetensors")):
            out.update(load_file(file))
        return out

    a, b = tensors(root / name / "exported"), tensors(root / name / "direct")
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("name", LEGACY_CASES)
def test_legacy_checkpoint_in_gpt_model_matches_small(runs, name):
    ok(runs[f"{name} convert"])
    assert (runs["root"] / name / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "0"
    assert_verified(runs[f"{name} verify"])
    assert_export_matches_direct_hf(runs["root"], name, runs)


def _digests(root: Path) -> dict[str, str]:
    out = {}
    for file in sorted(root.rglob("model_optim_rng.pt")):
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(file, weights_only=True)["model"]
        digest = hashlib.sha256()
        for name in sorted(state):
            digest.update(name.encode() + state[name].numpy().tobytes())
        out[str(file.relative_to(root))] = digest.hexdigest()
    return out


def test_one_process_and_torchrun_write_the_same_bits(runs, tiny_model_dirs):
    """The same legacy checkpoint from one process and from three real torchrun processes (ranks dealt out)."""
    ok(runs["one process legacy"])
    three = runs["root"] / "three"
    proc = torchrun(3, "convert", str(tiny_model_dirs["llama-mqa-tied-bias"]), "--out", str(three), "--format",
                    "legacy", "--tp", "2", "--pp", "2", "--width-factor", "2", "--method", "noisy", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = _digests(runs["root"] / "one")
    assert len(one) == 4 and one == _digests(three)


def test_warmstart_checkpoint_fails_verification(runs):
    ok(runs["warmstart convert"])
    verify = runs["warmstart verify"]
    assert verify["status"] == 1 and verify_line(verify).endswith("FAIL"), failure_text(verify)


@pytest.mark.parametrize("model", UNREPRESENTABLE)
def test_unrepresentable_family_refused_in_one_line(runs, model):
    run = runs[f"unrepresentable {model}"]
    assert run["status"] == 2, failure_text(run)
    lines = [line for line in run["stderr"].splitlines() if line.strip()]
    assert len(lines) == 1 and UNREPRESENTABLE[model] in lines[0], run["stderr"]
    assert not (runs["root"] / f"no-{model}").exists()


@pytest.mark.parametrize("name", TORCH_DIST_CASES)
def test_torch_dist_reshards_on_load(runs, tiny_model_dirs, name):
    """Written at TP2 x PP2 (by one process playing each rank in turn, or by one process per rank), loaded at
    other layouts by megatron's dist_checkpointing; a torch_dist checkpoint exported to small.pt is the next
    run's --clone-from source and still the small model's function, and the checkpoint itself grows again."""
    model, _, _, loads = TORCH_DIST_CASES[name]
    ok(runs[f"{name} convert"])
    out = runs["root"] / name / "ckpt"
    assert (out / "iter_0000000" / "metadata.json").is_file()
    assert len(list((out / "iter_0000000").glob("__*_*.distcp"))) >= 4  # every rank wrote its own files
    for _, flags in loads:
        assert_verified(runs[f"{name} verify {' '.join(flags) or 'tp1'}"])
    assert_export_matches_direct_hf(runs["root"], name, runs)
    ok(runs[f"{name} small.pt"])
    assert_verified(runs[f"{name} verify small.pt"])
    ok(runs[f"{name} grown again"])  # a megatron checkpoint is itself a source to grow, straight to HF
    assert_verified(runs[f"{name} verify grown again"])
    if name == "llama-1-writer":  # torchrun itself, once: the launcher path of a multi-rank verify
        proc = torchrun(4, "verify", str(tiny_model_dirs[model]), str(out), "--tp", "2", "--pp", "2")
        lines = [line for line in proc.stdout.splitlines() if line.startswith("max abs logit diff")]
        assert proc.returncode == 0 and len(lines) == 1 and lines[0].endswith("OK"), proc.stderr[-3000:]


def test_torch_dist_from_too_few_processes_is_refused(runs):
    run = runs["too few processes"]
    errors = [line for line in run["stderr"].splitlines() if "hyperclone convert: error" in line]
    assert run["status"] != 0 and errors and "torchrun --nproc_per_node 4" in errors[0], failure_text(run)
    assert not (runs["root"] / "few").exists()


def test_torch_dist_from_one_process_equals_one_process_per_rank(runs):
    """The single process (every rank in turn, a writer thread) saves every chunk with the same bytes as four
    processes (one rank each); both take the digests while writing, and the single process's manifest equals
    one computed afterwards by reading every file back."""
    one, four = runs["root"] / "td-one", runs["root"] / "td-four"
    ok(runs["td one process"]), ok(runs["td one process per rank"])

    def chunk_digests(root: Path) -> dict[str, str]:
        files = json.loads((root / MANIFEST).read_text())["files"]
        return {t["name"]: t["hash"] for rel, entry in files.items() if rel.endswith(".distcp")
                for t in entry["tensors"]}

    written_by_one = chunk_digests(one)
    assert len(written_by_one) > 20 and written_by_one == chunk_digests(four)
    assert len(list((one / "iter_0000000").glob("__*_0.distcp"))) == 4  # one file per rank

    def by_offset(entry: dict) -> dict:
        return {**entry, "tensors": sorted(entry.get("tensors", []), key=lambda t: t["offset"])}

    manifest = json.loads((one / MANIFEST).read_text())["files"]
    reread = file_entries(one, [rel for rel, _ in list_files(one)])
    assert {rel: by_offset(e) for rel, e in manifest.items()} == {rel: by_offset(e) for rel, e in reread.items()}
    ok(runs["td no checksums"])
    assert not (runs["root"] / "td-bare" / MANIFEST).exists()
