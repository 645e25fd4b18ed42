"""Packing a local model directory as a ModelPack model-spec artifact and pushing it."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import zstandard

from modelcache.digest import Digest
from modelcache.errors import Kind, ModelCacheError
from modelcache.registry import mediatypes as mt
from modelcache.registry.client import RegistryClient
from modelcache.registry.reference import Reference
from modelcache.trust import chunkindex

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".onnx", ".h5", ".msgpack", ".ckpt", ".npz")
CODE_SUFFIXES = (".py", ".sh", ".ipynb", ".js", ".go", ".rs")
DOC_SUFFIXES = (".md", ".rst", ".pdf", ".html")
DATASET_SUFFIXES = (".parquet", ".arrow", ".csv", ".jsonl", ".tfrecord")



def layer_kind(relpath: str) -> str:
    """The model-spec kind of a file, from its name."""
    name = relpath.lower().rsplit("/", 1)[-1]
    if name.endswith(WEIGHT_SUFFIXES):
        return "weight"
    if name.endswith(CODE_SUFFIXES):
        return "code"
    if name.endswith(DOC_SUFFIXES) or name.startswith(("license", "readme", "notice")):
        return "doc"
    if name.endswith(DATASET_SUFFIXES):
        return "dataset"
    return "weight.config"


@dataclass
class _Layer:
    descriptor: dict[str, Any]
    diff_id: str
    source: Path
    temporary: bool


class _HashingWriter(io.RawIOBase):
    """Counts and hashes what passes through to ``inner``."""

    def __init__(self, inner: IO[bytes]) -> None:
        self.inner = inner
        self.hash = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.hash.update(view)
        self.size += len(view)
        self.inner.write(view)
        return len(view)


def _tar_layer(path: Path, relpath: str, compression: mt.Compression, workdir: Path) -> tuple[Path, str]:
    """Write a one-file tar layer for ``path``; return it and the digest of its uncompressed tar."""
    fd, name = tempfile.mkstemp(dir=workdir, suffix=".layer")
    with os.fdopen(fd, "wb") as out:
        compressor: Any
        if compression is mt.Compression.TAR_GZIP:
            compressor = gzip.GzipFile(fileobj=out, mode="wb", compresslevel=1, mtime=0)
        elif compression is mt.Compression.TAR_ZSTD:
            compressor = zstandard.ZstdCompressor(level=3).stream_writer(out, closefd=False)
        else:
            compressor = out
        hashing = _HashingWriter(compressor)
        with tarfile.open(fileobj=hashing, mode="w|", format=tarfile.PAX_FORMAT) as archive:
            info = archive.gettarinfo(str(path), arcname=relpath)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mode &= 0o755
            with open(path, "rb") as source:
                archive.addfile(info, source)
        if compressor is not out:
            compressor.close()
    return Path(name), f"sha256:{hashing.hash.hexdigest()}"


def _files(directory: Path) -> list[tuple[str, Path]]:
    result = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            st = path.lstat()
            if stat.S_ISREG(st.st_mode):
                result.append((path.relative_to(directory).as_posix(), path))
    return result


def push_directory(client: RegistryClient, directory: Path, ref: Reference, *,
                   compression: mt.Compression = mt.Compression.RAW, chunk_index: bool = True,
                   progress: Callable[[str], None] | None = None) -> Digest:
    """Pack every regular file under ``directory`` as one model-spec layer and push the artifact to ``ref``
    (raw layers with a chunk index unless ``chunk_index`` is False)."""
    if not directory.is_dir():
        raise ModelCacheError(f"{directory} is not a directory", kind=Kind.INVALID_ARGUMENT)
    files = _files(directory)
    if not files:
        raise ModelCacheError(f"{directory} holds no regular files", kind=Kind.INVALID_ARGUMENT)
    layers: list[_Layer] = []
    chunk_hashes: dict[str, tuple[int, tuple[str, ...]]] = {}
    with tempfile.TemporaryDirectory(prefix="ocimodel-push-") as work:
        for relpath, path in files:
            st = path.stat()
            annotations = {
                mt.ANNOTATION_FILEPATH: relpath,
                mt.ANNOTATION_FILE_METADATA: json.dumps(
                    {"name": relpath, "mode": st.st_mode & 0o777, "uid": 0, "gid": 0, "size": st.st_size,
                     "mtime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(st.st_mtime)), "typeflag": 0},
                    sort_keys=True),
            }
            if compression is mt.Compression.RAW:
                digest, size, chunks = chunkindex.hash_file(path)
                chunk_hashes[digest] = (size, chunks)
                source, diff_id, temporary = path, digest, False
            else:
                source, diff_id = _tar_layer(path, relpath, compression, Path(work))
                digest, size, _ = chunkindex.hash_file(source)
                temporary = True
                del annotations[mt.ANNOTATION_FILE_METADATA]
            media_type = mt.model_layer_type(layer_kind(relpath), compression)
            layers.append(_Layer({"mediaType": media_type, "digest": digest, "size": size,
                                  "annotations": annotations}, diff_id, source, temporary))
        for layer in layers:
            if progress:
                progress(f"uploading {layer.descriptor['annotations'][mt.ANNOTATION_FILEPATH]}")
            with open(layer.source, "rb") as body:
                client.upload_blob(ref, Digest.parse(layer.descriptor["digest"]), layer.descriptor["size"], body)
    config = json.dumps({
        # the newest file's time, not the clock: pushing the same directory again gives the same digest
        "descriptor": {"createdAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(
            max(path.stat().st_mtime for _, path in files))), "name": directory.name},
        "config": {},
        "modelfs": {"type": "layers", "diffIds": [layer.diff_id for layer in layers]},
    }, sort_keys=True).encode()
    config_digest = Digest.of_bytes(config)
    client.upload_blob(ref, config_digest, len(config), config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "artifactType": mt.MODEL_ARTIFACT,
        "config": {"mediaType": mt.MODEL_CONFIG, "digest": str(config_digest), "size": len(config)},
        "layers": [layer.descriptor for layer in layers],
    }
    index_raw = b""
    if chunk_hashes and chunk_index:  # raw layers: a chunk index lets lazy reads verify each chunk before serving it
        index_raw = chunkindex.ChunkIndex(chunkindex.DEFAULT_CHUNK_SIZE, chunk_hashes).to_json()
        client.upload_blob(ref, Digest.of_bytes(index_raw), len(index_raw), index_raw)
        manifest["annotations"] = chunkindex.annotations_for(Digest.of_bytes(index_raw), len(index_raw))
    raw = json.dumps(manifest, sort_keys=True).encode()
    manifest_digest = client.put_manifest(ref, raw, mt.OCI_MANIFEST)
    if index_raw:
        chunkindex.publish_referrer(client, ref, raw, index_raw)
    return manifest_digest
