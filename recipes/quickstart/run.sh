#!/usr/bin/env bash
# The main job on the embedded default, from nothing (no downloads, no data to bring):
#   bash recipes/quickstart/run.sh
# Sets up .venv/, trains a small Llama-style model (d=64) on the embedded corpus (Python's standard
# library sources), grows it x2 straight into a TP=2 x PP=2 DeepSpeed run (4 CPU ranks) and races it
# against a random-init model of the same shape: prints the table and writes loss_curves.png.
# Outputs go to runs/quickstart/ (override: OUT=dir). About 15 minutes on 2 CPU cores.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
bash "$root/launch/bootstrap.sh"
cd "$root"
exec .venv/bin/python recipes/quickstart/quickstart.py --out "${OUT:-runs/quickstart}" "$@"
