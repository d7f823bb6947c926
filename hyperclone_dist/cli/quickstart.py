"""The main job on an embedded default: grow the built-in model x2 in every variant and verify each."""

from __future__ import annotations

from pathlib import Path

from hyperclone_dist.builtin import BUILTIN, random_state_dict
from hyperclone_dist.checkpoint import small_pt
from hyperclone_dist.convert import convert
from hyperclone_dist.growth.spec import GrowthSpec
from hyperclone_dist.verify import compare_checkpoints

TOL = 1e-5
RUNS = [
    ("symmetric", GrowthSpec(width_factor=2, method="symmetric")),
    ("noisy 10 dB", GrowthSpec(width_factor=2, method="noisy", snr_db=10)),
    ("diagonal", GrowthSpec(width_factor=2, method="diagonal")),
    ("noisy-diagonal", GrowthSpec(width_factor=2, method="noisy-diagonal")),
    ("x3 width, ffn x2", GrowthSpec(width_factor=3, ffn_factor=2, method="noisy")),
    ("x2 + identity layers", GrowthSpec(width_factor=2, method="noisy", insert_layers="every:2")),
]


def run_quickstart(out: str) -> int:
    root = Path(out)
    small = small_pt.save(root / "small.pt", BUILTIN, random_state_dict(BUILTIN, seed=0), {"origin": "builtin"})
    print(f"built-in small model: {small} (llama-style, d={BUILTIN.hidden_size}, {BUILTIN.num_layers} layers, "
          f"GQA {BUILTIN.num_heads}/{BUILTIN.num_kv_heads})")
    print(f"{'growth':<22} {'hidden':>7} {'layers':>6} {'max |dlogit|':>13} {'rel':>10}  verdict")
    failures = 0
    for label, spec in RUNS:
        grown_dir = root / "grown" / label.replace(" ", "_").replace(",", "")
        result = convert(small, grown_dir, spec, overwrite=True, progress=False)
        diff = compare_checkpoints(small, grown_dir)
        ok = diff.ok(TOL)
        failures += not ok
        print(f"{label:<22} {result.large.hidden_size:>7} {result.large.num_layers:>6} {diff.max_abs:>13.3e} "
              f"{diff.max_rel:>10.2e}  {'OK' if ok else 'FAIL'}")
    print(f"grown HF checkpoints under {root / 'grown'} (load with AutoModelForCausalLM.from_pretrained)")
    return 1 if failures else 0
