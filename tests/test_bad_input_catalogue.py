"""Bad input not covered by the other files (tests/test_cli_bad_inputs.py, test_pretrain_bad_inputs.py,
test_data.py, test_megatron_convert.py, test_crash_safety.py): ``hyperclone convert``, ``verify``,
``export``, ``data`` and ``launch/pretrain.py``. Each case: exit 2, exactly one stderr line naming the
problem (the path, the numbers), no traceback, nothing at the output path and nothing beside it.

The ``hyperclone`` cases run as forked children of one warm process (tests/mp_workers/warm_fork.py): each
a real process with its own exit status and stderr, a file-size limit (RLIMIT_FSIZE, the way ``ulimit -f``
makes writes fail like a full disk) or no root override of directory permissions (CAP_DAC_OVERRIDE
dropped, so that ``chmod 555`` holds when the tests run as root), without a torch import per case. The
``pretrain.py`` cases fail before any process group exists and call its ``main()`` in this process.

    .venv/bin/python -m pytest tests/test_bad_input_catalogue.py -q -rA   # -rA prints every message
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from warm import pretrain_in_process

from hyperclone_dist.checkpoint import lock

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "mp_workers" / "warm_fork.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
TRACEBACK = re.compile(r"Traceback|^\s+File \"", re.MULTILINE)
FSIZE = 40_000  # bytes: above the lock file and the small inputs, below every grown rank file or shard
GROW = ["--width-factor", "2", "--method", "noisy", "--no-progress"]
LAYOUT = ["--tp", "2", "--pp", "2"]

# id: (hyperclone arguments, what the error line must name, options); "{r}" is the inputs directory.
# Options: fsize (bytes), read_only, locked (the test holds the lock of the output), out (a path that must
# not exist afterwards, nor anything beside it named after it).
CASES = {
    # ---- convert
    "convert-int64-weights": (["convert", "{r}/int64", "--out", "{r}/out/c1", *GROW],
                              ["{r}/int64", "dtype I64", "floating-point"], {"out": "{r}/out/c1"}),
    "convert-out-inside-source": (["convert", "{r}/llama", "--out", "{r}/llama/grown", *GROW],
                                  ["{r}/llama/grown", "inside the source", "{r}/llama"], {}),
    "convert-shard-size-0": (["convert", "{r}/llama", "--out", "{r}/out/c3", "--shard-size", "0", *GROW],
                             ["shard size", "0 GiB", "--shard-size"], {"out": "{r}/out/c3"}),
    "convert-no-weights": (["convert", "{r}/noweights", "--out", "{r}/out/c4"],
                           ["{r}/noweights", "holds no weights"], {"out": "{r}/out/c4"}),
    "convert-index-names-missing-shard": (["convert", "{r}/idxmiss", "--out", "{r}/out/c5"],
                                          ["model-00001-of-00002.safetensors", "missing"], {"out": "{r}/out/c5"}),
    "convert-tp-not-dividing-heads": (["convert", "{r}/llama", "--out", "{r}/out/c6", "--format", "legacy",
                                       "--tp", "3", *GROW], ["attention heads (8)", "tp=3"], {"out": "{r}/out/c6"}),
    "convert-pp-not-dividing-layers": (["convert", "{r}/llama", "--out", "{r}/out/c7", "--format", "torch_dist",
                                        "--pp", "3", *GROW], ["layers (2)", "pp x vpp = 3 x 1"],
                                       {"out": "{r}/out/c7"}),
    "convert-vpp-not-dividing-layers": (["convert", "{r}/llama", "--out", "{r}/out/c8", "--format", "legacy",
                                         "--pp", "2", "--vpp", "3", *GROW], ["layers (2)", "2 x 3 = 6"],
                                        {"out": "{r}/out/c8"}),
    "convert-vpp-without-pp": (["convert", "{r}/llama", "--out", "{r}/out/c9", "--format", "legacy", "--vpp", "2",
                                *GROW], ["vpp", "pp >= 2"], {"out": "{r}/out/c9"}),
    "convert-vocab-divisible-by-0": (["convert", "{r}/llama", "--out", "{r}/out/c10", "--format", "legacy",
                                      "--vocab-divisible-by", "0", *GROW], ["--vocab-divisible-by 0"],
                                     {"out": "{r}/out/c10"}),
    "convert-read-only-output-dir": (["convert", "{r}/llama", "--out", "{r}/ro/c11", *GROW],
                                     ["{r}/ro/c11", "Permission denied"], {"read_only": True, "out": "{r}/ro/c11"}),
    "convert-file-size-limit-hf": (["convert", "{r}/llama", "--out", "{r}/out/c12", *GROW],
                                   ["{r}/out/c12", "File too large", "nothing was kept"],
                                   {"fsize": FSIZE, "out": "{r}/out/c12"}),
    "convert-file-size-limit-legacy": (["convert", "{r}/llama", "--out", "{r}/out/c13", "--format", "legacy",
                                        *LAYOUT, *GROW], ["{r}/out/c13", "File too large", "nothing was kept"],
                                       {"fsize": FSIZE, "out": "{r}/out/c13"}),
    "convert-file-size-limit-torch_dist": (["convert", "{r}/llama", "--out", "{r}/out/c14", "--format",
                                            "torch_dist", *LAYOUT, *GROW],
                                           ["{r}/out/c14", "File too large", "nothing was kept"],
                                           {"fsize": FSIZE, "out": "{r}/out/c14"}),
    "convert-output-locked": (["convert", "{r}/llama", "--out", "{r}/out/c15", *GROW],
                              ["output {r}/out/c15 is being written by pid {holder}"],
                              {"locked": "{r}/out/c15", "out": "{r}/out/c15"}),
    # ---- verify
    "verify-grown-missing": (["verify", "{r}/llama", "{r}/nothing-here"],
                             ["no such file or directory", "{r}/nothing-here"], {}),
    "verify-grown-not-a-model": (["verify", "{r}/llama", "{r}/notes"],
                                 ["{r}/notes", "not a Hugging Face model directory"], {}),
    "verify-world-size-mismatch": (["verify", "{r}/llama", "{r}/td", *LAYOUT],  # a launcher with too few ranks
                                   ["world size 2", "tp x pp = 2 x 2 = 4"], {"nproc": 2}),
    "verify-legacy-at-another-layout": (["verify", "{r}/llama", "{r}/legacy", "--tp", "1"],
                                        ["{r}/legacy", "saved at tp=2 pp=2", "only at that layout"], {}),
    "verify-truncated-torch_dist": (["verify", "{r}/llama", "{r}/td-truncated"],
                                    ["{r}/td-truncated/iter_0000000", "corrupt or incomplete"], {}),
    "verify-seq-len-past-context": (["verify", "{r}/llama", "{r}/llama", "--seq-len", "1000"],
                                    ["--seq-len 1000", "1..32"], {}),
    # ---- export
    "export-not-megatron": (["export", "{r}/llama", "--out", "{r}/out/e1", "--no-progress"],
                            ["{r}/llama", "not a megatron checkpoint", "latest_checkpointed_iteration.txt"],
                            {"out": "{r}/out/e1"}),
    "export-truncated-torch_dist": (["export", "{r}/td-truncated", "--out", "{r}/out/e2", "--no-progress"],
                                    ["{r}/td-truncated/iter_0000000", "corrupt or incomplete",
                                     "failed finding central directory"], {"out": "{r}/out/e2"}),
    "export-torch_dist-without-metadata": (["export", "{r}/td-nometa", "--out", "{r}/out/e3", "--no-progress"],
                                           ["{r}/td-nometa/iter_0000000", "incomplete", "no .metadata"],
                                           {"out": "{r}/out/e3"}),
    "export-legacy-rank-file-missing": (["export", "{r}/legacy-missing", "--out", "{r}/out/e4", "--no-progress"],
                                        ["tp=1 pp=1 is missing", "mp_rank_01_001/model_optim_rng.pt"],
                                        {"out": "{r}/out/e4"}),
    "export-legacy-rank-file-truncated": (["export", "{r}/legacy-truncated", "--out", "{r}/out/e5",
                                           "--no-progress"],
                                          ["mp_rank_00_000/model_optim_rng.pt", "corrupt or truncated"],
                                          {"out": "{r}/out/e5"}),
    "export-tracker-not-a-number": (["export", "{r}/badtracker", "--out", "{r}/out/e6", "--no-progress"],
                                    ["latest_checkpointed_iteration.txt", "'abc'", "not an iteration number"],
                                    {"out": "{r}/out/e6"}),
    "export-small.pt-file-size-limit": (["export", "{r}/legacy", "--out", "{r}/out/e7.pt", "--format", "small.pt"],
                                        ["{r}/out/e7.pt", "File too large"], {"fsize": FSIZE, "out": "{r}/out/e7.pt"}),
    "export-out-inside-checkpoint": (["export", "{r}/legacy", "--out", "{r}/legacy/hf", "--no-progress"],
                                     ["{r}/legacy/hf", "inside the source", "{r}/legacy"], {}),
    "export-small.pt-locked": (["export", "{r}/legacy", "--out", "{r}/out/e10.pt", "--format", "small.pt"],
                               ["output {r}/out/e10.pt is being written by pid {holder}"],
                               {"locked": "{r}/out/e10.pt", "out": "{r}/out/e10.pt"}),
    "export-small.pt-exists": (["export", "{r}/legacy", "--out", "{r}/exists.pt", "--format", "small.pt"],
                               ["{r}/exists.pt", "already exists", "--overwrite"], {}),
    # ---- data
    "data-prepare-empty-corpus": (["data", "prepare", "--input", "{r}/empty.txt", "--tokenizer", "{r}/tok.model",
                                   "--out", "{r}/out/d1"], ["no text in", "{r}/empty.txt"], {"out": "{r}/out/d1.bin"}),
    "data-prepare-missing-input": (["data", "prepare", "--input", "{r}/missing.txt", "--tokenizer",
                                    "{r}/tok.model", "--out", "{r}/out/d2"], ["{r}/missing.txt", "does not exist"],
                                   {"out": "{r}/out/d2.bin"}),
    "data-prepare-read-only-output-dir": (["data", "prepare", "--input", "{r}/text.txt", "--tokenizer",
                                           "{r}/tok.model", "--out", "{r}/ro/d3"], ["{r}/ro/d3", "Permission denied"],
                                          {"read_only": True, "out": "{r}/ro/d3.bin"}),
    "data-prepare-file-size-limit": (["data", "prepare", "--input", "{r}/text.txt", "--tokenizer", "{r}/tok.model",
                                      "--out", "{r}/out/d4"], ["{r}/out/d4", "File too large"],
                                     {"fsize": 2000, "out": "{r}/out/d4.bin"}),
}

# pretrain.py refusals that come before any process group: (flags after a valid run's, what must be named)
PRETRAIN_CASES = {
    "train-iters-0": (["--train-iters", "0"], ["--train-iters", "got 0"]),
    "save-interval-without-save": (["--save-interval", "2"], ["--save-interval", "--save DIR"]),
    "data-path-without-tokenizer": (["--data-path", "{r}/ds"], ["--data-path needs --tokenizer-model"]),
    "batch-size-and-batch-tokens": (["--global-batch-tokens", "128"],
                                    ["--global-batch-size", "--global-batch-tokens"]),
    "width-factor-not-integer": (["--width-factor", "1.5"], ["--width-factor", "'1.5'"]),
    "dry-run-world-not-divisible": (["--dry-run", "--world-size", "3", "--tp", "2"],
                                    ["world size 3", "tp x pp = 2 x 1 = 2"]),
    "dry-run-vpp-not-dividing-layers": (["--dry-run", "--world-size", "4", "--pp", "2", "--vpp", "3"],
                                        ["layers (4)", "pp x vpp = 2 x 3 = 6",
                                         "at --pp 2 this model allows --vpp in {2} or none"]),
}


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def inputs(tiny_model_dirs, tmp_path_factory) -> Path:
    """Good and damaged sources beside each other in one directory (megatron ones made by the worker)."""
    import torch
    from safetensors.torch import load_file, save_file

    from hyperclone_dist.builtin import BUILTIN, random_state_dict
    from hyperclone_dist.checkpoint import small_pt
    from hyperclone_dist.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("catalogue")
    shutil.copytree(tiny_model_dirs["llama-gqa2"], root / "llama")
    shutil.copytree(root / "llama", root / "int64")
    state = load_file(root / "int64" / "model.safetensors")
    save_file({k: (100 * v).to(torch.int64) for k, v in state.items()}, root / "int64" / "model.safetensors",
              metadata={"format": "pt"})
    (root / "noweights").mkdir()
    shutil.copy(root / "llama" / "config.json", root / "noweights")
    shutil.copytree(root / "llama", root / "idxmiss", ignore=shutil.ignore_patterns("model.safetensors"))
    (root / "idxmiss" / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}))
    (root / "notes").mkdir()
    (root / "notes" / "todo.txt").write_text("not a model")
    (root / "badtracker").mkdir()
    (root / "badtracker" / "latest_checkpointed_iteration.txt").write_text("abc\n")
    (root / "exists.pt").write_bytes(b"an earlier export")
    (root / "empty.txt").write_text("\n")
    (root / "text.txt").write_text("def f(x):\n    return x + 1  # a line of text to tokenize\n" * 200)
    train_tokenizer(None, root / "tok", 512, default_corpus_bytes=100_000)
    small_pt.save(root / "small.pt", BUILTIN, random_state_dict(BUILTIN, seed=0))  # for pretrain.py
    (root / "out").mkdir()
    (root / "ro").mkdir()
    (root / "ro").chmod(0o555)
    return root


@pytest.fixture(scope="module")
def runs(inputs) -> dict:
    """Every hyperclone case run by one worker, after the megatron checkpoints the cases read are written
    (grown x2, TP2 x PP2) and copied with damage."""
    r = str(inputs)
    convert = ["convert", f"{r}/llama", *LAYOUT, *GROW, "--out"]
    steps = [{"name": "setup legacy", "run": [*convert, f"{r}/legacy", "--format", "legacy"]},
             {"name": "setup torch_dist", "run": [*convert, f"{r}/td", "--format", "torch_dist"]},
             {"fs": ["copytree", f"{r}/td", f"{r}/td-truncated"]},
             {"fs": ["truncate", f"{r}/td-truncated/iter_0000000/__1_0.distcp", 1000]},
             {"fs": ["copytree", f"{r}/td", f"{r}/td-nometa"]},
             {"fs": ["unlink", f"{r}/td-nometa/iter_0000000/.metadata"]},
             {"fs": ["copytree", f"{r}/legacy", f"{r}/legacy-missing"]},
             {"fs": ["unlink", f"{r}/legacy-missing/iter_0000000/mp_rank_01_001/model_optim_rng.pt"]},
             {"fs": ["copytree", f"{r}/legacy", f"{r}/legacy-truncated"]},
             {"fs": ["truncate", f"{r}/legacy-truncated/iter_0000000/mp_rank_00_000/model_optim_rng.pt", 5000]}]
    holders = {}
    for case, (args, _, options) in CASES.items():
        steps.append({"name": case, "run": [a.format(r=r) for a in args],
                      **{k: v for k, v in options.items() if k in ("fsize", "read_only", "nproc")}})
        if "locked" in options:
            holders[case] = Path(options["locked"].format(r=r))
    (inputs / "logs").mkdir()
    (inputs / "plan.json").write_text(json.dumps({"logs": str(inputs / "logs"), "steps": steps}))
    for out in holders.values():
        lock.acquire(out)  # held by this process: the worker's children are other processes
    try:
        proc = subprocess.run([sys.executable, str(WORKER), str(inputs / "plan.json"), str(inputs / "report.json")],
                              cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600, check=False)
    finally:
        for out in holders.values():
            lock.release(out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    found = {run["name"]: run for run in json.loads((inputs / "report.json").read_text())}
    for name in ("setup legacy", "setup torch_dist"):
        assert found[name]["status"] == 0, found[name]["stderr"][-3000:]
    return found


def assert_one_line_error(status: int, stdout: str, stderr: str, names: list[str], prefix: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert not TRACEBACK.search(stderr), f"a traceback instead of one line:\n{stderr[-3000:]}"
    assert status == 2, f"exit {status}:\n{stderr[-3000:]}"
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{stderr[-3000:]}"
    assert lines[0].startswith(prefix), lines[0]
    assert stdout == "", stdout
    for name in names:
        assert name in lines[0], f"{name!r} not named in: {lines[0]}"
    print(lines[0])  # -rA shows what each case says
    return lines[0]


@pytest.mark.parametrize("case", list(CASES))
def test_hyperclone_bad_input_is_one_line(case, runs, inputs):
    args, names, options = CASES[case]
    run = runs[case]
    if options.get("read_only") and "capset" in run["stderr"]:
        pytest.skip(f"cannot drop CAP_DAC_OVERRIDE here, so a chmod 555 directory is writable: {run['stderr']}")
    named = [name.format(r=inputs, holder=f"{os.getpid()} on") for name in names]
    assert_one_line_error(run["status"], run["stdout"], run["stderr"], named, f"hyperclone {args[0]}: error: ")
    if "out" in options:
        out = Path(options["out"].format(r=inputs))
        assert not out.exists(), f"{out} was written"
        stem = out.name.removesuffix(".bin")
        left = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{stem}")]
        assert not left, f"left beside {out}: {left}"  # no partial file or directory, no lock file


def test_sources_are_unchanged_by_every_case(runs, inputs, tiny_model_dirs):
    assert tree_hashes(inputs / "llama") == tree_hashes(tiny_model_dirs["llama-gqa2"])
    assert (inputs / "exists.pt").read_bytes() == b"an earlier export"
    assert sorted(p.name for p in (inputs / "legacy").iterdir()) == [  # the source's companions travel along
        "generation_config.json", "hyperclone-manifest.json", "iter_0000000", "latest_checkpointed_iteration.txt"]
    assert list((inputs / "out").iterdir()) == [] and list((inputs / "ro").iterdir()) == []


@pytest.mark.parametrize("case", list(PRETRAIN_CASES))
def test_pretrain_refusal_before_any_process_group_is_one_line(case, inputs, tmp_path):
    extra, names = PRETRAIN_CASES[case]
    valid = ["--clone-from", str(inputs / "small.pt"), "--width-factor", "2", "--train-iters", "2",
             "--global-batch-size", "4", "--micro-batch-size", "2", "--seq-length", "32", "--no-progress"]
    proc = pretrain_in_process(*valid, *(a.format(r=inputs) for a in extra))
    assert_one_line_error(proc.returncode, proc.stdout, proc.stderr, names, "pretrain.py: error: ")
    assert not (tmp_path / "out").exists()


def test_pytorch_model_bin_in_torchs_legacy_format_converts(inputs, tmp_path):
    """Found by the pickle cases: a plain (non-zip) ``pytorch_model.bin``, as torch wrote before 1.6, was
    reported as corrupt because it cannot be memory-mapped; it is read whole instead, still weights-only."""
    import torch
    from safetensors.torch import load_file

    from hyperclone_dist.convert import convert
    from hyperclone_dist.growth.spec import GrowthSpec

    old = tmp_path / "old"
    shutil.copytree(inputs / "llama", old, ignore=shutil.ignore_patterns("model.safetensors"))
    state = load_file(inputs / "llama" / "model.safetensors")
    torch.save(state, old / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    convert(old, tmp_path / "a", GrowthSpec(width_factor=2), progress=False)
    convert(inputs / "llama", tmp_path / "b", GrowthSpec(width_factor=2), progress=False)
    assert tree_hashes(tmp_path / "a") == tree_hashes(tmp_path / "b")
