#!/usr/bin/env bash
# GPU CI for nixl_connectors: install, run the multi-GPU tests, run the CUDA benchmark.
# Runs on a machine with >= 2 NVIDIA GPUs (NVLink or PCIe), CUDA 13 driver, python3 >= 3.10.
#
#   scripts/gpu-ci.sh                 # install into the current env, test, bench
#   SKIP_INSTALL=1 scripts/gpu-ci.sh  # the env already has the package and ucxx (e.g. the
#                                     # project's device machine: `source .device/setup.sh` first)
# Env: OUT (results folder, default ./gpu-ci-out), BENCH=0 to skip the benchmark,
#      BASELINES=0 to skip the torch/NIXL/ucx_perftest baselines, NIXL=0 to skip NIXL,
#      PYTEST_ARGS (extra pytest arguments), BASELINE_ARGS (extra gpu_baselines arguments).
# Exit status: non-zero when the tests fail or the benchmark saw a wrong byte.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-ci-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
PY=${PYTHON:-python3}
status=0

ngpu=$($PY -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null || echo 0)
echo "== GPUs visible: $ngpu"
nvidia-smi topo -m 2>/dev/null | tee "$OUT/topo.txt" || true
if [ "$ngpu" -lt 2 ]; then
  echo "fewer than 2 GPUs: nothing to do here"; exit 0
fi

if [ "${SKIP_INSTALL:-0}" != 1 ]; then
  echo "== install"
  $PY -m pip install -q -e '.[test]' 'ucxx-cu13==0.52.*' || exit 2
  [ "${NIXL:-1}" = 1 ] && { $PY -m pip install -q nixl-cu13 || echo "NIXL not installed: no NIXL baseline"; }
fi

echo "== doctor"
timeout 60 $PY -m nixl_connectors.tools.cli doctor 2>&1 | tee "$OUT/doctor.txt" || true

echo "== pytest -m gpu tests/gpu"
timeout 900 $PY -m pytest -m gpu tests/gpu -q -rs --timeout 300 -p no:cacheprovider ${PYTEST_ARGS:-} \
  --junitxml "$OUT/gpu-junit.xml" 2>&1 | tee "$OUT/gpu-tests.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1

if [ "${BENCH:-1}" = 1 ]; then
  echo "== bench --suite cuda"
  bench_nixl="--no-nixl"; [ "${NIXL:-1}" = 1 ] && bench_nixl=""
  timeout 900 $PY -m nixl_connectors.tools.cli bench --suite cuda $bench_nixl --json "$OUT/gpu.json" \
    --plot "$OUT/gpu.png" 2>&1 | tee "$OUT/bench.log"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi

if [ "${BASELINES:-1}" = 1 ]; then
  echo "== baselines: torch peer copy, NIXL VRAM"
  nixl_flag=""; [ "${NIXL:-1}" = 1 ] || nixl_flag="--no-nixl"
  timeout 900 $PY -m nixl_connectors.tools.bench.gpu_baselines --json "$OUT/gpu-baselines.json" $nixl_flag ${BASELINE_ARGS:-} \
    2>&1 | tee "$OUT/baselines.log" || true
  # ucx_perftest put bandwidth, CUDA memory, 1 GiB, two processes (when the UCX in use has it)
  perf=$(command -v ucx_perftest || true)
  [ -z "$perf" ] && perf=$($PY -c 'import libucx, os; print(os.path.join(os.path.dirname(libucx.__file__), "bin", "ucx_perftest"))' 2>/dev/null || true)
  if [ -n "$perf" ] && [ -x "$perf" ]; then
    libdir=$(dirname "$(dirname "$perf")")/lib
    for size in 1073741824 32768; do
      port=$((13700 + RANDOM % 1000))
      LD_LIBRARY_PATH=$libdir:${LD_LIBRARY_PATH:-} CUDA_VISIBLE_DEVICES=0 timeout 60 "$perf" -t ucp_put_bw -m cuda -s $size -n 100 -p $port > "$OUT/perftest-server-$size.txt" 2>&1 &
      sleep 2
      LD_LIBRARY_PATH=$libdir:${LD_LIBRARY_PATH:-} CUDA_VISIBLE_DEVICES=1 timeout 60 "$perf" 127.0.0.1 -t ucp_put_bw -m cuda -s $size -n 100 -p $port 2>&1 | tee "$OUT/perftest-$size.txt" || true
      wait
    done
  else
    echo "ucx_perftest not found: no perftest baseline"
  fi
fi
echo "== done (status $status); results in $OUT"
exit $status
