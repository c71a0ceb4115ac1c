#!/usr/bin/env bash
# Creates ./.venv and installs dapo_jax's dependencies into it.
#   scripts/setup.sh          runtime dependencies
#   scripts/setup.sh --test   runtime and test dependencies (torch CPU, transformers, pytest), and libtpu where
#                             pip can install it (the memory planner's test compiles for a TPU slice with it)
#   scripts/setup.sh --tpu    runtime dependencies and libtpu (TPU VMs; scripts/plan_memory.py on any host)
# Options combine (--test --tpu).
set -euo pipefail
cd "$(dirname "$0")/.."
test_deps=0
tpu=0
for arg in "$@"; do
  case "${arg}" in
    --test) test_deps=1 ;;
    --tpu) tpu=1 ;;
    *) echo "scripts/setup.sh: unknown option ${arg} (expected --test and/or --tpu)" >&2; exit 2 ;;
  esac
done
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
requirements=(-r requirements.txt)
if (( test_deps )); then
  requirements+=(-r requirements-test.txt)
fi
if (( tpu )); then
  requirements+=(-r requirements-tpu.txt)
fi
echo "Installing ${requirements[*]} into .venv ..."
.venv/bin/python -m pip install --quiet "${requirements[@]}"
if (( test_deps && !tpu )); then
  # Optional for the tests: without libtpu (no wheel for this platform, or the download fails) the planner's
  # test skips and says why, so a failure here only warns.
  echo "Installing requirements-tpu.txt (libtpu, ~210 MB) into .venv for the memory planner's test ..."
  if ! .venv/bin/python -m pip install --quiet --timeout 60 --retries 2 -r requirements-tpu.txt; then
    echo "warning: libtpu could not be installed; tests/test_plan_memory.py will skip its TPU compilations" >&2
  fi
fi
echo "Done: .venv is ready."
