"""Media types of OCI manifests, ModelPack model-spec artifacts, ORAS artifacts and container images."""

from __future__ import annotations

import enum
import re

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)
ACCEPT_MANIFESTS = ", ".join((OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST))

OCI_IMAGE_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_IMAGE_CONFIG = "application/vnd.docker.container.image.v1+json"
IMAGE_CONFIG_TYPES = (OCI_IMAGE_CONFIG, DOCKER_IMAGE_CONFIG)
OCI_EMPTY = "application/vnd.oci.empty.v1+json"

MODEL_ARTIFACT = "application/vnd.cncf.model.manifest.v1+json"
MODEL_CONFIG = "application/vnd.cncf.model.config.v1+json"
MODEL_ARTIFACT_LEGACY = "application/vnd.cnai.model.manifest.v1+json"  # model-spec before the rename (<= v0.0.6)
MODEL_CONFIG_LEGACY = "application/vnd.cnai.model.config.v1+json"
KIT_ARTIFACT = "application/vnd.kitops.modelkit.manifest.v1+json"
KIT_CONFIG = "application/vnd.kitops.modelkit.config.v1+json"  # the Kitfile as JSON; the only sure sign of a kit
KITFILE = "application/vnd.ocimodel.kitfile.v1+yaml"  # the Kitfile a ModelKit's tree holds (made here, not fetched)
MODEL_KINDS = ("weight", "weight.config", "doc", "code", "dataset")
ANNOTATION_FILEPATH = "org.cncf.model.filepath"
ANNOTATION_FILEPATH_LEGACY = "org.cnai.model.filepath"
ANNOTATION_FILE_METADATA = "org.cncf.model.file.metadata+json"
ANNOTATION_FILE_METADATA_LEGACY = "org.cnai.model.file.metadata+json"
ANNOTATION_TITLE = "org.opencontainers.image.title"
ANNOTATION_ORAS_UNPACK = "io.deis.oras.content.unpack"

# what ``--layers`` and the ``layers`` attribute name, and the kind each vocabulary's layer type is
LAYER_KINDS = ("weights", "config", "code", "datasets", "docs")
_MODEL_KIND = {"weight": "weights", "weight.config": "config", "code": "code", "dataset": "datasets", "doc": "docs"}
_KIT_KIND = {"model": "weights", "modelpart": "weights", "code": "code", "dataset": "datasets", "docs": "docs"}

_MODEL_LAYER = re.compile(r"^application/vnd\.(?:cncf|cnai)\.model\.(weight|weight\.config|doc|code|dataset)\.v1"
                          r"(?:\.(raw|tar|tar\+gzip|tar\+zstd))?$")
_KIT_LAYER = re.compile(r"^application/vnd\.kitops\.modelkit\.([a-z]+)\.v1\.(tar|raw)(?:\+(gzip|zstd))?$")


class Compression(enum.Enum):
    """How a layer's bytes are stored."""

    RAW = "raw"
    TAR = "tar"
    TAR_GZIP = "tar+gzip"
    TAR_ZSTD = "tar+zstd"

    @property
    def is_tar(self) -> bool:
        """True for the three tar forms."""
        return self is not Compression.RAW


_IMAGE_LAYERS = {
    "application/vnd.oci.image.layer.v1.tar": Compression.TAR,
    "application/vnd.oci.image.layer.v1.tar+gzip": Compression.TAR_GZIP,
    "application/vnd.oci.image.layer.v1.tar+zstd": Compression.TAR_ZSTD,
    "application/vnd.docker.image.rootfs.diff.tar": Compression.TAR,
    "application/vnd.docker.image.rootfs.diff.tar.gzip": Compression.TAR_GZIP,
    "application/vnd.oci.image.layer.nondistributable.v1.tar": Compression.TAR,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": Compression.TAR_GZIP,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": Compression.TAR_ZSTD,
}


def model_layer(media_type: str) -> tuple[str, Compression] | None:
    """``(kind, compression)`` of a model-spec layer media type, else None (no suffix means tar)."""
    match = _MODEL_LAYER.match(media_type)
    if not match:
        return None
    return match.group(1), Compression(match.group(2) or "tar")


def model_kind(media_type: str) -> str | None:
    """The ``--layers`` kind of a ModelPack (either vocabulary) or ModelKit layer media type, else None."""
    parsed = model_layer(media_type)
    if parsed is not None:
        return _MODEL_KIND[parsed[0]]
    match = _KIT_LAYER.match(media_type)
    return _KIT_KIND.get(match.group(1)) if match else None


def kit_layer(media_type: str) -> tuple[str, Compression] | None:
    """``(kit base type, compression)`` of a ModelKit layer media type (``model``, ``modelpart``, ``code``,
    ``dataset``, ``docs``), else None. A raw layer with a compression suffix is not one."""
    match = _KIT_LAYER.match(media_type)
    if not match or match.group(1) not in _KIT_KIND:
        return None
    form, suffix = match.group(2), match.group(3)
    if form == "raw":
        return (match.group(1), Compression.RAW) if suffix is None else None
    return match.group(1), Compression(f"tar+{suffix}" if suffix else "tar")


def kit_layer_type(base: str, compression: Compression) -> str:
    """The ModelKit media type for a layer of kit base type ``base`` stored as ``compression``."""
    if base not in _KIT_KIND:
        raise ValueError(f"unknown ModelKit layer type {base!r}")
    form = "raw" if compression is Compression.RAW else compression.value
    return f"application/vnd.kitops.modelkit.{base}.v1.{form}"


def model_layer_type(kind: str, compression: Compression) -> str:
    """The model-spec media type for a layer of ``kind`` stored as ``compression``."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model layer kind {kind!r}")
    return f"application/vnd.cncf.model.{kind}.v1.{compression.value}"


def image_layer(media_type: str) -> Compression | None:
    """The compression of a container image layer media type, else None."""
    return _IMAGE_LAYERS.get(media_type)
