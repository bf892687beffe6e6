#!/usr/bin/env bash
# Optional: builds the oneDNN convolution kernel for conv_backend='onednn' (docs/speed.md).
# Installs oneDNN's headers + library and a C++ compiler from the system's packages when they
# are missing and this is a root Debian/Ubuntu machine (apt-get install libdnnl-dev g++), then
# compiles mtneuro_jax/kernels/onednn_conv.cc into ~/.cache/mtneuro_jax/kernels/<hash>/.
# Usage: bash scripts/build_onednn.sh [--force]     (PYTHON=... to pick the interpreter)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-}"
if [ -z "$py" ]; then
  if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
need=()
[ -f /usr/include/oneapi/dnnl/dnnl.hpp ] || [ -n "${DNNL_ROOT:-}" ] || need+=(libdnnl-dev)
command -v "${CXX:-g++}" >/dev/null 2>&1 || command -v c++ >/dev/null 2>&1 || need+=(g++)
if [ "${#need[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "== installing ${need[*]} (apt-get)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
  else
    echo "missing: ${need[*]}; install them (Debian/Ubuntu: sudo apt-get install ${need[*]}) or set DNNL_ROOT to a oneDNN 2.x install, then rerun" >&2
    exit 1
  fi
fi
exec "$py" -m mtneuro_jax.kernels.onednn build "$@"
