"""One layout check, one verdict: ``hyperclone convert``, ``hyperclone verify``, ``pretrain.py`` and
``pretrain.py --dry-run`` refuse a layout the model cannot be split into with the same line (after each
tool's ``error:`` prefix), before any work; and a layout the check accepts is one they all can build."""

from __future__ import annotations

from pathlib import Path

import pytest
from warm import failure_text, pretrain_in_process, run_warm

from hyperclone_dist.builtin import BUILTIN, random_state_dict
from hyperclone_dist.checkpoint import small_pt

# a small model with 6 heads in 3 query groups, grown x2: 12 heads, 6 groups, 4 layers, ffn 192
SMALL = BUILTIN.replace(hidden_size=48, num_heads=6, num_kv_heads=3, head_dim=8, ffn_hidden_size=96)
GROW = ["--width-factor", "2", "--method", "noisy"]
CASES = {  # id: (layout flags, ranks of the job, the verdict)
    "heads": (["--tp", "8"], 8, "attention heads (12) are not divisible by tp=8: this model allows --tp in "
                                "{1, 2, 3, 6, 12}"),
    "query-groups": (["--tp", "4"], 4, "query groups / kv heads (6) are neither divisible by tp=4 nor a divisor "
                                       "of it: this model allows --tp in {1, 2, 3, 6, 12}"),
    "layers": (["--pp", "3"], 3, "layers (4) are not divisible by pp x vpp = 3 x 1 = 3: this model allows --pp "
                                 "in {1, 2, 4}, or uneven stages: --decoder-first-pipeline-num-layers 1 "
                                 "--decoder-last-pipeline-num-layers 1"),
    "uneven": (["--pp", "3", "--decoder-first-pipeline-num-layers", "3"], 3,
               "layers (4) minus 3 (first) leave 1 for 2 middle pipeline stages, which must split them evenly: e.g. "
               "--decoder-first-pipeline-num-layers 1 --decoder-last-pipeline-num-layers 1"),
    "layers-vpp": (["--pp", "2", "--vpp", "3"], 2, "layers (4) are not divisible by pp x vpp = 2 x 3 = 6: at "
                                                   "--pp 2 this model allows --vpp in {2} or none"),
}
TRAIN = ["--train-iters", "1", "--global-batch-size", "24", "--micro-batch-size", "1", "--seq-length", "16",
         "--no-progress"]


@pytest.fixture(scope="module")
def verdicts(tmp_path_factory) -> dict[str, dict[str, str]]:
    """Per case, per tool: the one stderr line after its ``error: ``."""
    root = tmp_path_factory.mktemp("layout_verdicts")
    small = small_pt.save(root / "small.pt", SMALL, random_state_dict(SMALL, seed=0))
    ckpt = root / "ckpt"  # a good checkpoint for verify to be asked to load at a bad layout
    steps = [{"name": "checkpoint", "run": ["convert", str(small), "--out", str(ckpt), "--format", "torch_dist",
                                            *GROW, "--no-progress"]}]
    for case, (layout, ranks, _) in CASES.items():
        steps += [{"name": f"{case} convert", "run": ["convert", str(small), "--out", str(root / case), "--format",
                                                      "legacy", *GROW, *layout]},
                  {"name": f"{case} verify", "run": ["verify", str(small), str(ckpt), *layout], "nproc": ranks},
                  {"name": f"{case} pretrain", "entry": "pretrain", "nproc": ranks,
                   "run": ["--clone-from", str(small), *GROW, *layout, *TRAIN]}]
    runs = run_warm(steps, root / "warm")
    assert runs["checkpoint"]["status"] == 0, failure_text(runs["checkpoint"])
    out = {}
    for case, (layout, ranks, _) in CASES.items():
        dry = pretrain_in_process("--dry-run", "--world-size", str(ranks), "--clone-from", str(small), *GROW,
                                  *layout, *TRAIN)
        found = {"dry run": (dry.returncode, dry.stderr)}
        found.update({tool: (runs[f"{case} {tool}"]["status"], runs[f"{case} {tool}"]["stderr"])
                      for tool in ("convert", "verify", "pretrain")})
        out[case] = {}
        for tool, (status, stderr) in found.items():
            lines = [line for line in stderr.splitlines() if line.strip()]
            assert status == 2 and len(lines) == 1 and " error: " in lines[0], (case, tool, status, stderr[-2000:])
            out[case][tool] = lines[0].split(" error: ", 1)[1]
        assert not (root / case).exists()  # the refused conversion wrote nothing
    return out


@pytest.mark.parametrize("case", CASES)
def test_every_tool_gives_the_same_verdict(verdicts, case):
    print(f"\n{case}: {verdicts[case]['pretrain']}")
    assert set(verdicts[case].values()) == {CASES[case][2]}, verdicts[case]


def test_an_accepted_layout_is_built_by_every_tool(tmp_path):
    """tp=2 splits the 6 query groups into 3 per rank: the dry run fits and the converter builds it (its
    logits are checked at such layouts by tests/test_megatron_convert.py)."""
    small = small_pt.save(tmp_path / "small.pt", SMALL, random_state_dict(SMALL, seed=0))
    dry = pretrain_in_process("--dry-run", "--world-size", "2", "--tp", "2", "--clone-from", str(small), *GROW, *TRAIN)
    assert dry.returncode == 0 and dry.stdout.rstrip().endswith("fits"), dry.stdout + dry.stderr
    runs = run_warm([{"name": "convert", "run": ["convert", str(small), "--out", str(tmp_path / "ckpt"), "--format",
                                                 "legacy", "--tp", "2", *GROW, "--no-progress"]}], tmp_path / "warm")
    assert runs["convert"]["status"] == 0, failure_text(runs["convert"])
    assert Path(tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").is_file()
