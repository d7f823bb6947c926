"""``hyperclone`` on good input: convert writes a loadable sharded checkpoint, verify measures function
preservation and says so in its exit status, inspect describes a checkpoint, quickstart runs offline.

The commands whose exit status is the point run as real processes; the slower verify variants call
``main()`` in this process to avoid a second torch and transformers import each.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from hyperclone_dist.builtin import BUILTIN, random_state_dict
from hyperclone_dist.checkpoint import small_pt
from hyperclone_dist.cli.main import main
from hyperclone_dist.convert import convert
from hyperclone_dist.growth.spec import GrowthSpec
from hyperclone_dist.params import parameter_count

SHARD_GIB = 0.00002  # ~21 KiB: the grown tiny Llama (~77 KiB in float32) needs several shards
VERIFY_LINE = re.compile(r"max abs logit diff (\S+)\s+max rel (\S+)\s+\(tol (\S+),.*\)\s+(OK|FAIL)$")


def hyperclone(*args: str | Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "hyperclone_dist.cli.main", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def verify_numbers(stdout: str) -> tuple[float, float, str]:
    found = VERIFY_LINE.search(stdout.strip())
    assert found, stdout
    return float(found.group(1)), float(found.group(2)), found.group(4)


def transformers_quiet():
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    transformers = transformers_quiet()
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                      max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # norm gains away from 1, so that a dropped or misplaced gain changes the logits
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("small") / "llama"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def grown(small, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("grown") / "llama-x2"
    proc = hyperclone("convert", small, "--out", out, "--width-factor", "2", "--method", "noisy",
                      "--format", "hf", "--shard-size", str(SHARD_GIB), "--no-progress")
    return proc, out


def logits(model_dir: Path, ids: torch.Tensor, **load) -> torch.Tensor:
    model = transformers_quiet().AutoModelForCausalLM.from_pretrained(model_dir, **load).eval()
    with torch.no_grad():
        return model(ids).logits.float()


def test_convert_writes_sharded_hf_checkpoint(grown):
    proc, out = grown
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout and "hidden 16->32" in proc.stdout
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3
    assert all(re.fullmatch(rf"model-\d{{5}}-of-{len(shards):05d}\.safetensors", s.name) for s in shards)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    total = 0
    for shard in shards:
        with safe_open(str(shard), framework="pt") as fh:
            names = list(fh.keys())
            sizes = [fh.get_tensor(n).nbytes for n in names]
        assert all(index["weight_map"][n] == shard.name for n in names)
        assert sum(sizes) <= SHARD_GIB * 2**30 or len(names) == 1
        total += sum(sizes)
    assert index["metadata"]["total_size"] == total
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["hidden_size"], config["intermediate_size"]) == ("llama", 32, 48)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (8, 4)


def test_grown_checkpoint_loads_in_transformers_and_keeps_the_function(small, grown):
    _, out = grown
    model = transformers_quiet().AutoModelForCausalLM.from_pretrained(out)
    assert model.config.hidden_size == 32
    assert model.model.layers[0].mlp.up_proj.weight.shape == (48, 32)
    ids = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(0))
    reference, other = logits(small, ids), logits(out, ids)
    assert (reference - other).abs().max() <= 1e-5 * reference.abs().max()


def test_verify_passes_for_hypercloned_model(small, grown):
    proc = hyperclone("verify", small, grown[1])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    max_abs, max_rel, verdict = verify_numbers(proc.stdout)
    assert verdict == "OK" and max_rel <= 1e-5
    assert 0 <= max_abs <= max_rel * 1e3  # logits of this model stay well below 1e3 in magnitude


@pytest.mark.parametrize("spec", [GrowthSpec(width_factor=2, method="warmstart"), GrowthSpec(stack=2)],
                         ids=["warmstart", "stack2"])
def test_verify_fails_for_growth_that_changes_the_function(small, tmp_path, capsys, spec):
    convert(small, tmp_path / "grown", spec, progress=False)
    assert main(["verify", str(small), str(tmp_path / "grown")]) == 1
    max_abs, max_rel, verdict = verify_numbers(capsys.readouterr().out)
    assert verdict == "FAIL" and max_rel > 1e-3 and max_abs > 0


def test_inspect_hf_directory(small):
    proc = hyperclone("inspect", small)
    assert proc.returncode == 0, proc.stderr
    expected = transformers_quiet().AutoModelForCausalLM.from_pretrained(small).num_parameters()
    assert re.search(r"^family\s+llama$", proc.stdout, re.M)
    assert re.search(rf"^parameters\s+{expected:,} \(.*float32\)$", proc.stdout, re.M), proc.stdout
    assert "hidden 16" in proc.stdout and "layers 2" in proc.stdout


def test_inspect_small_pt(tmp_path):
    state = {name: t.to(torch.bfloat16) for name, t in random_state_dict(BUILTIN, seed=3).items()}
    path = small_pt.save(tmp_path / "small.pt", BUILTIN, state)
    proc = hyperclone("inspect", path, "--tensors")
    assert proc.returncode == 0, proc.stderr
    assert "(small.pt)" in proc.stdout
    assert re.search(r"^family\s+llama$", proc.stdout, re.M)
    count = sum(t.numel() for t in state.values())
    assert count == parameter_count(BUILTIN)
    assert re.search(rf"^parameters\s+{count:,} \(.*bfloat16\)$", proc.stdout, re.M), proc.stdout
    assert re.search(r"^\s+embed\.weight\s+\[512, 64\]$", proc.stdout, re.M)


def test_bfloat16_output_loads_and_verifies_loosely(small, tmp_path, capsys):
    out = tmp_path / "bf16"
    proc = hyperclone("convert", small, "--out", out, "--width-factor", "2", "--method", "noisy",
                      "--dtype", "bfloat16", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model = transformers_quiet().AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert model.dtype == torch.bfloat16 and model.config.hidden_size == 32

    proc = hyperclone("verify", small, out, "--tol", "2e-2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _, max_rel, verdict = verify_numbers(proc.stdout)
    assert verdict == "OK" and 0 < max_rel <= 2e-2  # rounding to bfloat16 shows, within the loose bound
    # at the float32 default tolerance the same checkpoint fails: --tol is what let it pass
    assert main(["verify", str(small), str(out)]) == 1
    assert verify_numbers(capsys.readouterr().out)[2] == "FAIL"


def test_a_bf16_source_grows_exactly(small, tmp_path):
    """A bf16 source, as real checkpoints ship: the output keeps its dtype unless --dtype says otherwise;
    a symmetric clone is exact in bf16 (its divisions are by powers of two), and a noisy one written in
    float32 is rounded nowhere (each element computed in float32 from the bf16 weights, then written)."""
    from hyperclone_dist.verify import compare_checkpoints

    source = tmp_path / "bf16-source"
    transformers_quiet().AutoModelForCausalLM.from_pretrained(small).to(torch.bfloat16).save_pretrained(source)
    assert main(["convert", str(source), "--out", str(tmp_path / "sym"), "--width-factor", "2", "--no-progress"]) == 0
    assert json.loads((tmp_path / "sym" / "config.json").read_text())["dtype"] == "bfloat16"
    weights = {}
    for file in (tmp_path / "sym").glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            weights.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 - a handle, not a dict
    with safe_open(source / "model.safetensors", "pt") as f:
        q = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
    assert weights["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    assert torch.equal(weights["model.layers.0.self_attn.q_proj.weight"], q.repeat(2, 2) / 2)  # exact in bf16
    assert compare_checkpoints(source, tmp_path / "sym").max_rel <= 1e-5
    assert main(["convert", str(source), "--out", str(tmp_path / "noisy"), "--width-factor", "2", "--method",
                 "noisy", "--dtype", "float32", "--no-progress"]) == 0
    diff = compare_checkpoints(source, tmp_path / "noisy")
    print(f"\nbf16 source, noisy clone in float32: max rel {diff.max_rel:.2e}")
    assert diff.max_rel <= 1e-5  # rounding the noisy blocks to bf16 first gave ~1e-3 on a real model


def test_quickstart_runs_offline_and_passes(tmp_path):
    script = Path(sys.executable).with_name("hyperclone")  # the installed console script
    assert script.is_file()
    proc = subprocess.run([str(script), "quickstart", "--out", str(tmp_path / "qs")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.rstrip().endswith(("OK", "FAIL"))]
    assert len(rows) == 6 and all(row.rstrip().endswith("OK") for row in rows), proc.stdout
    assert (tmp_path / "qs" / "small.pt").is_file()
    grown_dirs = [p for p in (tmp_path / "qs" / "grown").iterdir() if p.is_dir()]
    assert len(grown_dirs) == 6
    assert all((d / "model.safetensors.index.json").is_file() for d in grown_dirs)
