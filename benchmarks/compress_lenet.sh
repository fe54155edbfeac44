#!/usr/bin/env bash
# Deep Compression of LeNet-300-100 or Caffe's LeNet on the full Fashion-MNIST: train the
# baseline with the example solver (unchanged), then prune, quantize and Huffman-code it,
# retraining with that same solver; writes NAME.espz, NAME_report.json, NAME_weights.png and
# the logs into OUTDIR.  Usage: bash benchmarks/compress_lenet.sh lenet_300_100|lenet [OUTDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
name=$1
out=${2:-benchmarks/results/compress}
mkdir -p "$out"
python3 -m espresso.cli prepare-fmnist examples/lenet 2>/dev/null
case $name in
  lenet_300_100)
    model=examples/lenet_300_100/lenet_300_100_train_test.prototxt
    solver=examples/lenet_300_100/lenet_300_100_solver.prototxt
    stages=(--prune "*=0.95,ip3=0.8" --bits "*=5" --prune-steps 3 --retrain-iters 2000 --quant-iters 2000
            --centroid-grad sum) ;;
  lenet)
    model=examples/lenet/lenet_train_test.prototxt
    solver=examples/lenet/lenet_solver.prototxt
    stages=(--prune "conv1=0.4,conv2=0.92,ip1=0.965,ip2=0.85" --bits paper --prune-steps 3 --retrain-iters 1500
            --quant-iters 1500 --centroid-grad sum) ;;
  *) echo "usage: $0 lenet_300_100|lenet [OUTDIR]" >&2; exit 2 ;;
esac
base=$out/${name}_baseline
iters=$(sed -n 's/^max_iter: *//p' "$solver")
if [ ! -f "${base}_iter_${iters}.caffemodel" ]; then
  sed -e "s#snapshot_prefix: .*#snapshot_prefix: \"$base\"#" -e "s#snapshot: .*#snapshot: $iters#" "$solver" \
    > "${base}_solver.prototxt"
  python3 -m espresso.cli train --solver "${base}_solver.prototxt" 2> "${base}_train.log"
fi
python3 -m espresso.cli compress --model "$model" --weights "${base}_iter_${iters}.caffemodel" --solver "$solver" \
  "${stages[@]}" --output "$out/$name.espz" --report "$out/${name}_report.json" --plot "$out/${name}_weights.png" \
  2> "$out/${name}_compress.log"
tail -1 "$out/${name}_compress.log"
