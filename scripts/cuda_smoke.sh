#!/usr/bin/env bash
# Check a `--features cuda` binary on a machine WITHOUT a GPU (CI): it links, starts, runs a
# CPU benchmark, and refuses `--device cuda` with a clear message.
#
#   bash scripts/cuda_smoke.sh [.cuda/bin/saepipe]
#
# candle links cudarc with `dynamic-linking`, so the binary needs libcuda.so.1 and CUDA 13's
# cuBLAS/cuRAND/NVRTC/cudart just to start. Here they come from the wheels of
# scripts/cuda_toolkit.sh and its driver stub (every driver call answers
# CUDA_ERROR_STUB_LIBRARY), which is how a GPU-less machine runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-.cuda/bin/saepipe}
ROOT=$(bash scripts/cuda_toolkit.sh 2>/dev/null | tail -1)

echo "-- ldd $BIN (no CUDA on the library path)"
ldd "$BIN" | grep -E "cuda|cublas|curand|nvrtc|cudart" || true
echo "-- CUDA symbols it imports: $(nm -D --undefined-only "$BIN" | grep -cE ' (cu|nvrtc|curand)[A-Za-z]') (first few:)"
nm -D --undefined-only "$BIN" | grep -E ' (cu|nvrtc|curand)[A-Za-z]' | head -5

if nvidia-smi -L >/dev/null 2>&1; then
    echo "cuda_smoke: this machine has a GPU; use scripts/bench_gpu.sh instead" >&2
    exit 0
fi
export LD_LIBRARY_PATH="$ROOT/lib:$ROOT/lib/stubs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "-- with the toolkit's libraries and the driver stub"
ldd "$BIN" | grep -E "cuda|cublas|curand|nvrtc|cudart"
"$BIN" --version
"$BIN" bench gpu --device cpu --shapes tiny-neox,tiny-llama --dtypes f32 --batch 2 --seq 16 \
    --iters 1 --train-d-in 32 --train-d-sae 128 --train-k 8 --train-batch 64 --train-steps 2
if out=$("$BIN" bench gpu --device cuda --only train 2>&1); then
    echo "cuda_smoke: --device cuda succeeded on a machine without a GPU?" >&2
    exit 1
fi
echo "$out" | tail -3
grep -q "cannot open the GPU" <<<"$out" || {
    echo "cuda_smoke: --device cuda failed without the expected message" >&2
    exit 1
}
echo "cuda_smoke: ok"
