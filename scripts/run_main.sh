#!/usr/bin/env bash
# Main job: the quick benchmark on the embedded phantom (export all tasks, data summary,
# Task 1 quick tables). Installs what it needs into .venv. Extra args go to `mtneuro main`.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
source scripts/setup_env.sh requirements.txt
export PYTHONUNBUFFERED=1
exec mtneuro main "$@"
