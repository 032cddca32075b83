#!/usr/bin/env bash
# Set up, import the bundled Online Retail sample, train, publish a snapshot and serve.
# No Redis and no LLM key needed: the in-process store and template explanations.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-1}"
export UPSELL_AUTH=off  # the local demo only: recommendations need no API key (said in the log)
exec .venv/bin/upsell demo "$@"
