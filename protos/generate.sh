#!/usr/bin/env bash
# Regenerates xdsd/api/v1/*_pb2*.py from protos/xdsd/v1/*.proto (needs grpcio-tools, a dev-only
# dependency: `.venv/bin/pip install grpcio-tools`). The generated files are committed.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d)
.venv/bin/python -m grpc_tools.protoc -Iprotos --python_out="$out" --grpc_python_out="$out" --pyi_out="$out" protos/xdsd/v1/*.proto
mkdir -p xdsd/api/v1
for f in "$out"/xdsd/v1/*; do
  sed -e 's/^from xdsd\.v1 import/from xdsd.api.v1 import/' "$f" > "xdsd/api/v1/$(basename "$f")"
done
rm -rf "$out"
