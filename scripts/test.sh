#!/usr/bin/env bash
# Set up with the dev tools, then lint, type-check, check the layer contract and run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh --dev
./scripts/system-deps.sh chromium
export OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-1}"
bin=.venv/bin

echo "== ruff";          $bin/ruff check .
echo "== ruff format";   $bin/ruff format --check .
echo "== mypy (strict)"; $bin/mypy
echo "== import-linter"; $bin/lint-imports
echo "== pytest";        $bin/pytest "$@"
