#!/usr/bin/env bash
# The main job end to end on embedded defaults: generate the demo corpus, then run the
# pipeline on local Ray, a local directory as object storage, and MLflow on SQLite.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions}"
.venv/bin/videobert demo-corpus --config configs/demo.yaml "$@"
.venv/bin/videobert run --config configs/demo.yaml "$@"
# What the fine-tuned champions say about a few held-out videos, next to the truth.
exec .venv/bin/videobert show --config configs/demo.yaml "$@"
