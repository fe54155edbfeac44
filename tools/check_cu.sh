#!/usr/bin/env bash
# Compile every CUDA source of the CUDA backend (espresso/backend/cuda/*.cu) with nvcc to an object
# file (device code through ptxas), instantiating every template the backend asks NVRTC for, with
# NVRTC's options (C++17, no FMA contraction) and warnings as errors.  Needs nvcc and numpy; no
# GPU, no CuPy: CI runs it (tests/backend/test_cuda.py) so .cu syntax and template errors show up
# without a GPU.  CUDA_ARCH overrides the target (default sm_90), PYTHON the interpreter.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
arch=${CUDA_ARCH:-sm_90}
python=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

check() {  # family: generate the instantiating unit, compile it, print ok/FAIL
    local family=$1 unit="$work/check_$1.cu"
    PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" "$python" -c "import sys
from espresso.backend.cuda.kernels import instances_source
sys.stdout.write(instances_source(sys.argv[1]))" "$family" >"$unit"
    if nvcc -arch="$arch" -std=c++17 -fmad=false -Werror all-warnings -c "$unit" -o "$work/$family.o" \
        >"$work/$family.log" 2>&1; then
        echo "ok    $family.cu ($arch)"
    else
        echo "FAIL  $family.cu ($arch)"
        cat "$work/$family.log"
        return 1
    fi
}

pids=()
for src in "$root"/espresso/backend/cuda/*.cu; do
    check "$(basename "$src" .cu)" &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
    wait "$pid" || status=1
done
exit $status
