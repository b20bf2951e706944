#!/usr/bin/env bash
# Serve a model repository written by `edgekidney export-triton MODEL --repo REPO` with NVIDIA Triton.
#
#   deploy/tritonserver.sh REPO [RELEASE]
#
# RELEASE must be the Triton container whose TensorRT built the engine (an engine loads only there);
# `edgekidney export-triton` prints the matching command. ONNX models (onnxruntime_onnx) run in any
# recent release. Workstation/server GPUs: nvcr.io/nvidia/tritonserver:<release>-py3. Jetson (JetPack 6.x,
# TensorRT 10.3): NVIDIA's iGPU release of 24.08 (the tritonserver tarball for JetPack, or the
# `-py3-igpu` container), started the same way.
#
#   TensorRT 10.3 -> 24.08   10.4 -> 24.09   10.5 -> 24.10   10.6 -> 24.11   10.7 -> 24.12   10.8 -> 25.01
#
# Ports: 8000 HTTP (Open Inference Protocol /v2), 8001 gRPC, 8002 Prometheus metrics.
set -euo pipefail
REPO=$(cd "${1:?usage: $0 REPO [RELEASE]}" && pwd)
RELEASE=${2:-24.08}
GPUS=()
if grep -q "KIND_GPU" "$REPO"/*/config.pbtxt; then GPUS=(--gpus all); fi
exec docker run --rm "${GPUS[@]}" --shm-size 1g -p 8000:8000 -p 8001:8001 -p 8002:8002 \
  -v "$REPO":/models "nvcr.io/nvidia/tritonserver:${RELEASE}-py3" \
  tritonserver --model-repository=/models --strict-readiness=true
