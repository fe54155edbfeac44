#!/usr/bin/env bash
# Caffe's LeNet trained on the full Fashion-MNIST by REAL Caffe (tools/real_caffe.sh: Debian
# bullseye's build in a chroot; needs root), then tested and Deep-Compressed by Espresso, and
# the decompressed model tested by real Caffe again.  Writes into benchmarks/results/real_caffe/
# and benchmarks/results/compress/real_caffe_lenet.*; the LMDBs go to $CHROOT/scratch.
# Usage: bash benchmarks/real_caffe_lenet.sh   (skips the training when the model exists; the
# results of the checks go to benchmarks/results/real_caffe/checks.txt)
set -euo pipefail
cd "$(dirname "$0")/.."
rc=(bash tools/real_caffe.sh)
out=benchmarks/results/real_caffe
cmp=benchmarks/results/compress/real_caffe_lenet
scratch=${CHROOT:-/opt/bullseye}/scratch
"${rc[@]}" true  # set up the chroot
exec > >(tee $out/checks.txt)  # the summary of the checks below
mkdir -p "$scratch"
for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
  [ -f "$scratch/$f" ] || zcat "/usr/share/datasets/fashion-mnist/$f.gz" > "$scratch/$f"
done
for s in train t10k; do  # real Caffe's own converter
  db=$scratch/caffe_${s/t10k/test}_lmdb
  [ -d "$db" ] || "${rc[@]}" convert_mnist_data "/scratch/$s-images-idx3-ubyte" "/scratch/$s-labels-idx1-ubyte" \
    "/scratch/$(basename "$db")" --backend=lmdb
done
python3 -m espresso.cli prepare-fmnist examples/lenet  # the same bytes (checked), for Espresso
if [ ! -f $out/lenet_iter_10000.caffemodel ]; then
  "${rc[@]}" caffe train --solver $out/lenet_solver.prototxt 2> $out/lenet_fmnist_train.log
fi
caffe_test() { "${rc[@]}" caffe test --model $out/lenet_train_test.prototxt --weights "$1" --iterations 100 2>&1 \
  | grep -E "\] (accuracy|loss) = "; }
echo "real Caffe, its model:"; caffe_test $out/lenet_iter_10000.caffemodel
echo "Espresso, the same model:"
python3 -m espresso.cli test --model examples/lenet/lenet_train_test.prototxt --weights $out/lenet_iter_10000.caffemodel \
  --iterations 100 2>&1 | grep -E "\] (accuracy|loss) = "
python3 -m espresso.cli compress --model examples/lenet/lenet_train_test.prototxt --weights $out/lenet_iter_10000.caffemodel \
  --solver examples/lenet/lenet_solver.prototxt --prune "conv1=0.4,conv2=0.92,ip1=0.965,ip2=0.85" --bits paper \
  --prune-steps 3 --retrain-iters 1500 --quant-iters 1500 --centroid-grad sum \
  --output $cmp.espz --report $cmp.json --plot ${cmp}_weights.png 2> $cmp.log
grep -E "layer +weights|\] (conv|ip)[12] |total:" $cmp.log | sed 's/^I [0-9:]*\] //' > $cmp.txt
cat $cmp.txt
echo "Espresso, the compressed file:"
python3 -m espresso.cli test --model examples/lenet/lenet_train_test.prototxt --weights $cmp.espz --iterations 100 2>&1 \
  | grep -E "\] (accuracy|loss) = "
echo "Espresso, espresso.Net(proto, the compressed file, TEST):"
python3 -c "import espresso; net = espresso.Net('examples/lenet/lenet_train_test.prototxt', '$cmp.espz', espresso.TEST)
print('accuracy = %.4f' % (sum(float(net.forward()['accuracy']) for _ in range(100)) / 100))"
python3 -m espresso.cli decompress $cmp.espz "$scratch/real_caffe_lenet_decompressed.caffemodel"
echo "real Caffe, the decompressed model Espresso wrote:"; caffe_test /scratch/real_caffe_lenet_decompressed.caffemodel
