#!/usr/bin/env bash
# Install what the tests need (into ./.venv, and vLLM's CPU build into ./.venv-vllm) and run them all.
# This is the README's test command; .ci/run calls it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh dev
# Real components the tests start on loopback: Chromium for the web page (Prometheus for deploy tests).
if ! command -v chromium >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium prometheus >/dev/null) \
      || echo "warning: could not install chromium/prometheus; the tests that need them will fail" >&2
  fi
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/python -m ruff check dalorra adapters server clients tests bench
.venv/bin/python -m ruff format --check dalorra adapters server clients tests bench
.venv/bin/python -m pytest -q --ignore=tests/vllm_backend "$@"
# The vLLM backend's tests need vLLM's CPU build, which lives in its own venv (.venv-vllm, ~3.5 GB).
exec scripts/test_vllm.sh
