#!/usr/bin/env bash
# `make bench-gpu`: the GPU table of issue 13 item 5 (`saepipe bench gpu`, see
# src/tools/bench/gpu.rs) on a machine with an NVIDIA GPU, from a prebuilt binary: no Rust
# toolchain needed there. Build the binary on any machine with `make build-cuda` (CUDA 13.0
# wheels, no GPU needed), which leaves it stripped at .cuda/bin/saepipe; copy that file here.
#
#   bash scripts/bench_gpu.sh [extra `saepipe bench gpu` flags, e.g. --only forward]
#
# Env: SAEPIPE_CUDA_BIN (default .cuda/bin/saepipe); PYTHON (default python3: with torch +
# transformers + a GPU it adds the PyTorch rows, else only ours); CUDA_LIB_DIRS (colon-
# separated folders holding libcublas.so.13 & co., searched first).
#
# The binary links cuBLAS/cuBLASLt/cuRAND/NVRTC/cudart of CUDA 13 by soname; they are looked
# for in CUDA_LIB_DIRS, then the nvidia-* wheels beside $PYTHON's torch, then /usr/local/cuda*.
# libcuda.so.1 is the driver's own.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${SAEPIPE_CUDA_BIN:-.cuda/bin/saepipe}
PY=${PYTHON:-python3}
if [[ ! -x "$BIN" ]]; then
    echo "bench_gpu: no executable $BIN; build it with 'make build-cuda' (on any machine) and copy it here, or set SAEPIPE_CUDA_BIN" >&2
    exit 1
fi

dirs=()
IFS=: read -r -a extra <<<"${CUDA_LIB_DIRS:-}"
dirs+=("${extra[@]}")
if wheel_dirs=$("$PY" -c 'import glob, os, nvidia
for p in nvidia.__path__:
    print("\n".join(sorted(glob.glob(os.path.join(p, "*", "lib")))))' 2>/dev/null); then
    while read -r d; do [[ -n "$d" ]] && dirs+=("$d"); done <<<"$wheel_dirs"
fi
dirs+=(/usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda-13*/lib64)

ld=""
for lib in libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13 libcudart.so.13; do
    for d in "${dirs[@]}"; do
        if [[ -n "$d" && -e "$d/$lib" ]]; then
            case ":$ld:" in *":$d:"*) ;; *) ld="$ld:$d" ;; esac
            break
        fi
    done
done
export LD_LIBRARY_PATH="${ld#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "bench_gpu: LD_LIBRARY_PATH=$LD_LIBRARY_PATH" >&2
missing=$(ldd "$BIN" | grep "not found" || true)
if [[ -n "$missing" ]]; then
    echo "bench_gpu: $BIN cannot find:" >&2
    echo "$missing" >&2
    echo "set CUDA_LIB_DIRS=dir1:dir2 to folders with these CUDA 13 libraries (a CUDA 13 toolkit's lib64, or site-packages/nvidia/cu13/lib of a torch cu13 install)" >&2
    exit 1
fi

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >&2 || true
ref=()
if "$PY" -c 'import torch, transformers; assert torch.cuda.is_available()' 2>/dev/null; then
    ref=(--reference-python "$PY")
else
    echo "bench_gpu: $PY lacks torch+transformers with a GPU: saepipe rows only" >&2
fi
"$BIN" --version >&2
exec "$BIN" bench gpu --device cuda "${ref[@]}" "$@"
