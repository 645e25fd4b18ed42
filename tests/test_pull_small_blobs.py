"""A pull of many small blobs (issue 24 item 3): they are fetched SMALL_BLOB_WORKERS at a time, more than the
``workers`` large blobs (they cost round trips, not bandwidth). Counted by a proxy that delays each blob."""

from __future__ import annotations

import os
from pathlib import Path

from modelcache.assemble.pull import SMALL_BLOB, SMALL_BLOB_WORKERS
from modelcache.cache import ModelCache
from modelcache.store.content import ContentStore
from tests.conftest import make_client
from tests.helpers.oci import Fixtures
from tests.helpers.proxy import ProxyBehaviour, RegistryProxy


def test_small_blobs_are_fetched_more_at_a_time_than_large_ones(fixtures: Fixtures, tmp_path: Path) -> None:
    files = {f"small-{i:03d}.json": os.urandom(1000) for i in range(3 * SMALL_BLOB_WORKERS)}
    files |= {f"large-{i}.bin": os.urandom(SMALL_BLOB) for i in range(3)}
    fixtures.raw_model("many/blobs:v1", files)
    proxy = RegistryProxy(fixtures.host, ProxyBehaviour(blob_delay=0.2))
    try:
        cache = ModelCache(ContentStore(tmp_path / "root"), make_client(), workers=2)
        pulled = cache.pull(f"{proxy.host}/many/blobs:v1").path
        assert {name: (pulled / name).read_bytes() for name in files} == files
        assert 2 < proxy.stats.blob_gets_peak <= SMALL_BLOB_WORKERS + 2
    finally:
        proxy.close()
