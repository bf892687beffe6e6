#!/usr/bin/env bash
# Creates (or reuses) .venv and installs the project with the given requirements file.
# Usage: source scripts/setup_env.sh requirements.txt|requirements-test.txt
set -euo pipefail
req="${1:-requirements.txt}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
stamp=".venv/.installed-$(sha256sum "$req" requirements.txt pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "== installing $req into .venv (first run only)"
  python -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
  # torch only checks the weight import; take the CPU build (2.13.0 lies on the machine's disk).
  if grep -q '^torch' "$req"; then
    python -m pip install -q "torch==2.13.0" 2>&1 | grep -v '^WARNING: Location' || true
  fi
  python -m pip install -q -r "$req" 2>&1 | grep -v '^WARNING: Location' || true
  python -m pip install -q --no-deps -e . 2>&1 | grep -v '^WARNING: Location' || true
  python -c "import jax, flax, optax, orbax.checkpoint, intern, tensorflow_datasets, array_record, grain, ml_collections, sklearn" \
    || { echo "setup_env: dependencies failed to install (see pip output above)" >&2; exit 1; }
  touch "$stamp"
fi
