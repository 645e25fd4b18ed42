#!/usr/bin/env bash
# Generates the Python gRPC stubs for protos/csi.proto into csi_driver/proto/ (never committed, never edited).
set -euo pipefail
cd "$(dirname "$0")/.."
"${PYTHON:-.venv/bin/python}" protos/generate.py
