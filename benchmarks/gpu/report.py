"""The GPU check's figures, read back from what its stages wrote, as the "GPU" section of docs/benchmarks.md
(the rest of the file is kept) and on stdout; with an acceptance line per requirement.

    python3 benchmarks/gpu/report.py --workdir runs/gpu-check [--doc docs/benchmarks.md] [--print-only]
"""

from __future__ import annotations

import json
import statistics
import sys
import textwrap
import time
from pathlib import Path

from gpu_common import OneLineParser, read_json
from stages import ONE_B_CONFIG, RECIPE, RECIPE_STEPS, STEPS_1B, WARMUP_1B

SECTION = "## GPU: one-GPU readiness check (`benchmarks/gpu/check.sh`)"
FLOAT32_TOL = 1e-5  # hyperclone verify's tolerance
FIRST_LOSS_TOL = 1e-2  # bf16 keeps 8 bits of mantissa (0.4% a rounding); a wrong clone is off by whole units
RATIO_TARGET = 0.9
MFU_GOAL = 0.40  # megatron reports ~45% for models of this size (TransformerEngine, fused attention)
WHAT = ("What it runs, within one time budget on one GPU: (a) the built-in model grown x2, logits against the small "
        "model's in float32 and bf16; (b) `launch/pretrain.py --clone-from` in bf16, the GPU recipe's large shape "
        "cloned from a random small model: first loss against the small model's on the same batch, falling loss, "
        "tokens/s and MFU; (c) the same megatron-core GPTModel and batches trained by a bare PyTorch bf16 loop: "
        "the ratio of tokens/s is what the trainer costs; (d) a ~1B model's MFU at sequence 2048 (MFU against the "
        "GPU's dense bf16 peak, megatron's convention); (e) `recipes/gpu-100m-to-350m` with fewer steps.")


def metrics(path: Path) -> dict[int, dict]:
    steps: dict[int, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            steps.setdefault(int(record["step"]), {}).update(record)
    return steps


def median_after(steps: dict[int, dict], key: str, warmup: int) -> float | None:
    values = [r[key] for s, r in sorted(steps.items()) if s > warmup and key in r]
    return statistics.median(values) if values else None


def rate(tokens_per_s: float | None, mfu: float | None) -> str:
    if tokens_per_s is None:
        return "no tokens/s logged past the warm-up"
    share = f"MFU {100 * mfu:.1f}%" if mfu is not None else "no MFU (unknown GPU peak)"
    return f"{tokens_per_s:,.0f} tokens/s, {share}"


def verdict(ok: bool | None, kind: str) -> str:
    if ok is None:
        return "not measured"
    if kind == "reported":
        return "reported"
    return "MET" if ok else ("NOT met (goal)" if kind == "goal" else "NOT met")


class Report:
    def __init__(self, work: Path, wall_s: float | None, budget_s: float):
        self.work, self.wall_s, self.budget_s = work, wall_s, budget_s
        self.stages = read_json(work / "results" / "stages.json") or {}
        self.lines: list[str] = []
        # (requirement, figure, met or None when not measured, "required" | "goal" | "reported")
        self.accept: list[tuple[str, str, bool | None, str]] = []

    def failed(self, key: str) -> bool:
        """True when the stage did not succeed, with a line saying why (its figures, if any, are partial)."""
        stage = self.stages.get(key)
        if stage is None:
            self.lines.append("    not run")
            return True
        if stage["status"] != "ok":
            self.lines.append(f"    {stage['status'].upper()} after {stage['seconds']:.0f} s: {stage.get('error', '')}"
                              f" (log {stage.get('log', '')})")
        return stage["status"] != "ok"

    def grow(self) -> None:
        self.lines.append("(a) the built-in model grown x2, logits on the GPU against the small model's:")
        data = read_json(self.work / "results" / "grow.json")
        broken = self.failed("a")
        if data is None:
            if not broken:
                self.lines.append("    no results")
            self.accept += [("float32 logit error <= 1e-05 relative", "-", None, "required"),
                            ("bf16 logit error", "-", None, "reported")]
            return
        self.lines.append(f"    {data['windows']}; the small model's own bf16 rounding: "
                          f"{data['small_bf16_vs_float32']:.1e}")
        for method, row in data["methods"].items():
            self.lines.append(f"    {method:<10} hidden {row['hidden']}, float32 max rel {row['float32']:.1e}   bf16 "
                              f"{row['bf16_vs_small_float32']:.1e} (against the small model in bf16: "
                              f"{row['bf16_vs_small_bf16']:.1e})")
        on_gpu = data["grow_model_on_device"]
        self.lines.append("    hyperclone_dist.grow() of a model on the GPU: " + (
            f"ok, float32 max rel {on_gpu['float32']:.1e}" if on_gpu["ok"] else f"FAILED: {on_gpu['error']}"))
        worst = max(row["float32"] for row in data["methods"].values())
        bf16 = max(row["bf16_vs_small_float32"] for row in data["methods"].values())
        self.accept += [("float32 logit error <= 1e-05 relative", f"{worst:.1e}", worst <= FLOAT32_TOL, "required"),
                        ("bf16 logit error", f"{bf16:.1e}", True, "reported")]

    def pretrain(self) -> None:
        steps = metrics(self.work / "b" / "metrics.jsonl")
        bare = read_json(self.work / "results" / "bare.json")
        n = max((s for s, r in steps.items() if "train/loss" in r), default=0)
        self.lines.append(f"(b) pretrain.py --clone-from on 1 GPU, bf16, the large model of {RECIPE}/train.json "
                          f"(random small model), {n} steps:")
        first, ref = steps.get(1, {}).get("train/loss"), (bare or {}).get("first_batch")
        warmup = max(1, n // 5)
        tps = mfu = None
        broken = self.failed("b")
        if not n:
            if not broken:
                self.lines.append("    no metrics")
        elif first is None:
            self.lines.append("    no loss logged at step 1")
        else:
            valid = [steps[s]["valid/loss"] for s in sorted(steps) if "valid/loss" in steps[s]]
            last = steps[n]["train/loss"]
            tps, mfu = median_after(steps, "perf/tokens_per_s", warmup), median_after(steps, "perf/mfu", warmup)
            start = self.stages.get("b", {}).get("started")
            rec = steps.get(1, {})
            launch = rec["time"] - rec["perf/step_seconds"] - start if start and "perf/step_seconds" in rec else None
            self.lines.append(f"    train loss {first:.4f} (step 1) -> {last:.4f} (step {n}); valid loss "
                              + " -> ".join(f"{v:.4f}" for v in valid))
            self.lines.append(f"    {rate(tps, mfu)} (medians of steps {warmup + 1}-{n})")
            if launch is not None:
                self.lines.append(f"    launch -> first step: {launch:.0f} s (imports, growth, data index, engine)")
            falls = last < first and (len(valid) < 2 or valid[-1] < valid[0])
            self.accept.append(("loss falls (train and valid)", f"{first:.3f} -> {last:.3f}", falls, "required"))
        if first is not None and ref:
            rel = abs(first - ref["small_float32"]) / ref["small_float32"]
            self.lines.append(f"    first loss {first:.5f}; on that batch the small model gives "
                              f"{ref['small_float32']:.5f} (float32), {ref['small_bf16']:.5f} (bf16), the grown "
                              f"GPTModel {ref['grown']:.5f} ({ref['grown_dtype']}): {rel:.1e} relative to the small "
                              "model's")
            self.accept.append((f"first loss = the small model's (bf16, {FIRST_LOSS_TOL:.0e})", f"{rel:.1e}",
                                rel <= FIRST_LOSS_TOL, "required"))
        else:
            self.accept.append((f"first loss = the small model's (bf16, {FIRST_LOSS_TOL:.0e})", "-", None,
                                "required"))
        self.lines.append("(c) the same GPTModel and batches trained by a bare PyTorch bf16 loop (fp32 master "
                          "weights):")
        ratio = None
        broken = self.failed("c")
        if bare is None:
            if not broken:
                self.lines.append("    no results")
        else:
            ratio = tps / bare["tokens_per_s"] if tps else None
            mfu_bare = f", MFU {100 * bare['mfu']:.1f}%" if bare.get("mfu") else ""
            memory = f"; peak memory {bare['peak_memory_gib']:.1f} GiB" if bare.get("peak_memory_gib") else ""
            self.lines.append(f"    {bare['tokens_per_s']:,.0f} tokens/s{mfu_bare} (median of steps "
                              f"{bare['warmup'] + 1}-{bare['steps']}){memory}; loss {bare['losses'][0]:.4f} -> "
                              f"{bare['losses'][-1]:.4f}")
            if ratio is not None:
                self.lines.append(f"    ratio pretrain.py / bare loop: {ratio:.3f}")
        self.accept.append((f"pretrain.py / bare loop tokens/s >= {RATIO_TARGET}",
                            f"{ratio:.3f}" if ratio else "-", None if ratio is None else ratio >= RATIO_TARGET,
                            "required"))

    def one_b(self) -> None:
        steps = metrics(self.work / "d" / "metrics.jsonl")
        self.lines.append(f"(d) {ONE_B_CONFIG}, random init, bf16, 32 x 2048 tokens a step (micro 2), "
                          f"{STEPS_1B} steps:")
        mfu = median_after(steps, "perf/mfu", WARMUP_1B)
        broken = self.failed("d")
        if not steps:
            if not broken:
                self.lines.append("    no metrics")
        else:
            tps = median_after(steps, "perf/tokens_per_s", WARMUP_1B)
            self.lines.append(f"    {rate(tps, mfu)} (medians of steps {WARMUP_1B + 1}-{max(steps)}; megatron's "
                              "local layer spec: attention unfused)")
        self.accept.append((f"MFU of the ~1B model >= {MFU_GOAL:.0%} (goal)", f"{100 * mfu:.1f}%" if mfu else "-",
                            None if mfu is None else mfu >= MFU_GOAL, "goal"))

    def recipe(self) -> list[str]:
        shortened = ", ".join(f"{k} {v}" for k, v in RECIPE_STEPS.items())
        self.lines.append(f"(e) {RECIPE} shortened ({shortened}; arms random and noisy):")
        results = self.work / "e" / "results.md"
        table = [line for line in results.read_text().splitlines() if line.startswith("|")] if results.is_file() else []
        if self.failed("e") and not table:
            return []
        self.lines.append("    its table follows this block" if table else "    no table")
        return table

    def render(self) -> tuple[str, bool, list[str]]:
        self.grow()
        self.pretrain()
        self.one_b()
        table = self.recipe()
        times = ", ".join(f"{k} {v['seconds']:.0f} s" for k, v in self.stages.items())
        self.lines.append(f"stage times: {times or 'none'}")
        if self.wall_s is not None:
            self.accept.append((f"script time <= {self.budget_s:.0f} s (a lease adds start and transfers)",
                                f"{self.wall_s:.0f} s", self.wall_s <= self.budget_s, "required"))
        self.lines.append("acceptance:")
        for requirement, figure, ok, kind in self.accept:
            self.lines.append(f"    {requirement:<58} {figure:>16}   {verdict(ok, kind)}")
        all_ok = all(ok for _, _, ok, kind in self.accept if kind == "required") and all(
            s["status"] == "ok" for s in self.stages.values())
        block = "\n".join(self.lines)
        return block, all_ok, table

    def section(self, block: str, table: list[str]) -> str:
        env = read_json(self.work / "results" / "env.json") or {}
        pkgs = env.get("packages", {})
        carried = ", ".join(f"{k} {v['version']}" for k, v in pkgs.items() if v["from"] == "wheels") or "none"
        image = ", ".join(f"{k} {v['version']}" for k, v in pkgs.items() if v["from"] == "image")
        where = "a machine not described (the env stage did not run)"
        if env:
            where = (f"{env.get('gpus', 1)} x {env.get('gpu')} ({env.get('gpu_memory_gib')} GiB), torch "
                     f"{env.get('torch')}, CUDA {env.get('cuda')}, Python {env.get('python')}; installed from carried "
                     f"wheels: {carried}; the image's: {image}")
        wall = f"{self.wall_s:.0f} s" if self.wall_s is not None else "unknown"
        text = (f"{SECTION}\n\nRun on {time.strftime('%Y-%m-%d')} on {where}. Script wall time {wall}.\n\n"
                f"{textwrap.fill(WHAT, 110)}\n\n"
                "```bash\nbash benchmarks/gpu/prepare_wheels.sh       # here: wheels and the tokenized corpus, "
                "carried\nbash benchmarks/gpu/check.sh                # on the GPU machine (--dry-run: on any CPU)\n"
                f"```\n\n```text\n{block}\n```\n")
        if table:
            text += "\nThe shortened recipe's table (a pipeline check, not the recipe's result):\n\n" + "\n".join(table)
            text += "\n"
        return text


def write(doc: Path, body: str) -> Path:
    from hyperclone_dist.experiments import write_section

    return write_section(doc, SECTION, body)


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="report.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, required=True, help="the check's working folder")
    p.add_argument("--doc", type=Path, default=Path("docs/benchmarks.md"))
    p.add_argument("--wall-s", type=float, help="the script's wall time so far")
    p.add_argument("--budget-s", type=float, default=480)
    p.add_argument("--print-only", action="store_true", help="print the section; leave the doc alone")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    report = Report(args.workdir, args.wall_s, args.budget_s)
    block, ok, table = report.render()
    print(block)
    if not args.print_only:
        print(f"wrote the GPU section of {write(args.doc, report.section(block, table))}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
