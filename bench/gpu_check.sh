#!/bin/bash
# The GPU checks, as one script for a machine with an NVIDIA GPU (the device tool's, or yours): the GPU tests of
# the engines, then the engines' latency and parity on ONNX Runtime's CUDA provider and torch (CUDA graphs).
#
#   bash bench/gpu_check.sh [OUT_DIR]      # run from the checkout's root; logs go to OUT_DIR (default gpu-check)
#
# Needs autotune importable (pip install -e ".[test]"), onnxruntime-gpu for the CUDA provider (its CUDA major must
# match the machine's: 1.31 is CUDA 13), and a CUDA build of torch. What it does not cover: TensorRT (its tests
# run when the tensorrt package is installed). Each part has its own time limit, so one that hangs does not take
# the others with it; the whole takes 5-8 minutes on an H200.
set -o pipefail
out=${1:-gpu-check}
mkdir -p "$out"
root=$(pwd)
export PYTHONUNBUFFERED=1
python3 - <<'PY' | tee "$out/versions.log"
import torch, onnxruntime as ort
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
print("onnxruntime", ort.__version__, ort.get_available_providers())
PY
# the GPU tests of the engines (they skip without a GPU, onnxruntime-gpu or tensorrt); -rs says which skipped
timeout 300 python3 -m pytest -q -p no:randomly -rfs tests/test_compile.py \
    "tests/test_reuse.py::test_onnx_engine_with_reuse_matches_the_executor" 2>&1 | grep -v "DEBUG" \
    | tee "$out/pytest.log" | tail -25
# latency side by side, same schedule and inputs: eager on the CPU, the engines on the GPU
timeout 240 python3 "$root/bench/compile.py" --model digits --named unipc-bh2-o2 --nfe 10 --provider cuda \
    --ways eager,onnxruntime,torch,bare --batch 1,16,256 --repeats 20 --threads 4 --quality --report-size 256 \
    2>&1 | grep -v "VerifyEachNode" | tee "$out/compile.log" | tail -20
# engines with reuse vs without on the CUDA provider (digits, guidance 2, NFE 10)
timeout 420 python3 "$root/bench/reuse.py" --nfes 10 --search-budget 0 --report-size 64 --front 0 --engines \
    --provider cuda --rounds 5 --store "$out/reuse.db" 2>&1 | grep -v "VerifyEachNode" | tee "$out/reuse.log" | tail -30
