"""Generate the Python gRPC stubs of protos/csi.proto into csi_driver/proto: the one build step, run by
scripts/gen_protos.sh (which scripts/install.sh and the Dockerfile call) before anything imports the driver."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "csi_driver" / "proto"


def generate(out: Path = OUT) -> None:
    """Run protoc (from grpcio-tools) and make the generated import package-relative."""
    import grpc_tools
    from grpc_tools import protoc

    out.mkdir(parents=True, exist_ok=True)
    include = Path(grpc_tools.__file__).parent / "_proto"
    code = protoc.main(["protoc", f"-I{HERE}", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}",
                        f"--pyi_out={out}", str(HERE / "csi.proto")])
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code}")
    grpc_module = out / "csi_pb2_grpc.py"
    text = grpc_module.read_text()
    grpc_module.write_text(text.replace("import csi_pb2 as csi__pb2", "from . import csi_pb2 as csi__pb2"))
    (out / "__init__.py").write_text('"""Generated from protos/csi.proto by protos/generate.py; do not edit."""\n')


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)
