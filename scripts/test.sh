#!/usr/bin/env bash
# Set up (see setup.sh), then lint and run the whole test suite, real-teacher tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
# Two workers, one test file each at a time: the real-teacher file (mostly single-threaded ONNX Runtime
# quantization) runs beside the others.
.venv/bin/python -m pytest -q --durations=10 -n 2 --dist loadfile "$@"
