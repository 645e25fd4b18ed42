#!/usr/bin/env bash
# Runs every check CI runs: install, lint (ruff), types (mypy), import contracts, then the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export PATH="$PWD/.venv/bin:$PATH"
echo "== ruff"; ruff check .
echo "== mypy"; mypy
echo "== import contracts"; lint-imports
echo "== pytest"
exec pytest -q -p no:cacheprovider "$@"
