"""Hostile registries and artifacts: each gets a clear error and leaves nothing half-written visible."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from modelcache.cache import ModelCache
from modelcache.digest import Digest
from modelcache.errors import Kind, ModelCacheError
from modelcache.registry import mediatypes as mt
from modelcache.registry.transport import RetryPolicy
from modelcache.store.content import ContentStore
from tests.conftest import make_client
from tests.helpers.oci import Entry, Fixtures, compress, make_tar
from tests.helpers.proxy import ProxyBehaviour

RAW = mt.model_layer_type("weight", mt.Compression.RAW)


def assert_clean(cache: ModelCache) -> None:
    """No tree, no staging directory, no extracted layer, no partial ingest is left visible."""
    assert list(cache.store.trees.iterdir()) == []
    assert list(cache.store.layers.iterdir()) == []
    assert list(cache.store.models.iterdir()) == []
    assert list(cache.store.ingest_dir.iterdir()) == []


def pull_error(cache: ModelCache, ref: str) -> ModelCacheError:
    with pytest.raises(ModelCacheError) as info:
        cache.pull(ref)
    return info.value


def _pax_bomb() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        info = tarfile.TarInfo("big-header")
        info.pax_headers = {"comment": "x" * (2 << 20)}
        archive.addfile(info, io.BytesIO(b""))
    return buffer.getvalue()


HOSTILE_TARS = {
    "dotdot": ([Entry("../../etc/evil", b"x")], "escapes"),
    "absolute": ([Entry("/etc/evil", b"x")], "escapes"),
    "symlink-absolute": ([Entry("link", type=tarfile.SYMTYPE, linkname="/etc/passwd")], "link"),
    "symlink-escape": ([Entry("a/link", type=tarfile.SYMTYPE, linkname="../../../etc")], "outside"),
    "symlink-then-write-through": ([Entry("d", type=tarfile.SYMTYPE, linkname="."),
                                    Entry("d/../../x", b"x")], "escapes"),
    "hardlink-escape": ([Entry("h", type=tarfile.LNKTYPE, linkname="../../etc/passwd")], "outside"),
    "hardlink-absolute": ([Entry("h", type=tarfile.LNKTYPE, linkname="/etc/passwd")], "outside"),
    "char-device": ([Entry("dev", type=tarfile.CHRTYPE)], "device"),
    "block-device": ([Entry("dev", type=tarfile.BLKTYPE)], "device"),
    "fifo": ([Entry("fifo", type=tarfile.FIFOTYPE)], "device"),
    "setuid": ([Entry("bin", b"elf", mode=0o4755)], "setuid"),
    "setgid": ([Entry("bin", b"elf", mode=0o2755)], "setuid"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_TARS))
@pytest.mark.parametrize("compression", [mt.Compression.TAR, mt.Compression.TAR_GZIP], ids=lambda c: c.value)
def test_hostile_tar_entries_are_refused(fixtures: Fixtures, cache: ModelCache, case: str,
                                         compression: mt.Compression) -> None:
    entries, words = HOSTILE_TARS[case]
    name = f"hostile/{case}-{compression.value.replace('+', '-')}:v1"
    fixtures.tar_model(name, entries, compression)
    error = pull_error(cache, fixtures.ref(name))
    assert error.kind is Kind.UNSAFE_CONTENT, error
    assert words in str(error), str(error)
    assert_clean(cache)


def test_oversized_pax_header_is_refused(fixtures: Fixtures, cache: ModelCache) -> None:
    fixtures.manifest("hostile/pax:v1", [fixtures.layer("hostile/pax:v1", _pax_bomb(),
                                                        mt.model_layer_type("weight", mt.Compression.TAR))])
    error = pull_error(cache, fixtures.ref("hostile/pax:v1"))
    assert error.kind is Kind.UNSAFE_CONTENT and "header" in str(error)
    assert_clean(cache)


def test_decompression_bomb_is_refused(fixtures: Fixtures, cache_root: Path) -> None:
    zeros = make_tar([Entry("zeros.bin", bytes(100 << 20))])
    bomb = compress(zeros, mt.Compression.TAR_GZIP)
    assert len(bomb) < 1 << 20
    fixtures.manifest("hostile/bomb:v1", [fixtures.layer("hostile/bomb:v1", bomb,
                                                         mt.model_layer_type("weight", mt.Compression.TAR_GZIP))])
    cache = ModelCache(ContentStore(cache_root), make_client(), expand_ratio=2)
    error = pull_error(cache, fixtures.ref("hostile/bomb:v1"))
    assert error.kind is Kind.UNSAFE_CONTENT and "bomb" in str(error)
    assert_clean(cache)


def test_truncated_gzip_is_an_integrity_error(fixtures: Fixtures, cache: ModelCache) -> None:
    data = compress(make_tar([Entry("f", os.urandom(100_000))]), mt.Compression.TAR_GZIP)[:-5000]
    fixtures.manifest("hostile/truncated:v1", [fixtures.layer("hostile/truncated:v1", data,
                                                              mt.model_layer_type("weight", mt.Compression.TAR_GZIP))])
    error = pull_error(cache, fixtures.ref("hostile/truncated:v1"))
    assert error.kind is Kind.INTEGRITY
    assert_clean(cache)


@pytest.mark.parametrize("path", ["../../etc/passwd", "/etc/passwd", "a/../../b", "", "x\x00y"])
def test_hostile_filepath_annotations(fixtures: Fixtures, cache: ModelCache, path: str) -> None:
    name = f"hostile/path-{abs(hash(path)) % 10_000}:v1"
    fixtures.manifest(name, [fixtures.layer(name, b"w", RAW, {mt.ANNOTATION_FILEPATH: path})])
    error = pull_error(cache, fixtures.ref(name))
    assert error.kind in (Kind.UNSAFE_CONTENT, Kind.UNSUPPORTED), error
    assert_clean(cache)


def test_two_layers_claiming_one_path(fixtures: Fixtures, cache: ModelCache) -> None:
    layers = [fixtures.layer("hostile/dup:v1", b"a", RAW, {mt.ANNOTATION_FILEPATH: "w"}),
              fixtures.layer("hostile/dup:v1", b"b", RAW, {mt.ANNOTATION_FILEPATH: "w"})]
    fixtures.manifest("hostile/dup:v1", layers)
    assert pull_error(cache, fixtures.ref("hostile/dup:v1")).kind is Kind.INTEGRITY


@pytest.mark.parametrize("declared", [5, 50_000], ids=["smaller", "larger"])
def test_manifest_lying_about_layer_size(fixtures: Fixtures, cache: ModelCache, declared: int) -> None:
    name = f"hostile/size-{declared}:v1"
    fixtures.manifest(name, [fixtures.layer(name, os.urandom(10_000), RAW, {mt.ANNOTATION_FILEPATH: "w"},
                                            size=declared)])
    error = pull_error(cache, fixtures.ref(name))
    assert error.kind in (Kind.INTEGRITY, Kind.UNAVAILABLE, Kind.NOT_FOUND), error
    assert_clean(cache)
    assert all(p.stat().st_size < 1000 for _, p in cache.store.iter_blobs())  # only manifest and config


def test_file_metadata_lying_about_size(fixtures: Fixtures, cache: ModelCache) -> None:
    meta = json.dumps({"name": "w", "mode": 0o644, "size": 999, "typeflag": 0})
    fixtures.manifest("hostile/meta:v1", [fixtures.layer("hostile/meta:v1", b"1234", RAW,
                                                         {mt.ANNOTATION_FILEPATH: "w",
                                                          mt.ANNOTATION_FILE_METADATA: meta})])
    error = pull_error(cache, fixtures.ref("hostile/meta:v1"))
    assert error.kind is Kind.INTEGRITY and "999" in str(error)


def test_corrupted_blob_is_rejected_and_not_committed(fixtures: Fixtures, proxy_factory, cache_root: Path) -> None:
    data = os.urandom(200_000)
    fixtures.raw_model("hostile/corrupt:v1", {"w": data})
    proxy = proxy_factory(ProxyBehaviour(corrupt_blobs=True))
    cache = ModelCache(ContentStore(cache_root), make_client())
    error = pull_error(cache, f"{proxy.host}/hostile/corrupt:v1")
    assert error.kind is Kind.INTEGRITY and "digest" in str(error)
    assert not cache.store.has_blob(Digest.of_bytes(data))
    assert list(cache.store.trees.iterdir()) == [] and list(cache.store.ingest_dir.iterdir()) == []
    proxy.behaviour.corrupt_blobs = False
    assert (cache.pull(f"{proxy.host}/hostile/corrupt:v1").path / "w").read_bytes() == data


def test_stalling_registry_times_out(fixtures: Fixtures, proxy_factory, cache_root: Path) -> None:
    fixtures.raw_model("hostile/stall:v1", {"w": os.urandom(500_000)})
    proxy = proxy_factory(ProxyBehaviour(stall_after_bytes=100_000))
    retry = RetryPolicy(attempts=2, base_delay=0.05, max_delay=0.1, connect_timeout=1, read_timeout=1)
    cache = ModelCache(ContentStore(cache_root), make_client(retry=retry))
    error = pull_error(cache, f"{proxy.host}/hostile/stall:v1")
    assert error.kind is Kind.UNAVAILABLE
    assert list(cache.store.trees.iterdir()) == []


def test_unparsable_references(cache: ModelCache) -> None:
    for bad in ("", "UPPER/case", "host:5000/repo:bad tag", "repo@sha256:1234", "a" * 5000, "repo:tag@md5:00"):
        error = pull_error(cache, bad)
        assert error.kind is Kind.INVALID_ARGUMENT, bad
