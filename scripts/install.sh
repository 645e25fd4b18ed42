#!/usr/bin/env bash
# Installs everything ocimodel needs on a fresh Debian (bookworm) machine, as root:
# system packages, a virtualenv in .venv with the project and its dev tools (pinned by constraints.txt),
# and the generated gRPC stubs.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(python3 python3-venv python3-dev gcc pkg-config libfuse3-dev fuse3 util-linux docker-registry
          apache2-utils curl skopeo vmtouch)
missing=()
for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
PIP_CONSTRAINT="$PWD/constraints.txt" .venv/bin/pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]' 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -c 'import modelcache, grpc, pyfuse3, trio, kubernetes' 
bash scripts/gen_protos.sh  # the one build step (CSI stubs from protos/); the Dockerfile runs it too
