"""Draw the figures of docs/growth.md from the library's own growth code.

    .venv/bin/python docs/make_figures.py            # writes docs/figures/growth_blocks.png

``growth_blocks.png``: the query projection of a tiny model (hidden 8, 2 heads of 4) grown x2 by each
width method. The grown matrix is a 2 x 2 grid of blocks; block (r, c) maps input copy c into output
copy r, so any blocks whose row sums to W keep the function. One colour scale is shared by all panels,
so W/2 reads paler than W.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt
import torch

from hyperclone_dist.builtin import random_state_dict
from hyperclone_dist.config import ModelConfig
from hyperclone_dist.growth.grow import Grower
from hyperclone_dist.growth.spec import GrowthSpec

HERE = Path(__file__).resolve().parent
PARAM = "layers.0.attn.q.weight"
N = 2  # width factor drawn

TINY = ModelConfig(
    family="llama", vocab_size=16, hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=4,
    ffn_hidden_size=16, max_position_embeddings=16,
)

# method -> (panel title, label of block (r, c) for a 2 x 2 grid)
VARIANTS = {
    "symmetric": ("symmetric: W/n everywhere", [["W/2", "W/2"], ["W/2", "W/2"]]),
    "noisy": ("noisy: W/n ± N per pair of columns", [["W/2 + N₀", "W/2 − N₀"], ["W/2 + N₁", "W/2 − N₁"]]),
    "diagonal": ("diagonal: W on the diagonal, 0 off it", [["W", "0"], ["0", "W"]]),
    "noisy-diagonal": ("noisy-diagonal: W + N, −N/(n−1) off it", [["W + N₀", "−N₀"], ["−N₁", "W + N₁"]]),
    "warmstart": ("warmstart (not function-preserving)", [["λW + σZ", "σZ"], ["σZ", "σZ"]]),
}


def grown_matrices(seed: int = 0) -> dict[str, torch.Tensor]:
    """The small matrix and its x2 growth by each method, all from the same small weights."""
    small = random_state_dict(TINY, seed=seed)
    panels = {"small": small[PARAM]}
    for method in VARIANTS:
        grower = Grower(TINY, GrowthSpec(width_factor=N, method=method, seed=seed), small.__getitem__)
        panels[method] = grower.full(PARAM)
    return panels


def draw_panel(ax, matrix: torch.Tensor, title: str, labels: list[list[str]] | None, vmax: float):
    image = ax.imshow(matrix.numpy(), cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest")
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    if labels is None:
        return image
    rows, cols = matrix.shape[0] // N, matrix.shape[1] // N  # block size = the small matrix
    for k in range(1, N):
        ax.axhline(k * rows - 0.5, color="black", linewidth=2)
        ax.axvline(k * cols - 0.5, color="black", linewidth=2)
    for r in range(N):
        for c in range(N):
            ax.text(c * cols + (cols - 1) / 2, r * rows + (rows - 1) / 2, labels[r][c], ha="center",
                    va="center", fontsize=10, bbox=dict(boxstyle="round", facecolor="white", alpha=0.85))
    return image


def growth_blocks(out: Path) -> None:
    panels = grown_matrices()
    vmax = max(float(m.abs().max()) for m in panels.values())
    fig, axes = plt.subplots(2, 3, figsize=(12, 8.6), constrained_layout=True)
    d = TINY.hidden_size
    image = draw_panel(axes[0, 0], panels["small"], f"small q-projection W [{d}, {d}]", None, vmax)
    for ax, (method, (title, labels)) in zip(axes.flat[1:], VARIANTS.items()):
        draw_panel(ax, panels[method], title, labels, vmax)
    fig.colorbar(image, ax=axes, shrink=0.6, label="weight")
    fig.suptitle(f"q-projection grown ×{N} (hidden {d} → {d * N}): block (r, c) maps input copy c to output "
                 "copy r\nN: Gaussian noise at 10 dB SNR; Z: μP init of the wide model; λ, σ: shrink, perturb",
                 fontsize=11)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=HERE / "figures", help="where the PNGs go")
    args = parser.parse_args()
    growth_blocks(args.out_dir / "growth_blocks.png")


if __name__ == "__main__":
    main()
