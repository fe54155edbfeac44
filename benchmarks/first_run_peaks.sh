#!/usr/bin/env bash
# Espresso's GPU peak in a first run and in a later one, per benchmarks/gpu_vs_torch.py case:
# benchmarks/memdiag.py twice with one fresh ESPRESSO_CACHE_DIR (the first process times its
# convolution algorithms, the second takes them from the cache).  CUDA only.
#   bash benchmarks/first_run_peaks.sh [CASE ...]     (default: the LeNet cases)
set -euo pipefail
cd "$(dirname "$0")/.."
cases=("$@")
if [ ${#cases[@]} -eq 0 ]; then
    cases=(lenet_train_b64 lenet_train_b256 lenet_train_b1024 lenet_infer_b1 lenet_infer_b64 lenet300_train_b64)
fi
cache=$(mktemp -d)
trap 'rm -rf "$cache"' EXIT
for case in "${cases[@]}"; do
    for run in timed cached; do
        printf '%s %s: ' "$case" "$run"
        ESPRESSO_CACHE_DIR=$cache PYTHONPATH=.:${PYTHONPATH:-} python3 benchmarks/memdiag.py "$case"
    done
done
