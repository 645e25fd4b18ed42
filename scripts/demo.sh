#!/usr/bin/env bash
# The main job on an embedded default: installs what it needs, starts a registry on loopback,
# pushes a generated sample model, pulls it into a temporary cache and mounts it read-only.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python scripts/demo.py
