"""Reading training runs back: loss curves from metrics.jsonl, steps to reach a target, and plots."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from hyperclone_dist.errors import HypercloneError


@dataclass
class Curve:
    label: str
    steps: list[int]
    losses: list[float]

    @property
    def final(self) -> float:
        return self.losses[-1]


def read_curve(metrics: str | Path, key: str = "valid/loss", label: str | None = None,
               step_offset: int = 0) -> Curve:
    """(step, value) of ``key`` from a metrics.jsonl; later lines for the same step win (a resumed run)."""
    path = Path(metrics)
    if not path.is_file():
        raise HypercloneError(f"no metrics file at {path}")
    points: dict[int, float] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if key in record:
            points[int(record["step"]) + step_offset] = float(record[key])
    if not points:
        raise HypercloneError(f"{path} holds no {key!r} values")
    steps = sorted(points)
    return Curve(label or path.parent.name, steps, [points[s] for s in steps])


def steps_to_reach(curve: Curve, target: float) -> int | None:
    """The first logged step whose value is <= target (None if never)."""
    return next((s for s, v in zip(curve.steps, curve.losses) if v <= target), None)


def plot_curves(curves: list[Curve], out: str | Path, title: str, ylabel: str = "validation loss",
                hline: tuple[float, str] | None = None, ylim: tuple[float, float] | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for curve in curves:
        ax.plot(curve.steps, curve.losses, marker="o", markersize=2.5, linewidth=1.5, label=curve.label)
    if hline:
        ax.axhline(hline[0], color="grey", linestyle="--", linewidth=1, label=hline[1])
    if ylim:
        ax.set_ylim(*ylim)  # e.g. leave out a random init's first steps, which dwarf the differences
    ax.set_xlabel("training step of the large model")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def write_section(doc: str | Path, heading: str, body: str) -> Path:
    """Put ``body`` (which starts with ``heading``, a ``## ...`` line) into the markdown file ``doc`` in place
    of the section with that heading, or at the end: each recipe owns one section of docs/results.md."""
    path = Path(doc)
    text = path.read_text() if path.is_file() else "# Results\n"
    if heading in text:
        before, rest = text.split(heading, 1)
        after = ("\n## " + rest.split("\n## ", 1)[1]) if "\n## " in rest else ""
    else:
        before, after = text.rstrip() + "\n\n", ""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(before.rstrip() + "\n\n" + body.rstrip() + "\n" + after)
    return path


def run_pretrain(flags: list, env: dict, log: Path, recipe: str, repo: Path) -> None:
    """``launch/pretrain.py --no-progress FLAGS`` in ``repo``, its output in ``log``; a failure ends the recipe
    naming the command and the log."""
    cmd = [sys.executable, "launch/pretrain.py", "--no-progress", *map(str, flags)]
    with open(log, "w") as out:
        proc = subprocess.run(cmd, cwd=repo, env=env, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"{recipe}: {' '.join(cmd)} failed (exit {proc.returncode}); see {log}")
