#!/usr/bin/env bash
# Decode instance on a GPU host (vLLM CUDA build + this package). MODEL, GPU, PORT overridable.
set -euo pipefail
MODEL="${MODEL:-meta-llama/Llama-3.1-8B-Instruct}"
CUDA_VISIBLE_DEVICES="${GPU:-1}" exec vllm serve "$MODEL" --port "${PORT:-8200}" \
  --kv-transfer-config '{"kv_connector":"UcxConnector","kv_role":"kv_both","kv_load_failure_policy":"recompute","kv_connector_extra_config":{"listen_host":"0.0.0.0","advertise_host":"'"${ADVERTISE_HOST:-127.0.0.1}"'","transports":"cuda"}}' \
  "$@"
