#!/usr/bin/env bash
# Test suite: installs what it needs into .venv, then runs pytest on 8 fake CPU devices.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
source scripts/setup_env.sh requirements-test.txt
export XLA_FLAGS="${XLA_FLAGS:---xla_force_host_platform_device_count=8}" JAX_PLATFORMS=cpu PYTHONUNBUFFERED=1
# One formatter over the whole tree: an unformatted file fails the test command (`ruff format .` fixes it).
ruff format --check --quiet . || { echo "run_tests: files above are not formatted; run \`ruff format .\`" >&2; exit 1; }
exec python -m pytest -q -n 2 --durations=15 "$@" tests
