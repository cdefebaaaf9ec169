#!/usr/bin/env bash
# Disaggregated serving with TensorRT-LLM (PyTorch backend) and the UCX KV connector, on one
# node with two GPUs: context instance on GPU 0, generation instance on GPU 1, proxy on :8000.
# Needs: TensorRT-LLM >= 1.2 and this package installed in the same environment.
# NOTE: not run against a real TensorRT-LLM by this project (see docs/trtllm-notes.md).
set -euo pipefail
MODEL=${MODEL:-Qwen/Qwen2.5-0.5B-Instruct}
HERE=$(cd "$(dirname "$0")" && pwd)
# Shared secret for the agents' authenticated handshake (both instances must agree).
export NIXL_CONNECTORS_AUTH_KEY=${NIXL_CONNECTORS_AUTH_KEY:-$(python -c 'import secrets; print(secrets.token_hex(16))')}

CUDA_VISIBLE_DEVICES=0 NIXL_TRTLLM_CONNECTOR_CONFIG="$HERE/ctx_connector.json" \
  trtllm-serve "$MODEL" --backend pytorch --host 127.0.0.1 --port 8001 \
  --extra_llm_api_options "$HERE/ctx_extra_llm_api_options.yaml" &
CTX=$!
CUDA_VISIBLE_DEVICES=1 NIXL_TRTLLM_CONNECTOR_CONFIG="$HERE/gen_connector.json" \
  trtllm-serve "$MODEL" --backend pytorch --host 127.0.0.1 --port 8002 \
  --extra_llm_api_options "$HERE/gen_extra_llm_api_options.yaml" &
GEN=$!
trap 'kill $CTX $GEN 2>/dev/null' EXIT

for port in 8001 8002; do
  until curl -sf "http://127.0.0.1:$port/health" >/dev/null; do sleep 2; done
done
python "$HERE/proxy.py" --context http://127.0.0.1:8001 --generation http://127.0.0.1:8002 --port 8000
