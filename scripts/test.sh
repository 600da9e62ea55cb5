#!/usr/bin/env bash
# Set up (see setup.sh), then lint and run the whole test suite, real-teacher tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest -q --durations=10 "$@"
