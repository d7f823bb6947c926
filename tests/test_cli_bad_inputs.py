"""Bad input to ``hyperclone``: one line on stderr naming the problem, a non-zero exit, nothing written,
and the source left exactly as it was.

Each case of the contract runs the real command in a fresh process; its further variants call ``main()``
in this process, which yields the same exit status and stderr without paying the torch import again.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from warm import hyperclone_in_process

from hyperclone_dist.builtin import BUILTIN, random_state_dict
from hyperclone_dist.checkpoint import hf_writer, small_pt
from hyperclone_dist.convert import convert
from hyperclone_dist.errors import HypercloneError
from hyperclone_dist.growth.spec import GrowthSpec

BAD_INPUT = 2  # the CLI's exit status for argparse errors and HypercloneError alike


def hyperclone(*args: str | Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "hyperclone_dist.cli.main", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def assert_one_line_error(proc: subprocess.CompletedProcess, *names: str) -> str:
    """The failure contract: exit 2, no stdout, exactly one non-empty stderr line mentioning ``names``."""
    lines = proc.stderr.splitlines()
    assert proc.returncode == BAD_INPUT, proc.stderr
    assert len(lines) == 1 and lines[0].strip(), f"expected one stderr line, got:\n{proc.stderr}"
    assert "error:" in lines[0]
    for name in names:
        assert name in lines[0], f"{name!r} not named in: {lines[0]}"
    assert proc.stdout == ""
    return lines[0]


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _save_tiny(config, path: Path) -> Path:
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    import transformers

    root = tmp_path_factory.mktemp("models")
    llama = transformers.LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                     max_position_embeddings=32)
    # OPT-350M's layout: embeddings of width 8 projected in and out of a width-16 residual stream
    opt_projected = transformers.OPTConfig(hidden_size=16, ffn_dim=32, num_hidden_layers=2,
                                           num_attention_heads=4, vocab_size=64, max_position_embeddings=32,
                                           word_embed_proj_dim=8)
    return {"llama": _save_tiny(llama, root / "llama"),
            "opt_projected": _save_tiny(opt_projected, root / "opt350")}


def variant(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def edit_config(model_dir: Path, **changes) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    config.update(changes)
    (model_dir / "config.json").write_text(json.dumps(config))


# ---- arguments ----------------------------------------------------------------------------------
def test_non_integer_factor_is_an_argparse_error(models, tmp_path):
    proc = hyperclone("convert", models["llama"], "--out", tmp_path / "out", "--width-factor", "1.5")
    assert_one_line_error(proc, "--width-factor", "1.5")
    assert not (tmp_path / "out").exists()


def test_factor_below_one_is_refused(models, tmp_path):
    proc = hyperclone("convert", models["llama"], "--out", tmp_path / "out", "--width-factor", "0")
    assert_one_line_error(proc, "width-factor", ">= 1", "got 0")
    for flag in ("--ffn-factor", "--stack"):
        proc = hyperclone_in_process("convert", models["llama"], "--out", tmp_path / "out", flag, "0")
        assert_one_line_error(proc, flag.removeprefix("--"), ">= 1", "got 0")
    assert not (tmp_path / "out").exists()


def test_bad_insert_layers_spec_is_refused(models, tmp_path):
    grow = ["convert", models["llama"], "--out", tmp_path / "out", "--width-factor", "2", "--insert-layers"]
    assert_one_line_error(hyperclone(*grow, "foo"), "--insert-layers", "'foo'")
    # the small model has layers 0 and 1: 5 and -2 are out of range
    variants = [("every:0", "'every:0'"), ("5", "position 5"), ("-2", "position -2"), (",", "no position")]
    for spec, named in variants:
        assert_one_line_error(hyperclone_in_process(*grow, spec), "--insert-layers", named)
    assert not (tmp_path / "out").exists()


def test_insert_layers_and_stack_are_exclusive(models, tmp_path):
    proc = hyperclone("convert", models["llama"], "--out", tmp_path / "out", "--insert-layers", "0",
                      "--stack", "2")
    assert_one_line_error(proc, "--stack", "--insert-layers")


# ---- unreadable or unsupported sources ----------------------------------------------------------
def test_unknown_family_is_named(models, tmp_path):
    bert = variant(models["llama"], tmp_path / "model")
    edit_config(bert, model_type="bert")
    assert_one_line_error(hyperclone("convert", bert, "--out", tmp_path / "out"), "'bert'")
    assert not (tmp_path / "out").exists()


def test_missing_path_is_named(tmp_path):
    missing = tmp_path / "no-such-model"
    assert_one_line_error(hyperclone("convert", missing, "--out", tmp_path / "out"), str(missing))


def test_truncated_safetensors_is_refused(models, tmp_path):
    broken = variant(models["llama"], tmp_path / "model")
    weights = broken / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    proc = hyperclone("convert", broken, "--out", tmp_path / "out", "--width-factor", "2")
    assert_one_line_error(proc, "model.safetensors", "corrupt or truncated")
    assert not (tmp_path / "out").exists()


def test_corrupt_config_json_is_refused(models, tmp_path):
    broken = variant(models["llama"], tmp_path / "corrupt")
    (broken / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    assert_one_line_error(hyperclone("convert", broken, "--out", tmp_path / "out"), "config.json")
    for text in ("[16, 24]", "\xff\xfe not json"):
        (broken / "config.json").write_text(text, encoding="latin-1")
        assert_one_line_error(hyperclone_in_process("inspect", broken), "config.json")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("key, value, run", [("hidden_size", 20, hyperclone),
                                             ("intermediate_size", 28, hyperclone_in_process)])
def test_config_weights_mismatch_names_tensor_and_both_shapes(models, tmp_path, key, value, run):
    edited = variant(models["llama"], tmp_path / "edited")
    edit_config(edited, **{key: value})
    line = assert_one_line_error(run("convert", edited, "--out", tmp_path / "out"))
    found = re.search(r"tensor (\S+) has shape \[([\d, ]+)\], the config implies \[([\d, ]+)\]", line)
    assert found, line
    name, have, want = found.group(1), found.group(2), found.group(3)
    with safe_open(str(edited / "model.safetensors"), framework="pt") as weights:
        stored = weights.get_slice(name).get_shape()
    assert [int(x) for x in have.split(",")] == list(stored)
    assert have != want and str(value) in want


def test_opt_with_embedding_projections_is_refused(models, tmp_path):
    proc = hyperclone("convert", models["opt_projected"], "--out", tmp_path / "out", "--width-factor", "2")
    assert_one_line_error(proc, "project_in", "project_out", "word_embed_proj_dim")
    assert not (tmp_path / "out").exists()


# ---- pickles that would run code ----------------------------------------------------------------
class RunsCode:
    """Unpickling this touches ``marker``: proof that the unpickler executed something."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def _assert_payload_is_live(path: Path, marker: Path, legacy: bool) -> None:
    """The refusal means something only if an unguarded load would really have run the payload."""
    if legacy:
        with open(path, "rb") as fh:
            pickle.load(fh)
    else:
        torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("legacy", [False, True], ids=["torch.save", "pickle.dump"])  # zip and legacy format
def test_pytorch_model_bin_with_code_is_not_executed(models, tmp_path, legacy):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil"
    evil.mkdir()
    shutil.copy(models["llama"] / "config.json", evil)
    state = {"model.embed_tokens.weight": RunsCode(marker)}
    if legacy:
        with open(evil / "pytorch_model.bin", "wb") as fh:
            pickle.dump(state, fh)
    else:
        torch.save(state, evil / "pytorch_model.bin")
    proc = hyperclone("convert", evil, "--out", tmp_path / "out", "--width-factor", "2")
    assert_one_line_error(proc, "pytorch_model.bin")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()
    _assert_payload_is_live(evil / "pytorch_model.bin", marker, legacy)


def test_small_pt_with_code_is_not_executed(tmp_path):
    marker = tmp_path / "code-ran"
    payload = small_pt.pack(BUILTIN, random_state_dict(BUILTIN))
    payload["meta"] = {"note": RunsCode(marker)}
    torch.save(payload, tmp_path / "small.pt")
    proc = hyperclone("convert", tmp_path / "small.pt", "--out", tmp_path / "out")
    assert_one_line_error(proc, "small.pt", "nothing in it was executed")
    assert_one_line_error(hyperclone_in_process("inspect", tmp_path / "small.pt"), "small.pt")
    assert_one_line_error(hyperclone_in_process("verify", tmp_path / "small.pt", tmp_path / "small.pt"), "small.pt")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()
    _assert_payload_is_live(tmp_path / "small.pt", marker, legacy=False)


# ---- the output directory -----------------------------------------------------------------------
def test_existing_checkpoint_needs_overwrite(models, tmp_path):
    out = tmp_path / "grown"
    convert(models["llama"], out, GrowthSpec(width_factor=2), progress=False)
    (out / "stale.txt").write_text("from an earlier run")
    before = tree_hashes(out)
    proc = hyperclone("convert", models["llama"], "--out", out, "--width-factor", "2", "--method", "noisy")
    assert_one_line_error(proc, str(out), "--overwrite")
    assert tree_hashes(out) == before

    proc = hyperclone("convert", models["llama"], "--out", out, "--width-factor", "2", "--method", "noisy",
                      "--overwrite", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    after = tree_hashes(out)
    assert "stale.txt" not in after  # the directory was replaced, not merged into
    assert after != before and "model.safetensors.index.json" in after
    assert not list(tmp_path.glob(".grown.*"))


def test_directory_of_other_files_is_refused_even_with_overwrite(models, tmp_path):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "todo.txt").write_text("not a checkpoint")
    proc = hyperclone("convert", models["llama"], "--out", out, "--width-factor", "2", "--overwrite")
    assert_one_line_error(proc, str(out), "not a checkpoint")
    assert tree_hashes(out) == {"todo.txt": hashlib.sha256(b"not a checkpoint").hexdigest()}


def test_out_equal_to_source_is_refused(models, tmp_path, monkeypatch):
    src = variant(models["llama"], tmp_path / "model")
    before = tree_hashes(src)
    proc = hyperclone("convert", src, "--out", src, "--width-factor", "2", "--overwrite")
    assert_one_line_error(proc, str(src), "would replace the source")
    monkeypatch.chdir(tmp_path)
    for spelling in ("model/", "model/../model", "."):  # the source itself, or a directory holding it
        assert_one_line_error(hyperclone_in_process("convert", src, "--out", spelling, "--overwrite"),
                              "would replace the source")
    assert tree_hashes(src) == before


def test_source_is_never_modified(models, tmp_path):
    src = variant(models["llama"], tmp_path / "small")
    before = tree_hashes(src)
    ok = hyperclone("convert", src, "--out", tmp_path / "big", "--width-factor", "2", "--method", "noisy",
                    "--no-progress")
    assert ok.returncode == 0, ok.stderr
    assert tree_hashes(src) == before
    failing = [
        ["--out", tmp_path / "big", "--width-factor", "2"],  # exists, no --overwrite
        ["--out", src, "--overwrite"],
        ["--out", tmp_path / "other", "--insert-layers", "9"],  # past the last layer
    ]
    for args in failing:
        assert hyperclone_in_process("convert", src, *args).returncode == BAD_INPUT
    assert tree_hashes(src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big", "small"]


# ---- failures half-way through the write (in process) --------------------------------------------
def _fail_after_first_tensor(monkeypatch, exc: BaseException, out: Path) -> list[str]:
    """Make the writer raise ``exc`` on its second fused tensor. Returns the files that existed next to
    ``out`` at that moment, so a test can tell that there was a half-written output to clean up."""
    fused: list[str] = []
    seen: list[str] = []
    real_fuse = hf_writer.fuse_hf

    def fuse_then_fail(family, template, parts, cfg):
        if fused:
            seen.extend(str(p.relative_to(out.parent)) for p in out.parent.rglob("*") if p.is_file())
            raise exc
        fused.append(template)
        return real_fuse(family, template, parts, cfg)

    monkeypatch.setattr(hf_writer, "fuse_hf", fuse_then_fail)
    return seen


@pytest.mark.parametrize("exc", [RuntimeError("disk vanished"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_failure_mid_write_leaves_no_output(models, tmp_path, monkeypatch, exc):
    out = tmp_path / "grown"
    seen = _fail_after_first_tensor(monkeypatch, exc, out)
    with pytest.raises(type(exc)):
        convert(models["llama"], out, GrowthSpec(width_factor=2, method="noisy"), shard_bytes=4096,
                progress=False)
    assert any(re.fullmatch(r"\.grown\.partial-\w+/model-00001-of-\d+\.safetensors", f) for f in seen), seen
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no .grown.partial-* sibling either


def test_disk_full_mid_write_is_one_line_and_keeps_the_old_checkpoint(models, tmp_path, monkeypatch):
    out = tmp_path / "grown"
    convert(models["llama"], out, GrowthSpec(width_factor=2), progress=False)
    before = tree_hashes(out)
    _fail_after_first_tensor(monkeypatch, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), out)
    with pytest.raises(HypercloneError, match="no space left") as caught:
        convert(models["llama"], out, GrowthSpec(width_factor=3), overwrite=True, progress=False)
    assert "\n" not in str(caught.value)
    assert tree_hashes(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["grown"]
