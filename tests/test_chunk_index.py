"""Chunk indexes: what ``ocimodel push`` writes (bound to the manifest, kept alive by a referrer, still a
plain ModelPack artifact to other tools), and lazy reads verified chunk by chunk before they are served,
with a bad answer asked again of the next endpoint."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from csi_driver.proto import csi_pb2
from modelcache.assemble.options import PullOptions
from modelcache.cache import ModelCache
from modelcache.digest import Digest
from modelcache.errors import IntegrityError, Kind
from modelcache.lazy.model import LazyBroken, LazyModel, Node
from modelcache.push import push_directory
from modelcache.registry import mediatypes as mt
from modelcache.registry.reference import parse_reference
from modelcache.store.content import ContentStore
from modelcache.store.rangedingest import INGEST_MARK
from modelcache.trust import chunkindex
from tests.conftest import make_client, needs_root
from tests.helpers.csi import CsiProcess, publish_request
from tests.helpers.proxy import ProxyProcess

CHUNK = chunkindex.DEFAULT_CHUNK_SIZE


def model_dir(tmp_path: Path) -> tuple[Path, bytes]:
    directory = tmp_path / "model"
    directory.mkdir()
    weights = os.urandom(2 * CHUNK + 12345)  # three chunks, the last one short
    (directory / "weights.safetensors").write_bytes(weights)
    (directory / "config.json").write_bytes(b'{"hidden": 8}')
    return directory, weights


def _live_model(registry, tmp_path: Path, name: str, chunk_index: bool) -> tuple[ModelCache, LazyModel, Node, bytes]:  # type: ignore[no-untyped-def]
    """A lazy model of :func:`model_dir` pushed as ``chunks/<name>`` (ranged downloads from 1 MiB), built,
    and its weights file."""
    client = make_client()
    directory, weights = model_dir(tmp_path)
    ref = parse_reference(f"{registry.host}/chunks/{name}:v1")
    push_directory(client, directory, ref, chunk_index=chunk_index)
    cache = ModelCache(ContentStore(tmp_path / "root"), client, connections_per_blob=4, ranged_min_size=1 << 20)
    cache.store.ensure()
    model = LazyModel(cache, cache.client.resolve(ref), PullOptions())
    model.build()
    node = model.lookup_path("weights.safetensors")
    assert node is not None
    return cache, model, node, weights


def test_push_binds_a_chunk_index_and_the_artifact_stays_plain_modelpack(registry, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    client = make_client()
    directory, weights = model_dir(tmp_path)
    ref = parse_reference(f"{registry.host}/chunks/model:v1")
    digest = push_directory(client, directory, ref)
    time.sleep(1.1)  # a later second: the pushed config must not carry the clock
    push_directory(client, directory, ref)  # pushing again changes nothing
    resolved = client.resolve(ref)
    manifest = json.loads(resolved.manifest.raw)
    assert resolved.digest == digest
    # what other tools see: a ModelPack manifest whose layers carry only the usual annotations
    assert manifest["artifactType"] == mt.MODEL_ARTIFACT and manifest["config"]["mediaType"] == mt.MODEL_CONFIG
    assert all(set(layer["annotations"]) == {mt.ANNOTATION_FILEPATH, mt.ANNOTATION_FILE_METADATA}
               for layer in manifest["layers"])
    assert set(manifest["annotations"]) == {chunkindex.ANNOTATION_DIGEST, chunkindex.ANNOTATION_SIZE}
    # the index: every chunk's sha256, bound by digest
    index = chunkindex.load(client, ref, resolved.manifest)
    assert index is not None and index.chunk_size == CHUNK
    weights_digest = str(Digest.of_bytes(weights))
    assert [index.expected(weights_digest, i) for i in range(3)] == [
        hashlib.sha256(weights[i * CHUNK:(i + 1) * CHUNK]).hexdigest() for i in range(3)]
    assert index.expected(weights_digest, 3) is None
    # kept alive by one referrer, found through the referrers tag schema
    listed = client.referrers_tag_index(ref.with_tag(f"sha256-{digest.hex}"))
    assert [d["artifactType"] for d in listed] == [chunkindex.INDEX_TYPE]
    referrer = client.resolve(ref.by_digest(Digest.parse(listed[0]["digest"])))
    body = json.loads(referrer.manifest.raw)
    assert body["subject"]["digest"] == str(digest)
    assert body["layers"][0]["digest"] == manifest["annotations"][chunkindex.ANNOTATION_DIGEST]
    assert client.head_digest(ref) == digest  # the tag still names the model
    if shutil.which("skopeo"):  # another tool copies the artifact unchanged
        out = subprocess.run(["skopeo", "copy", "--src-tls-verify=false", f"docker://{ref}",
                              f"oci:{tmp_path / 'copy'}:v1"], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        copied = json.loads((tmp_path / "copy" / "index.json").read_text())["manifests"][0]["digest"]
        assert copied == str(digest)


def test_an_index_that_does_not_match_the_manifest_is_refused(registry, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    client = make_client()
    directory, _ = model_dir(tmp_path)
    ref = parse_reference(f"{registry.host}/chunks/tampered:v1")
    push_directory(client, directory, ref)
    resolved = client.resolve(ref)
    forged = chunkindex.ChunkIndex(CHUNK, {str(resolved.manifest.layers[0].digest): (1, ("0" * 64,))}).to_json()
    with pytest.raises(IntegrityError):
        chunkindex.ChunkIndex.from_json(forged, resolved.manifest.layers, "forged index")


@pytest.mark.parametrize("mirror", [False, True], ids=["upstream-only", "bad-mirror-then-upstream"])
@needs_root
@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="/dev/fuse is missing")
def test_lazy_reads_are_verified_before_they_are_served(registry, tmp_path: Path, mirror: bool) -> None:  # type: ignore[no-untyped-def]
    """A chunk that fails the index is asked of the next endpoint; when none answers right, the read waits
    for the verified whole-blob download and is served from it (a bad chunk costs time, not the read)."""
    client = make_client()
    directory, weights = model_dir(tmp_path)
    push_directory(client, directory, parse_reference(f"{registry.host}/chunks/lazy:v1"))
    bad = ProxyProcess(registry.host, bytes_per_second=3_000_000, corrupt_ranges=True, log=str(tmp_path / "bad.log"))
    extra: list[str] = []
    if mirror:  # the cache in front answers ranges wrongly; the upstream answers right
        config = tmp_path / "node.yaml"
        config.write_text(json.dumps({"registries": {registry.host: {"mirrors": [f"http://{bad.host}"]}}}))
        extra = ["--config", str(config)]
        reference = f"{registry.host}/chunks/lazy:v1"
    else:
        reference = f"{bad.host}/chunks/lazy:v1"
    csi = CsiProcess(tmp_path / "driver", *extra)
    target = tmp_path / "mnt"
    try:
        csi.node.NodePublishVolume(publish_request("idx", target, reference, mount="lazy"))
        with open(target / "weights.safetensors", "rb") as handle:
            handle.seek(CHUNK)
            # fetched again from the upstream (mirror), or else read from the verified download
            assert handle.read(4096) == weights[CHUNK:CHUNK + 4096]
            handle.seek(0)
            assert handle.read() == weights
        ranges = [json.loads(line) for line in (tmp_path / "bad.log").read_text().splitlines()]
        assert any(r["range"].startswith(f"bytes={CHUNK}-") for r in ranges)  # the bad endpoint was asked
        helper_logs = "".join(p.read_text() for p in (csi.root / "csi" / "lazy").glob("*.log"))
        assert "failed its chunk-index hash" in helper_logs
        assert mirror or "now wait for its verified download" in helper_logs
        csi.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id="idx", target_path=str(target)))
    finally:
        csi.stop()
        bad.close()


def test_eio_only_when_every_source_failed(registry, tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    """Every endpoint answers the chunk wrong: the read waits for the verified download, and fails (never
    with wrong bytes) only once that download has failed too."""
    client = make_client()
    directory, _ = model_dir(tmp_path)
    push_directory(client, directory, parse_reference(f"{registry.host}/chunks/worst:v1"))
    bad = ProxyProcess(registry.host, corrupt_ranges=True)
    download_failed = threading.Event()

    def failing_download(stopping: threading.Event) -> None:
        time.sleep(1)
        download_failed.set()
        raise IntegrityError("whole blob: content does not match its digest")
    try:
        cache = ModelCache(ContentStore(tmp_path / "root"), client)
        cache.store.ensure()
        model = LazyModel(cache, client.resolve(parse_reference(f"{bad.host}/chunks/worst:v1")), PullOptions(),
                          download=failing_download)
        model.build()
        node = model.lookup_path("weights.safetensors")
        assert node is not None
        model.start_background()
        with pytest.raises(LazyBroken):
            model.read_node(node, CHUNK, 4096)
        assert download_failed.is_set()  # the read failed only after the download had
        assert "failed its chunk-index hash" in caplog.text and "wait for its verified download" in caplog.text
    finally:
        bad.close()


@pytest.mark.parametrize(("with_index", "marked"), [(True, True), (False, False), (False, True)],
                         ids=["with-index", "without-index", "without-index-marked"])
def test_a_damaged_download_under_way_is_never_trusted(registry, tmp_path: Path, with_index: bool,  # type: ignore[no-untyped-def]
                                                       marked: bool) -> None:
    """Lazy reads use the bytes a ranged download under way (in any process) already holds: with a chunk
    index only after the chunk verifies (else it is fetched by range); without one the floor applies: what
    was served is compared with the verified blob once it commits (by hash, or for a partial file with an
    ingest mark, by the mark the committed blob carries), and a difference breaks the model."""
    cache, model, node, weights = _live_model(registry, tmp_path, "live", with_index)
    assert node.source is not None
    damaged = bytearray(weights)
    damaged[100] ^= 0xFF
    partial, state = cache.store.ranged_paths(node.source.digest)  # as another process left it
    partial.write_bytes(damaged)
    mark = "0123456789abcdef0123456789abcdef" if marked else None
    if mark:
        os.setxattr(partial, INGEST_MARK, mark.encode())
    state.write_text(json.dumps({"version": 2, "mark": mark, "filled": [[0, 2 * CHUNK]]}))

    first = model.read_node(node, 0, 4096)
    assert first == (weights[:4096] if with_index else bytes(damaged[:4096]))
    assert model.read_node(node, CHUNK, 4096) == weights[CHUNK:CHUNK + 4096]
    model.start_background().join()
    assert cache.store.blob_path(node.source.digest).read_bytes() == weights  # the pull started over
    if with_index:
        assert model.failure is None and model.read_node(node, 0, 4096) == weights[:4096]
    else:
        assert model.failure is not None and model.failure.kind is Kind.INTEGRITY
        assert ("came from a download of blob" if marked else "differ from the verified blob") in str(model.failure)
        with pytest.raises(LazyBroken):
            model.read_node(node, 0, 4096)
    model.close()


def test_reads_of_a_marked_download_are_recorded_once_and_hold_when_it_commits(registry, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Without a chunk index, reads of the running download's own partial file (it carries an ingest mark)
    are recorded once, by the mark, not hashed range by range; the download resumes in the same file and
    commits it by rename, so the committed blob carries the mark and the served bytes hold."""
    cache, model, node, weights = _live_model(registry, tmp_path, "marked", False)
    assert node.source is not None
    digest = node.source.digest
    partial, state = cache.store.ranged_paths(digest)  # a download killed half-way, as its ingest left it
    partial.write_bytes(weights[:2 * CHUNK] + bytes(len(weights) - 2 * CHUNK))
    os.setxattr(partial, INGEST_MARK, b"fedcba9876543210fedcba9876543210")
    state.write_text(json.dumps({"version": 2, "mark": "fedcba9876543210fedcba9876543210",
                                 "filled": [[0, 2 * CHUNK]]}))

    for offset in range(0, 2 * CHUNK, CHUNK // 2):
        assert model.read_node(node, offset, 4096) == weights[offset:offset + 4096]
    records = cache.store.root / "lazy" / "served" / f"{digest.algorithm}-{digest.hex}.ranges"
    assert records.read_text() == "live fedcba9876543210fedcba9876543210\n"
    model.start_background().join()
    blob = cache.store.blob_path(digest)
    assert blob.read_bytes() == weights
    assert os.getxattr(blob, INGEST_MARK) == b"fedcba9876543210fedcba9876543210"  # the same file, renamed
    assert model.failure is None and cache.store.served.verdict(digest) is None
    assert not records.exists()  # settled
    assert model.read_node(node, 0, 4096) == weights[:4096]
    model.close()


@pytest.mark.parametrize("damaged", [False, True], ids=["right", "wrong"])
def test_a_served_partial_that_gc_removes_is_still_compared(registry, tmp_path: Path, damaged: bool) -> None:  # type: ignore[no-untyped-def]
    """A marked partial file that lazy reads served from is removed without having failed (gc after the
    plugin died mid-download): what it listed is hashed into range lines first, so the new download's blob
    is compared with them: right bytes give no verdict (its mark alone would), wrong ones give one."""
    cache, model, node, weights = _live_model(registry, tmp_path, "retired", False)
    assert node.source is not None
    digest = node.source.digest
    listed = bytearray(weights[:2 * CHUNK])
    if damaged:
        listed[CHUNK + 7] ^= 0xFF
    partial, state = cache.store.ranged_paths(digest)
    partial.write_bytes(bytes(listed) + bytes(len(weights) - 2 * CHUNK))
    os.setxattr(partial, INGEST_MARK, b"00112233445566778899aabbccddeeff")
    state.write_text(json.dumps({"version": 2, "mark": "00112233445566778899aabbccddeeff",
                                 "filled": [[0, 2 * CHUNK]]}))
    assert model.read_node(node, 0, 4096) == bytes(listed[:4096])

    assert cache.store.clear_partials() == 1
    assert not partial.exists() and not state.exists()
    records = cache.store.root / "lazy" / "served" / f"{digest.algorithm}-{digest.hex}.ranges"
    assert records.read_text().splitlines()[-1] == "retired 00112233445566778899aabbccddeeff"
    model.start_background().join()
    assert cache.store.blob_path(digest).read_bytes() == weights
    if damaged:
        assert model.failure is not None and "differ from the verified blob" in str(model.failure)
    else:
        assert model.failure is None and cache.store.served.verdict(digest) is None
    model.close()
