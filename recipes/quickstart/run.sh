#!/usr/bin/env bash
# The main job on the embedded default, from nothing (no downloads, no data to bring):
#   bash recipes/quickstart/run.sh
# Sets up .venv/, builds the built-in small model (small.pt), grows it x2 (x3) in every HyperCloning
# variant and with identity layers into Hugging Face checkpoints, and verifies each against the small
# model's logits. Outputs go to runs/quickstart/ (override: OUT=dir).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
bash "$root/launch/bootstrap.sh"
cd "$root"
exec .venv/bin/hyperclone quickstart --out "${OUT:-runs/quickstart}"
