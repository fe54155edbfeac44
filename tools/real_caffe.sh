#!/usr/bin/env bash
# Real BVLC Caffe (Debian bullseye's CPU_ONLY build, 1.0.0+git20180821.99bd997) in a chroot,
# as the reference Espresso is checked against.  Not a dependency of Espresso: the tests use
# only the data this produced (tests/data/caffe_reference/, benchmarks/results/real_caffe/).
#
# Needs root and network to deb.debian.org.  Idempotent; each step runs only when missing:
#   - debootstrap on the host (apt-get, host's own Debian);
#   - a minimal bullseye system at $CHROOT (default /opt/bullseye, about 600 MB);
#   - inside it: caffe, python3-caffe (pycaffe, python3.9, numpy 1.19), python3-lmdb and
#     OpenBLAS (libopenblas0-pthread; run with OPENBLAS_NUM_THREADS=1 on shared machines);
#   - bind mounts: /proc, /dev, this repository at $CHROOT/work (read-write) and
#     /usr/share/datasets read-only, made in a private mount namespace (unshare) so that they
#     vanish when the command ends: nothing under $CHROOT stays mounted (an rm -rf of $CHROOT
#     can never reach the repository).
# Usage: bash tools/real_caffe.sh [COMMAND...]   runs COMMAND (default: caffe --version) in the
# chroot, in /work (the repository), e.g.
#   bash tools/real_caffe.sh caffe train --solver benchmarks/results/real_caffe/lenet_solver.prototxt
#   bash tools/real_caffe.sh python3 tools/caffe_reference.py
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
root=${CHROOT:-/opt/bullseye}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
[ "$(id -u)" = 0 ] || { echo "real_caffe.sh: needs root (debootstrap, chroot, mount)" >&2; exit 1; }
if [ -z "${REAL_CAFFE_NS:-}" ]; then  # again, inside a mount namespace of its own
  exec env REAL_CAFFE_NS=1 unshare --mount --propagation private bash "$0" "$@"
fi

if ! command -v debootstrap > /dev/null; then
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap
fi
if [ ! -x "$root/usr/bin/apt-get" ]; then
  debootstrap --variant=minbase bullseye "$root" "$mirror"
fi
bound() { mountpoint -q "$1"; }
bound "$root/proc" || mount --bind /proc "$root/proc"
bound "$root/dev" || mount --bind /dev "$root/dev"
mkdir -p "$root/work" "$root/usr/share/datasets"
bound "$root/work" || mount --bind "$repo" "$root/work"
if [ -d /usr/share/datasets ] && ! bound "$root/usr/share/datasets"; then
  mount --bind /usr/share/datasets "$root/usr/share/datasets"
  mount -o remount,bind,ro "$root/usr/share/datasets"
fi
if [ ! -x "$root/usr/bin/caffe" ] || ! chroot "$root" python3 -c "import caffe, lmdb" 2> /dev/null; then
  cp /etc/resolv.conf "$root/etc/resolv.conf"
  chroot "$root" apt-get update -q
  chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    caffe python3-caffe python3-lmdb libopenblas0-pthread
fi
[ $# -gt 0 ] || set -- caffe --version
exec chroot "$root" /usr/bin/env -C /work HOME=/root GLOG_minloglevel="${GLOG_minloglevel:-0}" \
  OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-1}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" "$@"
