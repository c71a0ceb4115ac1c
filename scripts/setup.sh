#!/usr/bin/env bash
# Creates ./.venv and installs dapo_jax's dependencies into it.
#   scripts/setup.sh          runtime dependencies
#   scripts/setup.sh --test   runtime and test dependencies (torch CPU, transformers, pytest)
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
requirements=(-r requirements.txt)
if [[ "${1:-}" == "--test" ]]; then
  requirements+=(-r requirements-test.txt)
fi
echo "Installing ${requirements[*]} into .venv ..."
.venv/bin/python -m pip install --quiet "${requirements[@]}"
echo "Done: .venv is ready."
