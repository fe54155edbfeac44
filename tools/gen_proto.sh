#!/usr/bin/env bash
# Regenerate espresso/proto/caffe_pb2.py from espresso/proto/caffe.proto.
#
# The generator is pinned to grpcio-tools 1.62.3: its bundled protoc emits
# protobuf-4.25-style Python with no runtime version check, so the output
# imports under every protobuf runtime from 4.21 through 7.x.  If that exact
# version is not importable from $PYTHON, it is installed into a throwaway
# venv that is removed afterwards.
#
# Usage: tools/gen_proto.sh            (works from any directory)
#        PYTHON=python3.12 tools/gen_proto.sh
set -euo pipefail

GRPC_TOOLS_VERSION="1.62.3"
PYTHON="${PYTHON:-python3}"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

have_pinned() {
  "$1" - "$GRPC_TOOLS_VERSION" <<'PY' >/dev/null 2>&1
import sys
from importlib.metadata import version
import grpc_tools.protoc  # noqa: F401
sys.exit(0 if version("grpcio-tools") == sys.argv[1] else 1)
PY
}

gen_python="$PYTHON"
tmp_venv=""
cleanup() {
  if [[ -n "$tmp_venv" ]]; then rm -rf "$tmp_venv"; fi
}
trap cleanup EXIT

if ! have_pinned "$gen_python"; then
  tmp_venv="$(mktemp -d "${TMPDIR:-/tmp}/espresso-protoc.XXXXXX")"
  echo "gen_proto: installing grpcio-tools==${GRPC_TOOLS_VERSION} into ${tmp_venv}" >&2
  "$PYTHON" -m venv "$tmp_venv"
  "$tmp_venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    "grpcio-tools==${GRPC_TOOLS_VERSION}"
  gen_python="$tmp_venv/bin/python"
fi

"$gen_python" -m grpc_tools.protoc -I espresso/proto --python_out=espresso/proto caffe.proto
echo "gen_proto: wrote espresso/proto/caffe_pb2.py" >&2
