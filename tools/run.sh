#!/usr/bin/env bash
# The main job: set up, then train Caffe's LeNet on Fashion-MNIST and print the test accuracy.
# Uses the full data set when installed (Debian's dataset-fashion-mnist, or $ESPRESSO_DATA),
# else the subset embedded in the repo.  Extra arguments go to `espresso train` (e.g. --gpu 0).
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/venv.sh
python3 -m pip install -q -e ".[data,plot,fast]"
python3 -m espresso.cli prepare-fmnist examples/lenet
python3 -m espresso.cli train --solver examples/lenet/lenet_solver.prototxt --plot examples/lenet/curves.png "$@"
