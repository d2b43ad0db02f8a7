#!/usr/bin/env bash
# Adds to ./.whl/ (git-ignored; Ray's wheels go there too) the wheels the GPU machine (Python 3.12, x86-64, no
# package registry) lacks for the engine core process: pyzmq, at the version pinned in pyproject.toml.
# msgpack is on the image already. Run from the project root; install there with the rest of .whl/:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
mkdir -p .whl
version=$(sed -n 's/^ *"pyzmq==\([^"]*\)".*/\1/p' pyproject.toml)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "pyzmq==$version"
ls -l .whl/pyzmq-*.whl
