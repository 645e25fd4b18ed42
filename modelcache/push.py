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
from concurrent.futures import ThreadPoolExecutor
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
PACK_BELOW = 1 << 20  # files smaller than this may be packed together, in one tar layer per kind
PACK_AUTO_FILES = 64  # by default they are when the directory holds more than this many
PACK_LAYER_BYTES = 64 << 20  # a pack holds files up to about this many bytes (a lazy mount reads all its headers)
UPLOAD_WORKERS = 8

# a file of the model: its path in the model, on disk, and its lstat
File = tuple[str, Path, os.stat_result]


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


def _tar_layer(files: list[File], compression: mt.Compression, workdir: Path) -> tuple[Path, str]:
    """Write a tar layer of ``files``; return it and the digest of its uncompressed tar."""
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
            for relpath, path, _ in files:
                info = archive.gettarinfo(str(path), arcname=relpath)
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mode &= 0o755
                with open(path, "rb") as source:
                    archive.addfile(info, source)
        if compressor is not out:
            compressor.close()
    return Path(name), f"sha256:{hashing.hash.hexdigest()}"


def _files(directory: Path) -> list[File]:
    result = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            st = path.lstat()
            if stat.S_ISREG(st.st_mode):
                result.append((path.relative_to(directory).as_posix(), path, st))
    return result


def layer_groups(files: list[File], pack_small: bool | None) -> list[list[File]]:
    """The files of each layer: one each, but with ``pack_small`` (None: when more than PACK_AUTO_FILES files
    are smaller than PACK_BELOW) the small files of each kind packed together, PACK_LAYER_BYTES at most a
    pack, after the large files."""
    small = [f for f in files if f[2].st_size < PACK_BELOW]
    if not (len(small) > PACK_AUTO_FILES if pack_small is None else pack_small):
        return [[f] for f in files]
    groups = [[f] for f in files if f[2].st_size >= PACK_BELOW]
    packs: dict[str, list[File]] = {}  # the open pack of each kind ...
    sizes: dict[str, int] = {}  # ... and the bytes it holds
    for file in small:
        kind, size = layer_kind(file[0]), file[2].st_size
        if kind not in packs or sizes[kind] + size > PACK_LAYER_BYTES:
            packs[kind], sizes[kind] = [], 0
            groups.append(packs[kind])
        packs[kind].append(file)
        sizes[kind] += size
    return groups


def push_directory(client: RegistryClient, directory: Path, ref: Reference, *,
                   compression: mt.Compression = mt.Compression.RAW, chunk_index: bool = True,
                   pack_small: bool | None = None, progress: Callable[[str], None] | None = None) -> Digest:
    """Pack the regular files under ``directory`` as model-spec layers (one file each, stored as
    ``compression``; small files packed in tar layers: see :func:`layer_groups`) and push the artifact to
    ``ref``, with a chunk index of its raw and uncompressed tar layers unless ``chunk_index`` is False."""
    if not directory.is_dir():
        raise ModelCacheError(f"{directory} is not a directory", kind=Kind.INVALID_ARGUMENT)
    files = _files(directory)
    if not files:
        raise ModelCacheError(f"{directory} holds no regular files", kind=Kind.INVALID_ARGUMENT)
    layers: list[_Layer] = []
    chunk_hashes: dict[str, tuple[int, tuple[str, ...]]] = {}
    with tempfile.TemporaryDirectory(prefix="ocimodel-push-") as work:
        for group in layer_groups(files, pack_small):
            relpath, path, st = group[0]
            annotations = {mt.ANNOTATION_FILEPATH: relpath if len(group) == 1 else
                           os.path.commonpath([f[0] for f in group]) or "."}
            layer_compression = compression
            if len(group) > 1 and compression is mt.Compression.RAW:
                layer_compression = mt.Compression.TAR  # a pack of files is a tar
            if len(group) == 1:  # as modctl does: the file a layer holds (a lazy mount shows it from the manifest)
                annotations[mt.ANNOTATION_FILE_METADATA] = json.dumps(
                    {"name": relpath, "mode": st.st_mode & 0o777, "uid": 0, "gid": 0, "size": st.st_size,
                     "mtime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(st.st_mtime)), "typeflag": 0},
                    sort_keys=True)
            if layer_compression is mt.Compression.RAW:
                digest, size, chunks = chunkindex.hash_file(path)
                source, diff_id = path, digest
            else:
                source, diff_id = _tar_layer(group, layer_compression, Path(work))
                digest, size, chunks = chunkindex.hash_file(source)
            if layer_compression in (mt.Compression.RAW, mt.Compression.TAR):  # lazily readable: index its chunks
                chunk_hashes[digest] = (size, chunks)
            media_type = mt.model_layer_type(layer_kind(relpath), layer_compression)
            layers.append(_Layer({"mediaType": media_type, "digest": digest, "size": size,
                                  "annotations": annotations}, diff_id, source))

        def upload(layer: _Layer) -> None:
            if progress:
                progress(f"uploading {layer.descriptor['annotations'][mt.ANNOTATION_FILEPATH]}")
            with open(layer.source, "rb") as body:
                client.upload_blob(ref, Digest.parse(layer.descriptor["digest"]), layer.descriptor["size"], body)
        with ThreadPoolExecutor(UPLOAD_WORKERS, thread_name_prefix="upload") as pool:
            for _ in pool.map(upload, layers):
                pass
    config = json.dumps({
        # the newest file's time, not the clock: pushing the same directory again gives the same digest
        "descriptor": {"createdAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(
            max(st.st_mtime for _, _, st in files))), "name": directory.name},
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
    if chunk_hashes and chunk_index:  # a chunk index lets lazy reads verify each chunk before serving it
        index_raw = chunkindex.ChunkIndex(chunkindex.DEFAULT_CHUNK_SIZE, chunk_hashes).to_json()
        client.upload_blob(ref, Digest.of_bytes(index_raw), len(index_raw), index_raw)
        manifest["annotations"] = chunkindex.annotations_for(Digest.of_bytes(index_raw), len(index_raw))
    raw = json.dumps(manifest, sort_keys=True).encode()
    manifest_digest = client.put_manifest(ref, raw, mt.OCI_MANIFEST)
    if index_raw:
        chunkindex.publish_referrer(client, ref, raw, index_raw)
    return manifest_digest
