#!/usr/bin/env bash
# The test suite on a machine with an NVIDIA GPU (the `gpu` tests then run rather than skip),
# its log headed by what ran where: the command, the commit, the date, the GPU and the
# versions of the driver, CUDA, cuDNN and the Python packages.
#   bash tools/gpu_tests.sh LOG [pytest arguments]
# ESPRESSO_COMMIT names the commit (a copy of the working tree on a device machine may carry a
# stale .git, or none); without it, git is asked.
set -uo pipefail
cd "$(dirname "$0")/.."
log=$1
shift
{
    echo "# command: bash tools/gpu_tests.sh $log $*"
    echo "# commit: ${ESPRESSO_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
    echo "# date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    PYTHONPATH=.:${PYTHONPATH:-} python3 - <<'PY'
import platform

import numpy

from espresso import backend

print(f"# python {platform.python_version()}, numpy {numpy.__version__}, platform {platform.platform()}")
try:
    for key, value in backend.get("cuda:0").describe().items():
        print(f"# {key}: {value}")
except Exception as e:  # the log then says why the GPU tests skip
    print(f"# no GPU backend: {e}")
PY
} > "$log"
# unbuffered, so nothing is lost if the process dies at exit; its status goes into the log
PYTHONUNBUFFERED=1 PYTHONPATH=.:${PYTHONPATH:-} python3 -X faulthandler -m pytest -q -p no:cacheprovider "$@" 2>&1 \
    | tee -a "$log"
status=${PIPESTATUS[0]}
echo "# pytest exit status: $status" >> "$log"
exit "$status"
