"""Checksum manifests: every checkpoint hyperclone writes carries ``hyperclone-manifest.json``, and
``hyperclone inspect --check`` finds a flipped byte and names the tensor it lies in.

The damaged byte is located here without the manifest's own ranges: the tensor is read through its
format's loader (safetensors, torch.load, DCP's metadata) and its bytes are searched for in the file.

    .venv/bin/python -m pytest tests/test_manifest.py -x -q
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import xxhash

from hyperclone_dist.checkpoint.digests import hash_file
from hyperclone_dist.checkpoint.manifest import MANIFEST, tensor_ranges
from hyperclone_dist.cli.main import main

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
OK_LINE = re.compile(r"OK: (\d+) files, (\d+) tensors, ([\d.]+) MiB verified")
FORMATS = {"hf": ["--shard-size", "0.0002"],  # ~210 KiB shards: several files
           "legacy": ["--format", "legacy", "--tp", "2", "--pp", "2"],
           "torch_dist": ["--format", "torch_dist", "--tp", "2", "--pp", "2"]}  # one process writes every rank


@pytest.fixture(scope="module")
def small(builtin_small_pt: Path) -> Path:
    return builtin_small_pt


@pytest.fixture(scope="module")
def converted(small, tmp_path_factory) -> dict[str, Path]:
    """The built-in model grown x2 in each output format (in this process: one torch import)."""
    root = tmp_path_factory.mktemp("converted")
    for fmt, flags in FORMATS.items():
        assert main(["convert", str(small), "--out", str(root / fmt), "--width-factor", "2", "--method", "noisy",
                     "--no-progress", *flags]) == 0
    return {fmt: root / fmt for fmt in FORMATS}


def copy_of(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / src.name))


def check(path: Path, capsys) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main(["inspect", "--check", str(path)])
    return code, capsys.readouterr().out.splitlines()


def flip_inside(file: Path, data: bytes) -> None:
    """Flip one byte in the middle of the one place ``data`` (a tensor's bytes) occurs in ``file``."""
    raw = bytearray(file.read_bytes())
    at = raw.find(data)
    assert at >= 0 and raw.find(data, at + 1) < 0, "the tensor's bytes are not found exactly once"
    raw[at + len(data) // 2] ^= 0xFF
    file.write_bytes(raw)


def tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()


def assert_names_only(lines: list[str], file: str, tensor: str) -> None:
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{file}: tensor {tensor} (bytes "), lines
    assert lines[0].endswith("does not match its checksum"), lines


# ---- what a manifest holds ----------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_converted_checkpoint_passes_check(converted, fmt, capsys):
    out = converted[fmt]
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = json.loads((out / MANIFEST).read_text())
    assert (manifest["format"], manifest["version"], manifest["algorithm"]) == ("hyperclone-manifest", 2, "xxh3-128")
    assert sorted(manifest["files"]) == sorted(p.relative_to(out).as_posix() for p in files)
    for p in files:
        entry = manifest["files"][p.relative_to(out).as_posix()]
        data, tensors = p.read_bytes(), entry.get("tensors", [])
        assert entry["size"] == len(data)
        for t in tensors:  # each tensor's digest is of its bytes alone
            assert t["hash"] == xxhash.xxh3_128(data[t["offset"]:t["offset"] + t["length"]]).hexdigest()
        if not tensors:  # a file that is one segment: its digest is xxh128sum's
            assert entry["hash"] == xxhash.xxh3_128(data).hexdigest()
        assert entry["hash"] == hash_file(p, [(t["offset"], t["length"]) for t in tensors])[1]
    code, lines = check(out, capsys)
    assert code == 0 and len(lines) == 1, lines
    found = OK_LINE.fullmatch(lines[0])
    assert found and int(found.group(1)) == len(files) and int(found.group(2)) > 0, lines
    assert float(found.group(3)) == pytest.approx(sum(p.stat().st_size for p in files) / 2**20, abs=0.06)


def test_no_manifest_is_a_one_line_error(small, tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    proc = subprocess.run([sys.executable, "-m", "hyperclone_dist.cli.main", "inspect", "--check", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, env=ENV, check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and proc.stdout == "", proc.stderr
    assert str(tmp_path) in lines[0] and MANIFEST in lines[0]
    assert main(["inspect", "--check", str(small)]) == 2  # a single file: nothing to check it against
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and str(small) in err[0] and MANIFEST in err[0], err


def test_manifest_pointing_outside_is_refused(converted, tmp_path, capsys):
    out = copy_of(converted["hf"], tmp_path)
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["files"]["../small/small.pt"] = {"size": 1, "hash": "0" * 64}
    (out / MANIFEST).write_text(json.dumps(manifest))
    assert main(["inspect", "--check", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "malformed entry for '../small/small.pt'" in err[0], err


# ---- a flipped byte is reported with its tensor's name -----------------------------------------
def test_flipped_byte_in_safetensors_shard(converted, tmp_path, capsys):
    from safetensors import safe_open

    out = copy_of(converted["hf"], tmp_path)
    name = "model.layers.2.mlp.down_proj.weight"
    shard = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"][name]
    with safe_open(out / shard, framework="pt") as f:
        data = tensor_bytes(f.get_tensor(name))
    flip_inside(out / shard, data)
    code, lines = check(out, capsys)
    assert code == 1
    assert_names_only(lines, shard, name)


def flip_largest_tensor(rank_file: Path) -> str:
    """Flip a byte inside the largest tensor of a legacy rank file; returns that tensor's name."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        model = torch.load(rank_file, weights_only=True)["model"]
    key = max(model, key=lambda k: model[k].numel() if isinstance(model[k], torch.Tensor) else 0)
    flip_inside(rank_file, tensor_bytes(model[key]))
    return key


def test_flipped_byte_in_legacy_rank_file(converted, tmp_path, capsys):
    out = copy_of(converted["legacy"], tmp_path)
    rel = "iter_0000000/mp_rank_01_001/model_optim_rng.pt"
    key = flip_largest_tensor(out / rel)
    code, lines = check(out, capsys)
    assert code == 1
    assert_names_only(lines, rel, f"model.{key}")


def test_flipped_byte_in_torch_dist_file(converted, tmp_path, capsys):
    from torch.distributed.checkpoint import FileSystemReader

    out = copy_of(converted["torch_dist"], tmp_path)
    it_dir = out / "iter_0000000"
    metadata = FileSystemReader(str(it_dir)).read_metadata()
    index, info = next((i, s) for i, s in metadata.storage_data.items()
                       if i.fqn == "decoder.layers.mlp.linear_fc1.weight" and s.relative_path == "__1_0.distcp")
    raw = bytearray((it_dir / info.relative_path).read_bytes())
    raw[info.offset + info.length // 2] ^= 0xFF
    (it_dir / info.relative_path).write_bytes(raw)
    chunk = next(c for c in metadata.state_dict_metadata[index.fqn].chunks if c.offsets == index.offset)
    region = ", ".join(f"{o}:{o + n}" for o, n in zip(chunk.offsets, chunk.sizes))  # which layer, which half
    code, lines = check(out, capsys)
    assert code == 1
    assert_names_only(lines, "iter_0000000/__1_0.distcp", f"{index.fqn}[{region}]")
    assert f"(bytes {info.offset}-{info.offset + info.length - 1})" in lines[0]


# ---- version-1 manifests (SHA-256 of every file and tensor) -------------------------------------
def as_version_1(out: Path) -> None:
    """Rewrite ``out``'s manifest as an earlier hyperclone wrote it: SHA-256 digests, version 1."""
    manifest = json.loads((out / MANIFEST).read_text())
    for rel, entry in manifest["files"].items():
        data = (out / rel).read_bytes()
        entry["hash"] = hashlib.sha256(data).hexdigest()
        for t in entry.get("tensors", []):
            t["hash"] = hashlib.sha256(data[t["offset"]:t["offset"] + t["length"]]).hexdigest()
    manifest.update(version=1, algorithm="sha256")
    (out / MANIFEST).write_text(json.dumps(manifest))


def test_version_1_manifest_still_verifies_and_names_the_tensor(converted, tmp_path, capsys):
    out = copy_of(converted["legacy"], tmp_path)
    as_version_1(out)
    code, lines = check(out, capsys)
    assert code == 0 and len(lines) == 1 and OK_LINE.fullmatch(lines[0]), lines
    rel = "iter_0000000/mp_rank_00_000/model_optim_rng.pt"
    key = flip_largest_tensor(out / rel)
    code, lines = check(out, capsys)
    assert code == 1
    assert_names_only(lines, rel, f"model.{key}")


def test_damage_outside_the_tensors_is_reported_as_such(converted, tmp_path, capsys):
    """Version 2 derives a file's digest from its tensors' and the bytes between them: a changed byte in a
    header fails the file without blaming a tensor."""
    out = copy_of(converted["hf"], tmp_path)
    shard = sorted(out.glob("*.safetensors"))[0]
    raw = bytearray(shard.read_bytes())
    at = raw.index(b'"dtype"')
    raw[at + 1] = ord("D")  # inside the JSON header: no tensor's bytes
    shard.write_bytes(raw)
    code, lines = check(out, capsys)
    assert code == 1 and lines == [f"{shard.name}: bytes outside its tensors (header, index) do not match the "
                                   "checksum"], lines


# ---- missing, truncated and extra files ---------------------------------------------------------
def test_truncated_missing_and_extra_files(converted, tmp_path, capsys):
    out = copy_of(converted["torch_dist"], tmp_path)
    shard = out / "iter_0000000" / "__2_0.distcp"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    (out / "iter_0000000" / ".metadata").unlink()
    (out / "notes.txt").write_text("not part of the checkpoint")
    code, lines = check(out, capsys)
    assert code == 1
    assert sorted(lines) == sorted([
        f"iter_0000000/__2_0.distcp: {size // 2} bytes, the manifest says {size} (truncated)",
        "iter_0000000/.metadata: missing",
        "warning: notes.txt: not in the manifest"]), lines


def test_extra_file_alone_is_a_warning(converted, tmp_path, capsys):
    out = copy_of(converted["hf"], tmp_path)
    (out / "README.md").write_text("notes")
    code, lines = check(out, capsys)
    assert code == 0 and lines[0] == "warning: README.md: not in the manifest" and OK_LINE.fullmatch(lines[1])


def test_tensors_are_located_in_torch_saves_older_format(tmp_path):
    """DeepSpeed with ``checkpoint_serialization: false`` writes torch.save's pre-zip format: the manifest
    still finds each tensor's bytes in it."""
    tensors = {"a": torch.arange(12, dtype=torch.float32).reshape(3, 4),
               "b": {"c": torch.randn(5, dtype=torch.float64)}}
    path = tmp_path / "old.pt"
    torch.save(tensors, path, _use_new_zipfile_serialization=False)
    raw = path.read_bytes()
    found = {name: raw[offset:offset + length] for name, offset, length in tensor_ranges(path, {})}
    assert found == {"a": tensors["a"].numpy().tobytes(), "b.c": tensors["b"]["c"].numpy().tobytes()}


# ---- training checkpoints -----------------------------------------------------------------------
@pytest.mark.slow
def test_training_checkpoint_has_a_manifest(small, tmp_path, capsys):
    """pretrain.py --save: both step directories carry a manifest; checking SAVE checks the latest one,
    and a flipped byte in DeepSpeed's model file is named."""
    from hyperclone_dist.train.checkpointing import _deepspeed_safe_globals

    save = tmp_path / "ckpt"
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "pretrain.py"), "--clone-from", str(small), "--width-factor", "2",
         "--method", "noisy", "--train-iters", "2", "--global-batch-size", "4", "--micro-batch-size", "2",
         "--seq-length", "32", "--eval-iters", "1", "--save", str(save), "--data-cache-path", str(tmp_path / "cache"),
         "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=300, env=ENV, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for step_dir in ("global_step2", "iter_0000002"):
        assert (save / step_dir / MANIFEST).is_file()
    code, lines = check(save, capsys)
    assert code == 0 and len(lines) == 1 and OK_LINE.fullmatch(lines[0]), lines

    rel = "global_step2/mp_rank_00_model_states.pt"
    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        module = torch.load(save / rel, weights_only=True)["module"]
    key = "chunks.0.decoder.layers.1.mlp.linear_fc1.weight"
    flip_inside(save / rel, tensor_bytes(module[key]))
    code, lines = check(save, capsys)
    assert code == 1
    assert_names_only(lines, rel, f"module.{key}")
