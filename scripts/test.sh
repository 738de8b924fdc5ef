#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs into ./.venv, then lints and runs pytest.
# The servers the tests use (local S3 via moto, a `ray start --head` cluster, `mlflow server`)
# are started by the session fixtures in tests/conftest.py and stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions}"
.venv/bin/ruff check videobert pipelines tests benchmarks
.venv/bin/ruff format --check videobert pipelines tests benchmarks
# --durations: the suite should stay under 25 minutes on a 2-core box (19.7 min on 2026-12-04,
# 35-50 min on busier days: README, "Development"); the 30 slowest show where the time goes.
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=30 "$@"
