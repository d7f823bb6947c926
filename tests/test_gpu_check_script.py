"""benchmarks/gpu/check.sh without a GPU: its dry run checks every command the GPU run would start (pretrain.py's
through pretrain.py's own --dry-run), the carried wheels when they are there, and the carry size; bad input is
one line; the parts that only run on a GPU machine (the stage runner, the wheel install plan, the report
section) are checked here on made-up inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GPU = REPO / "benchmarks" / "gpu"
sys.path.insert(0, str(GPU))

import check  # noqa: E402
import report  # noqa: E402
import stages  # noqa: E402
import wheels  # noqa: E402

ENV = {**os.environ, "PYTHON": sys.executable, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
TINY = ["--width-factor", "2", "--method", "noisy", "--seq-length", "64", "--micro-batch-size", "2",
        "--global-batch-size", "4", "--train-iters", "3", "--lr", "1e-3", "--no-progress"]  # float32, CPU-sized


def check_sh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(GPU / "check.sh"), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=ENV)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The dry run and the two GPU helpers on the CPU (--device cpu: the same code), started together: each is
    mostly imports, so side by side they take about as long as the slowest."""
    from hyperclone_dist.builtin import BUILTIN, random_state_dict
    from hyperclone_dist.checkpoint import small_pt

    tmp = tmp_path_factory.mktemp("gpu-check")
    small = small_pt.save(tmp / "small.pt", BUILTIN, random_state_dict(BUILTIN, seed=0))
    commands = {
        "dry": ["bash", str(GPU / "check.sh"), "--dry-run"],
        "grow": [sys.executable, str(GPU / "grow_verify.py"), "--device", "cpu", "--out", str(tmp / "grow.json"),
                 "--work", str(tmp / "grow")],
        "bare": [sys.executable, str(GPU / "bare_loop.py"), "--device", "cpu", "--steps", "3", "--warmup", "1",
                 "--out", str(tmp / "bare.json"), "--", "--clone-from", str(small), *TINY],
    }
    procs = {name: subprocess.Popen(cmd, cwd=REPO, env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, cmd in commands.items()}
    out = {name: proc.communicate(timeout=300) for name, proc in procs.items()}
    return {name: (procs[name].returncode, *out[name]) for name in procs} | {"tmp": tmp}


def test_dry_run_checks_every_stage(runs):
    status, out, err = runs["dry"]
    assert status == 0, out[-3000:] + err[-2000:]
    assert "dry run: OK" in out and "PROBLEM" not in out
    for key in ("env", "inputs", "a", "c", "e"):
        assert f"  ok: {key}: " in out, key
    fits = [line for line in out.splitlines() if "pretrain.py --dry-run" in line and line.endswith(": fits")]
    assert {line.split(":")[1].strip() for line in fits} == {"b", "d", "e small arm", "e large arms"}
    assert "ok: c: trains the model and data of (b)'s pretrain.py flags" in out
    assert "llama hidden 2048, 22 layers" in out  # (d) is the ~1B model
    assert "of 64" in out  # what travels, against the carry limit
    # CI's fresh clone has no wheel folder: the list is checked against this interpreter instead
    assert ("every carried wheel is there and installs on the target" in out
            or "checked the list against this interpreter only" in out)


def test_grow_verify_on_the_cpu(runs):
    status, out, err = runs["grow"]
    assert status == 0, out[-3000:] + err[-3000:]
    result = json.loads((runs["tmp"] / "grow.json").read_text())
    assert set(result["methods"]) == {"symmetric", "noisy"}
    for row in result["methods"].values():
        assert row["hidden"] == 128 and row["float32"] <= 1e-5 and 0 < row["bf16_vs_small_float32"] < 0.1
    assert result["grow_model_on_device"]["ok"]


def test_bare_loop_on_the_cpu_starts_at_the_small_models_loss(runs):
    """Without --bf16 the grown GPTModel's loss on the trainer's first batch is the small model's, and the loop
    trains from there: what (b)'s first-loss check and (c)'s ratio rest on."""
    status, out, err = runs["bare"]
    assert status == 0, out[-3000:] + err[-3000:]
    result = json.loads((runs["tmp"] / "bare.json").read_text())
    first = result["first_batch"]
    assert first["grown_dtype"] == "float32"
    assert abs(first["grown"] - first["small_float32"]) <= 1e-5 * first["small_float32"]
    assert abs(result["losses"][0] - first["small_float32"]) <= 1e-5 * first["small_float32"]
    assert len(result["losses"]) == 3 and result["tokens_per_s"] > 0 and result["peak_memory_gib"] is None


@pytest.mark.parametrize("args, message", [
    (["--budget-s", "-5"], "argument --budget-s: invalid positive value: '-5'"),
    (["--steps", "3"], "--steps 3: at least 10"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
])
def test_bad_input_is_one_line(args, message):
    proc = check_sh(*args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("check.sh: error:"), proc.stderr
    assert message in lines[0]


def test_a_stage_past_its_limit_is_stopped_and_reported(tmp_path):
    stage = stages.Stage("x", "sleeps", (sys.executable, "-c", "import time; print('started', flush=True); "
                                         "time.sleep(60)"), 1, 0, "helper")
    started = time.time()
    record = check.run_stage(stage, {}, tmp_path / "x.log", 1.0, lambda line="": None)
    assert record["status"] == "timed out" and time.time() - started < 15
    assert "started" in (tmp_path / "x.log").read_text()


def fake_wheel(folder: Path, name: str, version: str, requires: list[str]) -> Path:
    path = folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    meta = "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{name.replace('-', '_')}-{version}.dist-info/METADATA",
                    f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n{meta}")
    return path


def test_install_plan_adds_only_what_the_interpreter_lacks(tmp_path):
    from packaging.requirements import Requirement
    from packaging.version import Version

    fake_wheel(tmp_path, "alpha", "1.0", ["beta>=2", "torch>=2", "gamma; python_version < '3'"])
    fake_wheel(tmp_path, "beta", "2.1", [])
    found = wheels.scan(tmp_path)
    markers = wheels.target_markers("3.12")
    have = {"torch": Version("2.11"), "beta": Version("1.5")}.get
    assert wheels.plan(found, have, [Requirement("alpha")], markers) == ["alpha", "beta"]  # beta too old
    assert wheels.plan(found, {"alpha": Version("1.0"), **{"torch": Version("2.11")}}.get,
                       [Requirement("alpha>=1")], markers) == []
    with pytest.raises(wheels.WheelError, match="torch>=2 is needed but the interpreter has no torch"):
        wheels.plan(found, lambda name: None, [Requirement("alpha")], markers)
    fake_wheel(tmp_path, "beta", "2.2", [])
    with pytest.raises(wheels.WheelError, match="two wheels of beta"):
        wheels.scan(tmp_path)


def write_results(work: Path) -> None:
    """Made-up stage outputs in the shapes the GPU stages write them (inputs to the report, not results)."""
    (work / "results").mkdir(parents=True)
    ok = {"status": "ok", "seconds": 10.0, "started": 1000.0, "title": "t", "log": "l"}
    stage_records = {k: dict(ok) for k in ("env", "inputs", "a", "b", "c", "d")}
    stage_records["e"] = {"status": "failed", "seconds": 5.0, "error": "RuntimeError: boom", "log": "e.log"}
    (work / "results" / "stages.json").write_text(json.dumps(stage_records))
    grow = {"windows": "2 x 128 tokens at positions 0-127", "small_bf16_vs_float32": 3e-3, "tolerance": 1e-5,
            "methods": {"noisy": {"hidden": 128, "float32": 2e-6, "bf16_vs_small_float32": 4e-3,
                                  "bf16_vs_small_bf16": 2e-3}},
            "grow_model_on_device": {"ok": False, "error": "RuntimeError: devices differ"}}
    (work / "results" / "grow.json").write_text(json.dumps(grow))
    bare = {"first_batch": {"small_float32": 10.0, "small_bf16": 10.01, "grown": 10.02, "grown_dtype": "bfloat16"},
            "steps": 50,
            "warmup": 10, "tokens_per_s": 1000.0, "mfu": 0.3, "peak_memory_gib": 20.0, "losses": [10.0, 6.0]}
    (work / "results" / "bare.json").write_text(json.dumps(bare))
    for stage, n, rate, mfu in (("b", 50, 950.0, 0.28), ("d", 12, 500.0, 0.35)):
        (work / stage).mkdir()
        lines = [{"step": 0, "time": 1001.0, "valid/loss": 10.0}]
        lines += [{"step": s, "time": 1010.0 + s, "train/loss": 10.0 - (s - 1) / 10, "perf/tokens_per_s": rate,
                   "perf/mfu": mfu, "perf/step_seconds": 1.0} for s in range(1, n + 1)]
        lines.append({"step": n, "time": 1100.0, "valid/loss": 6.5})
        (work / stage / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_report_writes_the_gpu_section_and_keeps_the_rest(tmp_path):
    work, doc = tmp_path / "work", tmp_path / "benchmarks.md"
    write_results(work)
    doc.write_text("# Benchmarks\n\n## CPU figures\n\nkept as they are\n")
    for _ in range(2):  # a second run replaces the section instead of adding one
        assert report.main(["--workdir", str(work), "--doc", str(doc), "--wall-s", "400"]) == 1  # (e) failed
    text = doc.read_text()
    assert text.count(report.SECTION) == 1 and "## CPU figures\n\nkept as they are" in text
    verdicts = ("MET", "NOT met", "NOT met (goal)", "not measured", "reported")
    rows = {line.strip().split("  ")[0]: line for line in text.splitlines() if line.endswith(verdicts)}
    assert rows["float32 logit error <= 1e-05 relative"].endswith("MET")
    assert rows["pretrain.py / bare loop tokens/s >= 0.9"].split()[-2:] == ["0.950", "MET"]
    assert rows["first loss = the small model's (bf16, 1e-02)"].split()[-2:] == ["0.0e+00", "MET"]
    assert rows["MFU of the ~1B model >= 40% (goal)"].endswith("NOT met (goal)")
    assert rows["bf16 logit error"].split()[-2:] == ["4.0e-03", "reported"]
    assert rows["loss falls (train and valid)"].endswith("MET")
    assert "FAILED after 5 s: RuntimeError: boom" in text and "FAILED: RuntimeError: devices differ" in text


def test_driver_runs_stages_in_order_skips_what_cannot_run_and_copies_the_results(tmp_path, monkeypatch):
    """check.py's GPU path with stand-in stages (each a one-line Python command): a failed stage does not stop
    the next, a stage whose inputs failed is skipped, so is one the budget leaves no time for; the report is
    written into the doc and a flat handful of files is copied out."""
    work, doc, out = tmp_path / "work", tmp_path / "benchmarks.md", tmp_path / "out"
    env_json = json.dumps({"gpu": "stand-in GPU", "gpus": 1, "packages": {}})

    def stand_in(key, code, needs=(), min_s=0):
        return stages.Stage(key, f"stand-in {key}", (sys.executable, "-c", code), 30, min_s, "helper", needs)

    def setup(py, w, cache, site):
        write = f"import pathlib; p = pathlib.Path({str(w / 'results')!r}); p.mkdir(exist_ok=True); "
        return [stand_in("env", write + f"(p / 'env.json').write_text({env_json!r})"),
                stand_in("inputs", "raise SystemExit('inputs: error: no corpus')")]

    def measured(py, w, corpus, steps):
        return [stand_in("a", "print('ran')"), stand_in("b", "print('never')", needs=("inputs",)),
                stand_in("e", "print('never')", min_s=10**6)]

    monkeypatch.setattr(check.stage_defs, "setup", setup)
    monkeypatch.setattr(check.stage_defs, "measured", measured)
    status = check.main(["--workdir", str(work), "--doc", str(doc), "--copy-to", str(out), "--wheels",
                         str(tmp_path / "no-wheels")])
    assert status == 1
    records = json.loads((work / "results" / "stages.json").read_text())
    assert [records[k]["status"] for k in ("env", "inputs", "a", "b", "e")] == ["ok", "failed", "ok", "skipped",
                                                                                "skipped"]
    assert records["inputs"]["error"] == "inputs: error: no corpus"
    assert "needs stage inputs" in records["b"]["error"] and "of the budget left" in records["e"]["error"]
    assert report.SECTION in doc.read_text() and "stand-in GPU" in doc.read_text()
    assert sorted(p.name for p in out.iterdir()) == ["benchmarks.md", "check.log", "logs.tar.gz", "results.json"]
