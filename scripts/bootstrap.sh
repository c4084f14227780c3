#!/usr/bin/env bash
# Sets up everything vhdcore's demo, tests and benchmarks need on a fresh Debian 12 machine:
# the Debian packages (peers used as test oracles and the Cython toolchain), a virtual
# environment in .venv, and an editable install that compiles the Cython kernels.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

DEB_PACKAGES=(
  gcc python3-dev python3-venv       # build of the Cython extension, venv on Debian's python3
  qemu-utils                         # qemu-img / qemu-io: interop oracle for fixed and dynamic VHDs
  e2fsprogs ntfs-3g mtools dosfstools fdisk   # real guest file systems for growth/compact tests
  zstd pigz bzip2                    # reference compressors for export tests and benchmarks
  xfsprogs                           # mkfs.xfs and xfs_db for the XFS guest tests
  memcached swift swift-proxy swift-account swift-container swift-object python3-swiftclient  # real Swift
  redis-server                       # broker for the fleet tests (each test starts its own on 127.0.0.1)
)

missing=()
for p in "${DEB_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "bootstrap: installing Debian packages: ${missing[*]}" >&2
  # Keep package post-install scripts from starting services (swift, memcached, redis) on the host.
  policy_created=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod +x /usr/sbin/policy-rc.d; policy_created=1
  fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  [ $policy_created -eq 0 ] || $SUDO rm -f /usr/sbin/policy-rc.d
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.vhdcore-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ setup.py -nt "$stamp" ] \
   || [ src/vhdcore/_coalesce.pyx -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[test,swift,s3,bench,dist,fleet]"
  touch "$stamp"
fi
.venv/bin/python -c "import vhdcore; assert vhdcore.BACKEND == 'cython', vhdcore.BACKEND"
