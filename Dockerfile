# syntax=docker/dockerfile:1
# Multi-stage build of the ocimodel image: wheels (with the gRPC stubs generated from protos/) are built
# with compilers in the first stage; the final stage has the project, fuse3 and util-linux, and no
# build tools. Pin the base by digest in production: PYTHON_IMAGE=python:3.11.11-slim-bookworm@sha256:...
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc pkg-config libfuse3-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# constraints.txt pins the build backend too (pip passes PIP_CONSTRAINT to its isolated build environment)
ENV PIP_CONSTRAINT=/src/constraints.txt
COPY pyproject.toml setup.py README.md constraints.txt ./
COPY protos/ protos/
COPY modelcache/ modelcache/
COPY csi_driver/ csi_driver/
COPY node_agent/ node_agent/
COPY kubeadapter/ kubeadapter/
COPY ocimodel/ ocimodel/
RUN pip wheel --no-cache-dir --wheel-dir /wheels -c constraints.txt .

FROM ${PYTHON_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends fuse3 libfuse3-3 util-linux mount ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels ocimodel && rm -rf /wheels \
 && ocimodel --version
ENV PYTHONUNBUFFERED=1
ENTRYPOINT ["ocimodel"]
CMD ["--help"]
