"""Grown checkpoints in megatron's legacy layout, written by real processes and loaded into a real
megatron-core GPTModel at TP=2 x PP=2 (and interleaved): logits equal the small model's."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
CLI = ["-m", "hyperclone_dist.cli.main"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}

pytestmark = pytest.mark.slow


def torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node", str(nproc), *CLI, *args]
    return subprocess.run(cmd, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)


def single(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *CLI, *args], env=ENV, cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def assert_export_matches_direct_hf(src: Path, ckpt: Path, growth: list[str], tmp_path: Path) -> None:
    """hyperclone export of a megatron checkpoint equals growing straight to HF, tensor for tensor."""
    from safetensors.torch import load_file

    exported, direct = tmp_path / "exported", tmp_path / "direct"
    proc = single("export", str(ckpt), "--out", str(exported), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert single("convert", str(src), "--out", str(direct), "--no-progress", *growth).returncode == 0

    def tensors(root: Path) -> dict:
        out = {}
        for file in sorted(root.glob("*.safetensors")):
            out.update(load_file(file))
        return out

    a, b = tensors(exported), tensors(direct)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _verify_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stdout.splitlines() if line.startswith("max abs logit diff")]
    assert len(lines) == 1, proc.stdout + proc.stderr[-3000:]
    return lines[0]


CASES = [  # (tiny model, growth flags, layout flags)
    ("llama-gqa2", ["--width-factor", "2", "--method", "noisy"], ["--tp", "2", "--pp", "2"]),
    ("llama-gqa2", ["--width-factor", "3", "--ffn-factor", "2", "--method", "noisy-diagonal"],
     ["--tp", "2", "--pp", "2"]),
    ("gpt2-tied", ["--width-factor", "2", "--method", "noisy"], ["--tp", "2", "--pp", "2"]),
    ("gpt2-tied", ["--width-factor", "2", "--insert-layers", "every:1"], ["--tp", "2", "--pp", "2", "--vpp", "2"]),
]


@pytest.mark.parametrize("case,growth,layout", CASES, ids=lambda v: v if isinstance(v, str) else "-".join(v))
def test_legacy_checkpoint_in_gpt_model_matches_small(tiny_model_dirs, tmp_path, case, growth, layout):
    src, out = tiny_model_dirs[case], tmp_path / "ckpt"
    convert = torchrun(2, "convert", str(src), "--out", str(out), "--format", "legacy", "--no-progress",
                       *growth, *layout)
    assert convert.returncode == 0, convert.stderr[-3000:]
    assert (out / "latest_checkpointed_iteration.txt").read_text().strip() == "0"
    verify = torchrun(4, "verify", str(src), str(out), *layout)
    line = _verify_line(verify)
    assert verify.returncode == 0 and line.endswith("OK"), line
    assert float(line.split("max rel ")[1].split()[0]) <= 1e-5
    assert_export_matches_direct_hf(src, out, growth, tmp_path)


def _digests(root: Path) -> dict[str, str]:
    import argparse

    import torch

    out = {}
    for file in sorted(root.rglob("model_optim_rng.pt")):
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(file, weights_only=True)["model"]
        digest = hashlib.sha256()
        for name in sorted(state):
            digest.update(name.encode() + state[name].numpy().tobytes())
        out[str(file.relative_to(root))] = digest.hexdigest()
    return out


def test_one_process_and_torchrun_write_the_same_bits(tiny_model_dirs, tmp_path):
    src = tiny_model_dirs["llama-mqa-tied-bias"]
    flags = ["--format", "legacy", "--tp", "2", "--pp", "2", "--width-factor", "2", "--method", "noisy",
             "--no-progress"]
    assert single("convert", str(src), "--out", str(tmp_path / "one"), *flags).returncode == 0
    assert torchrun(3, "convert", str(src), "--out", str(tmp_path / "three"), *flags).returncode == 0
    one, three = _digests(tmp_path / "one"), _digests(tmp_path / "three")
    assert len(one) == 4 and one == three


def test_warmstart_checkpoint_fails_verification(tiny_model_dirs, tmp_path):
    src, out = tiny_model_dirs["llama-gqa2"], tmp_path / "ckpt"
    assert single("convert", str(src), "--out", str(out), "--format", "legacy", "--tp", "2",
                  "--width-factor", "2", "--method", "warmstart", "--no-progress").returncode == 0
    verify = torchrun(2, "verify", str(src), str(out), "--tp", "2")
    assert verify.returncode == 1 and _verify_line(verify).endswith("FAIL")


def test_unrepresentable_family_refused_in_one_line(tiny_model_dirs, tmp_path):
    proc = single("convert", str(tiny_model_dirs["gpt_neox"]), "--out", str(tmp_path / "x"), "--format", "legacy",
                  "--tp", "2", "--width-factor", "2")
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "parallel residual" in lines[0]
    assert not (tmp_path / "x").exists()


TORCH_DIST_CASES = [  # (tiny model, growth flags, processes writing, layouts to load at: (processes, flags))
    ("llama-gqa2", ["--width-factor", "2", "--method", "noisy"], 1,
     [(1, []), (4, ["--tp", "4"]), (4, ["--tp", "2", "--pp", "2"])]),
    ("gpt2-tied", ["--width-factor", "2", "--insert-layers", "every:1", "--method", "noisy-diagonal"], 4,
     [(4, ["--pp", "4"]), (4, ["--tp", "2", "--pp", "2", "--vpp", "2"])]),
]


@pytest.mark.parametrize("case,growth,writers,loads", TORCH_DIST_CASES,
                         ids=[f"{c[0]}-{c[2]}-writer" for c in TORCH_DIST_CASES])
def test_torch_dist_reshards_on_load(tiny_model_dirs, tmp_path, case, growth, writers, loads):
    """Written at TP2 x PP2 (by one process playing each rank in turn, or by one process per rank),
    loaded at other layouts by megatron's dist_checkpointing."""
    src, out = tiny_model_dirs[case], tmp_path / "ckpt"
    flags = ["convert", str(src), "--out", str(out), "--format", "torch_dist", "--tp", "2", "--pp", "2",
             "--no-progress", *growth]
    convert = torchrun(writers, *flags) if writers > 1 else single(*flags)
    assert convert.returncode == 0, convert.stderr[-3000:]
    assert (out / "iter_0000000" / "metadata.json").is_file()
    assert len(list((out / "iter_0000000").glob("__*_*.distcp"))) >= 4  # every rank wrote its own files
    for nproc, layout in loads:
        verify = torchrun(nproc, "verify", str(src), str(out), *layout)
        line = _verify_line(verify)
        assert verify.returncode == 0 and line.endswith("OK"), (layout, line)
        assert float(line.split("max rel ")[1].split()[0]) <= 1e-5
    assert_export_matches_direct_hf(src, out, growth, tmp_path)
    small = tmp_path / "again.pt"  # a trained checkpoint can be the next run's --clone-from source
    assert single("export", str(out), "--out", str(small), "--format", "small.pt").returncode == 0
    again = single("verify", str(src), str(small))
    assert again.returncode == 0 and _verify_line(again).endswith("OK")


def test_torch_dist_from_too_few_processes_is_refused(tiny_model_dirs, tmp_path):
    proc = torchrun(3, "convert", str(tiny_model_dirs["llama-gqa2"]), "--out", str(tmp_path / "x"), "--format",
                    "torch_dist", "--tp", "2", "--pp", "2", "--width-factor", "2")
    errors = [line for line in proc.stderr.splitlines() if "hyperclone convert: error" in line]
    assert proc.returncode != 0 and errors and "torchrun --nproc_per_node 4" in errors[0], proc.stderr[-2000:]
    assert not (tmp_path / "x").exists()


def test_torch_dist_from_one_process_equals_one_process_per_rank(tiny_model_dirs, tmp_path):
    """The single process (every rank in turn, a writer thread) saves every chunk with the same bytes as four
    torchrun processes (one rank each); both take the digests while writing, and the single process's
    manifest equals one computed afterwards by reading every file back."""
    import json

    from hyperclone_dist.checkpoint.manifest import MANIFEST, file_entries, list_files

    src = tiny_model_dirs["llama-gqa2"]
    flags = ["--format", "torch_dist", "--tp", "2", "--pp", "2", "--width-factor", "2", "--method", "noisy",
             "--no-progress"]
    one, four = tmp_path / "one", tmp_path / "four"
    assert single("convert", str(src), "--out", str(one), *flags).returncode == 0
    proc = torchrun(4, "convert", str(src), "--out", str(four), *flags)
    assert proc.returncode == 0, proc.stderr[-3000:]

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
    assert single("convert", str(src), "--out", str(tmp_path / "bare"), "--no-checksums", *flags).returncode == 0
    assert not (tmp_path / "bare" / MANIFEST).exists()
