#!/usr/bin/env bash
# Generates the Python gRPC stubs for protos/csi.proto into csi_driver/proto/ (never committed, never edited).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
out=csi_driver/proto
mkdir -p "$out"
"$python" -m grpc_tools.protoc -I protos --python_out="$out" --grpc_python_out="$out" --pyi_out="$out" protos/csi.proto
# grpc_tools writes an absolute import of the sibling module; make it package-relative.
sed -i 's/^import csi_pb2 as csi__pb2$/from . import csi_pb2 as csi__pb2/' "$out/csi_pb2_grpc.py"
printf '"""Generated from protos/csi.proto by scripts/gen_protos.sh."""\n' > "$out/__init__.py"
