"""The long-budget study's section of docs/results.md and its figures, from the runs' metrics.jsonl files.

Every number is read from --out: nothing here is typed in. Arms whose runs are missing are left out, and
each row says how many seeds it holds.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from hyperclone_dist.experiments import Curve, plot_curves, read_curve, steps_to_reach, write_section

HEADING = "## Long budgets: does growing pay? (`recipes/long_budget`)"
FRACTIONS = (0.25, 0.5, 0.75)  # intermediate targets: the baseline's loss at these shares of its budget
FIGURES = {  # figure name -> the arms it shows
    "long_budget": ("random", "noisy", "small-continued", "noisy 0 dB", "noisy grown-adam fast"),
    "long_budget_handoff": ("random", "noisy lemon", "small-continued lemon", "noisy grown-adam wsd",
                            "small-continued grown-adam wsd", "noisy grown-adam fast", "noisy grown-adam mup fast",
                            "small-continued grown-adam fast"),
}
FLOOR = 2 / 3  # the floor: random's final loss in at most 2/3 of its steps, in every seed


def _mean_sd(values: list[float], digits: int = 3) -> str:
    if not values:
        return "—"
    mean = statistics.mean(values)
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def _loss_at(curve: Curve, step: int) -> float:
    """The last logged loss at or before ``step``."""
    return [v for s, v in zip(curve.steps, curve.losses) if s <= step][-1]


def _speedups(curves: list[Curve], targets: list[float], budget: int, charge: float = 0.0) -> str:
    """budget / (steps to the target + charge) per seed; '—' where a seed never gets there."""
    reach = [steps_to_reach(c, t) for c, t in zip(curves, targets)]
    if any(r is None for r in reach):
        got = sum(r is not None for r in reach)
        return f"never ({got}/{len(reach)})" if not got else f"{got}/{len(reach)} seeds"
    values = [budget / (r + charge) if r + charge else float("inf") for r in reach]
    if any(v == float("inf") for v in values):
        return "starts below"
    return _mean_sd(values, 2) + "x"


def _small_charge(out: Path, small: int) -> float:
    """The small model's training in large-model steps: its steps x its FLOPs per token / the large model's."""
    from hyperclone_dist.growth.grow import Grower
    from hyperclone_dist.growth.spec import GrowthSpec
    from hyperclone_dist.sources import open_source
    from hyperclone_dist.train.monitor import flops_per_token

    cfg = open_source(out / f"small-{small}.pt").config
    large = Grower(cfg, GrowthSpec(width_factor=2), lambda name: None).large
    return small * flops_per_token(cfg, 128) / flops_per_token(large, 128)


def _curves(out: Path, arm: str, small: int | None, budget: int, seeds: list[int]) -> dict[int, Curve]:
    from run import run_name

    found = {}
    for seed in seeds:
        run_dir = out / run_name(arm, None if arm == "random" else small, budget, seed)
        if (run_dir / "done").is_file():
            found[seed] = read_curve(run_dir / "metrics.jsonl", label=arm)
    return found


def table(args, out: Path, small: int, budget: int) -> tuple[list[str], dict[str, Curve], list[str]]:
    """Markdown rows for one (small model, budget), the mean curve of each arm, and the floor verdicts."""
    from run import ARMS

    base = _curves(out, "random", None, budget, args.seeds)
    if not base:
        return [], {}, []
    small_final = read_curve(out / f"small-{small}" / "metrics.jsonl").final
    charge = _small_charge(out, small)
    rows, means, verdicts = [], {}, []
    for arm in args.arms:
        runs = _curves(out, arm, small, budget, args.seeds)
        seeds = [s for s in runs if s in base]
        if not seeds:
            continue
        curves, rand = [runs[s] for s in seeds], [base[s] for s in seeds]
        control = ARMS[arm][1]
        ctrl = _curves(out, control, small, budget, seeds) if control else {}
        vs_control = [runs[s].final - ctrl[s].final for s in seeds if s in ctrl]
        finals = [r.final for r in rand]
        reach = [steps_to_reach(c, t) for c, t in zip(curves, finals)]
        cells = [arm, str(len(seeds)), _mean_sd([c.losses[0] for c in curves]), _mean_sd([c.final for c in curves]),
                 _mean_sd([c.final - r.final for c, r in zip(curves, rand)]) if arm != "random" else "0",
                 _mean_sd(vs_control) if vs_control else "—",
                 _mean_sd([float(r) for r in reach if r is not None], 0) + ("" if None not in reach else
                                                                            f" ({len(reach) - reach.count(None)}"
                                                                            f"/{len(reach)})"),
                 _speedups(curves, finals, budget), _speedups(curves, finals, budget, 0 if arm == "random" else
                                                              charge)]
        for f in FRACTIONS:
            cells.append(_speedups(curves, [_loss_at(r, round(f * budget)) for r in rand], round(f * budget)))
        rise = max(max(0.0, (max(c.losses) - c.losses[0]) / c.losses[0]) for c in curves)
        rows.append("| " + " | ".join([*cells, f"{100 * rise:.1f}%"]) + " |")
        steps = curves[0].steps
        means[arm] = Curve(arm, steps, [statistics.mean(c.losses[i] for c in curves) for i in range(len(steps))])
        every_seed = len(seeds) == len(args.seeds) and None not in reach
        if arm != "random" and not arm.startswith("small-continued") and every_seed and \
                all(3 * r <= 2 * budget for r in reach):
            verdicts.append(f"{arm} ({len(seeds)} seeds, at most step {max(reach)} of {budget})")
    gap = statistics.mean(r.final for r in base.values()) - small_final
    passes = "training from scratch passes the small model" if gap < 0 else "random ends above the small model"
    head = (f"### Small model {small} steps (final valid loss {small_final:.3f}, all-in charge {charge:.0f} large "
            f"steps), large budget {budget} steps\n\nRandom's final loss − the small model's: **{gap:+.3f}** "
            f"({passes}).\n")
    return [head, HEADER, "|" + "---|" * (HEADER.count("|") - 1), *rows], means, verdicts


HEADER = ("| arm | seeds | valid loss, step 0 | final | final − random (paired) | final − same-schedule control "
          "(paired) | steps to random's final | speedup (large steps) | speedup (all-in) | speedup to random's "
          "loss at 1/4 | at 1/2 | at 3/4 | worst rise |")


def report(args, out: Path) -> None:
    from run import REPO

    figures_dir = Path(args.figures) if Path(args.figures).is_absolute() else REPO / args.figures
    first = args.small_steps[0]
    blocks, verdicts, figures = [], [], []
    for small in args.small_steps:
        for budget in args.budgets:
            lines, means, found = table(args, out, small, budget)
            if len(lines) > 3:
                blocks.append("\n".join(lines))
            if budget == args.decisive and small == first and means:
                verdicts = found
                random = means["random"].final
                ylim = (random - 0.3, read_curve(out / f"small-{small}" / "metrics.jsonl").final + 0.4)
                for name, wanted in FIGURES.items():
                    shown = [c for a, c in means.items() if a in wanted]
                    figures.append(plot_curves(shown, figures_dir / f"{name}.png",
                                               f"{budget} large steps, small model {small} steps, mean of seeds",
                                               hline=(random, "random's final loss"), ylim=ylim))
    scan = []
    for budget in args.budgets:
        for small in args.small_steps:
            _, means, _ = table(args, out, small, budget)
            for arm in ("random", "noisy", "noisy grown-adam fast"):
                if arm in means and (arm != "random" or small == first):
                    c = means[arm]
                    scan.append(Curve(f"{arm} B{budget}" + ("" if arm == "random" else f" S{small}"), c.steps,
                                      c.losses))
    if scan:
        low = min(min(c.losses) for c in scan)
        figures.append(plot_curves(scan, figures_dir / "long_budget_scan.png",
                                   "budget scan (B: large steps, S: small model steps; mean of seeds)",
                                   ylim=(low - 0.1, low + 1.0)))
    from run import ARMS, plan

    train_tokens = 0.9 * args.corpus_tokens  # the 90/10 split is by documents: about 90% of the tokens
    read = max(budget + (small if "--data-offset-steps" in ARMS[arm][0] else 0)  # grown Adam: the small's stream
               for arm, small, budget, _ in plan(args))
    epochs = read * 2048 / train_tokens
    repeat = "no run repeats a token" if epochs < 1 else "the longest runs repeat part of the corpus"
    per_run = ", ".join(f"{b} steps {b * 2048 / train_tokens:.2f}" for b in sorted({*args.budgets, *args.small_steps}))
    floor = (f"**Floor met** (random's final loss in at most {FLOOR:.2f} of the budget, in every seed): "
             + "; ".join(verdicts) + "." if verdicts else
             f"**Floor not met**: no clone reaches random's final loss within {FLOOR:.2f} of the budget in every "
             f"seed at the decisive budget.")
    body = (f"{HEADING}\n\nRun on {time.strftime('%Y-%m-%d')}, 2-core CPU, float32. Corpus (`recipes/long_budget/"
            f"corpus.py`): every UTF-8 `*.py` file of this Python's standard library, test suites included, and "
            f"`pydoc_data.topics`' English, {args.corpus_tokens} tokens at vocab 512, 90/10 split by documents. "
            f"One step is 16 x 128 tokens: the run reading furthest into the corpus reaches global batch {read}, "
            f"{epochs:.2f} epochs of the training split; {repeat}. Epochs per run: {per_run}; "
            f"arms without grown Adam restart the stream from its beginning, as the paper's protocol does (so "
            f"they re-read what the small model saw), grown-Adam arms continue after it. "
            f"Small models: d=64, 4 layers, trained {args.small_steps} steps (peak LR 3e-3, "
            f"cosine to 3e-4), saved with Adam's moments; large arms d=128 (x2 width, ~4x the FLOPs per token), "
            f"peak LR 2e-3, cosine to 2e-4 over the budget unless the arm says otherwise. Decisive budget "
            f"{args.decisive} steps with seeds {args.seeds} (data order and growth noise; the runs present are "
            f"counted per row); the other budgets and small model seed {args.seeds[0]}. Mean ± standard "
            f"deviation over seeds; 'paired' differences are taken per seed. Speedup: the baseline's budget (or "
            f"the step of the intermediate target) / the steps the arm needs to reach that loss; all-in adds the "
            f"small model's training in large-step FLOPs. Losses are logged every {args.eval_interval} steps.\n\n"
            f"```bash\n.venv/bin/python recipes/long_budget/run.py            # trains what is missing, then "
            f"writes this section\n```\n\n{floor}\n\n" + "\n\n".join(blocks) + "\n\n"
            + "".join(f"![validation loss](figures/{png.name})\n" for png in figures))
    path = write_section(Path(args.results) if Path(args.results).is_absolute() else REPO / args.results,
                         HEADING, body)
    print(body)
    print(f"wrote {path}")
    (out / "report.json").write_text(json.dumps({"floor_met": bool(verdicts), "verdicts": verdicts}) + "\n")
