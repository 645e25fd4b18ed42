"""The content store's contract: verified ingest, atomic commit, read-only blobs, resume, single fetch."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import IO

import pytest

from modelcache.digest import Digest, Verifier
from modelcache.errors import IntegrityError
from modelcache.fsutil import file_lock
from modelcache.store.content import ContentStore


@pytest.fixture
def store(tmp_path: Path) -> ContentStore:
    s = ContentStore(tmp_path / "store")
    s.ensure()
    return s


def writer(data: bytes, calls: list[int] | None = None):
    def fetch(out: IO[bytes], verifier: Verifier) -> None:
        if calls is not None:
            calls.append(verifier.count)
        chunk = data[verifier.count:]
        verifier.update(chunk)
        out.write(chunk)
        verifier.verify()
    return fetch


def test_ingest_commits_read_only_blob(store: ContentStore) -> None:
    data = os.urandom(10_000)
    digest = Digest.of_bytes(data)
    path = store.ingest(digest, len(data), writer(data))
    assert path == store.blob_path(digest) and path.read_bytes() == data
    assert path.stat().st_mode & 0o777 == 0o444
    assert not store.partial_path(digest).exists()
    assert store.has_blob(digest, len(data)) and not store.has_blob(digest, len(data) + 1)


def test_wrong_content_is_never_committed(store: ContentStore) -> None:
    digest = Digest.of_bytes(b"expected")
    with pytest.raises(IntegrityError):
        store.ingest(digest, 8, writer(b"whatever"))
    assert not store.has_blob(digest) and not store.partial_path(digest).exists()


def test_more_bytes_than_declared_fail_early(store: ContentStore) -> None:
    data = b"x" * 100
    with pytest.raises(IntegrityError, match="more than the declared"):
        store.ingest(Digest.of_bytes(data), 10, writer(data))


def test_partial_ingest_is_resumed(store: ContentStore) -> None:
    data = os.urandom(50_000)
    digest = Digest.of_bytes(data)
    store.partial_path(digest).write_bytes(data[:20_000])
    calls: list[int] = []
    store.ingest(digest, len(data), writer(data, calls))
    assert calls == [20_000]
    assert store.blob_path(digest).read_bytes() == data


def test_oversized_partial_is_discarded(store: ContentStore) -> None:
    data = b"abc"
    digest = Digest.of_bytes(data)
    store.partial_path(digest).write_bytes(b"much longer than the blob")
    calls: list[int] = []
    store.ingest(digest, 3, writer(data, calls))
    assert calls == [0] and store.blob_path(digest).read_bytes() == data


def test_concurrent_ingest_fetches_once(store: ContentStore) -> None:
    data = os.urandom(100_000)
    digest = Digest.of_bytes(data)
    calls: list[int] = []
    gate = threading.Barrier(6)

    def run() -> None:
        gate.wait()
        store.ingest(digest, len(data), writer(data, calls))

    threads = [threading.Thread(target=run) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [0]


def test_put_bytes_verifies(store: ContentStore) -> None:
    with pytest.raises(IntegrityError):
        store.put_bytes(Digest.of_bytes(b"a"), b"b")
    assert store.put_bytes(Digest.of_bytes(b"a"), b"a").read_bytes() == b"a"


def test_clear_partials_spares_locked_ingest(store: ContentStore) -> None:
    busy, idle = Digest.of_bytes(b"busy"), Digest.of_bytes(b"idle")
    store.partial_path(busy).write_bytes(b"bu")
    store.partial_path(idle).write_bytes(b"id")
    with file_lock(store.locks / f"blob-sha256-{busy.hex}.lock"):
        assert store.clear_partials() == 1
    assert store.partial_path(busy).exists() and not store.partial_path(idle).exists()


def test_cache_root_is_private(store: ContentStore) -> None:
    for sub in (store.ingest_dir, store.locks, store.models):
        assert sub.stat().st_mode & 0o077 == 0
    assert store.root.stat().st_mode & 0o044 == 0  # others cannot list the cache


def test_gc_removes_only_abandoned_lazy_chunk_files(tmp_path: Path) -> None:
    from modelcache.cache import ModelCache
    from modelcache.lazy.chunkcache import ChunkCache
    from modelcache.upkeep.gc import collect_garbage
    cache = ModelCache(ContentStore(tmp_path / "root"))
    lazy_dir = cache.store.root / "lazy"
    in_use = ChunkCache(lazy_dir / "sha256-aaaa.part", 1 << 20)
    abandoned = lazy_dir / "sha256-bbbb.part"
    abandoned.write_bytes(b"left by a killed helper")
    try:
        report = collect_garbage(cache)
        assert report.temporary == ["sha256-bbbb.part"]
        assert not abandoned.exists() and in_use.path.exists()
    finally:
        in_use.close()
