"""Stage (a) of the GPU check: the built-in model grown x2 and its logits compared with the small model's on the
GPU, in float32 and in bf16, on the seeded tokens ``hyperclone verify`` uses.

    python3 benchmarks/gpu/grow_verify.py --out runs/gpu-check/results/grow.json [--work runs/gpu-check/a]

Growth runs as ``hyperclone convert`` does (from small.pt, on the CPU); both models then run on the GPU. The
bf16 figures come with their floor: the small model's own bf16 logits against its float32 ones. Also tried:
``hyperclone_dist.grow`` on a model that already lives on the GPU (the notebook use), reported as ok or its error.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

from gpu_common import OneLineParser, write_json

METHODS = ("symmetric", "noisy")  # the exact copy, and the noisy clone every recipe trains from
TOL = 1e-5  # hyperclone verify's float32 tolerance, max |Δlogit| / max |logit|


def logits_on(model, windows, vocab: int, seed: int) -> list:
    """Logits of the real vocabulary on each window, on the model's device, as float64."""
    import torch

    from hyperclone_dist.verify import window_tokens

    device = next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for window in windows:
            ids, positions = window_tokens(vocab, window, seed)
            out.append(model(ids.to(device), position_ids=positions.to(device)).logits[..., :vocab].double())
    return out


def max_rel(reference: list, other: list) -> float:
    diff = max((r - o).abs().max().item() for r, o in zip(reference, other))
    return diff / max(max(r.abs().max().item() for r in reference), 1e-30)


def measure(small_path: Path, seed: int, device: str = "cuda") -> dict:
    import torch

    import hyperclone_dist
    from hyperclone_dist.builtin import BUILTIN
    from hyperclone_dist.hf_model import load_hf_model
    from hyperclone_dist.verify import windows

    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32: TF32 would round to 10 mantissa bits
    torch.backends.cudnn.allow_tf32 = False
    checked = windows(BUILTIN.max_position_embeddings, None, batch=2)
    vocab = BUILTIN.vocab_size
    small = load_hf_model(small_path).to(device)
    ref32 = logits_on(small, checked, vocab, seed)
    small16 = copy.deepcopy(small).to(torch.bfloat16)
    result = {"windows": "; ".join(w.describe() for w in checked), "tolerance": TOL,
              "small_bf16_vs_float32": max_rel(ref32, logits_on(small16, checked, vocab, seed)), "methods": {}}
    ref16 = logits_on(small16, checked, vocab, seed)
    for method in METHODS:
        grown = hyperclone_dist.grow(small_path, width_factor=2, method=method, dtype=torch.float32).to(device)
        row = {"hidden": grown.config.hidden_size, "float32": max_rel(ref32, logits_on(grown, checked, vocab, seed))}
        grown16 = grown.to(torch.bfloat16)
        out16 = logits_on(grown16, checked, vocab, seed)
        row["bf16_vs_small_float32"] = max_rel(ref32, out16)
        row["bf16_vs_small_bf16"] = max_rel(ref16, out16)
        result["methods"][method] = row
        del grown, grown16
    try:  # the notebook path: a model already on the device, grown in memory
        in_memory = hyperclone_dist.grow(small, width_factor=2, method="noisy", dtype=torch.float32).to(device)
        result["grow_model_on_device"] = {"ok": True,
                                          "float32": max_rel(ref32, logits_on(in_memory, checked, vocab, seed))}
    except Exception as exc:  # reported, not fatal: the file-based growth above is what convert and pretrain use
        first_line = (str(exc).splitlines() or [""])[0][:200]
        result["grow_model_on_device"] = {"ok": False, "error": f"{type(exc).__name__}: {first_line}"}
    return result


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="grow_verify.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON file of the figures")
    p.add_argument("--work", type=Path, default=Path("runs/gpu-check/a"), help="where the small model is written")
    p.add_argument("--seed", type=int, default=1234, help="seed of the token ids (hyperclone verify's default)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: the same code without a GPU "
                   "(tests)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from hyperclone_dist.builtin import BUILTIN, random_state_dict
    from hyperclone_dist.checkpoint import small_pt

    if args.device == "cuda" and not torch.cuda.is_available():
        print("grow_verify.py: error: no GPU visible (--device cpu runs the same code on the CPU)", file=sys.stderr)
        return 2
    args.work.mkdir(parents=True, exist_ok=True)
    small = small_pt.save(args.work / "small.pt", BUILTIN, random_state_dict(BUILTIN, seed=0), {"origin": "builtin"})
    result = measure(small, args.seed, args.device)
    write_json(args.out, result)
    worst = max(row["float32"] for row in result["methods"].values())
    for method, row in result["methods"].items():
        print(f"{method:<10} hidden {row['hidden']}: float32 max rel {row['float32']:.2e}, bf16 "
              f"{row['bf16_vs_small_float32']:.2e} (vs the small model in bf16 {row['bf16_vs_small_bf16']:.2e})")
    print(f"small model bf16 vs float32: {result['small_bf16_vs_float32']:.2e}; grow() of a model on the "
          f"{args.device}: {result['grow_model_on_device']}")
    return 0 if worst <= TOL else 1


if __name__ == "__main__":
    sys.exit(main())
