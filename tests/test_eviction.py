"""Eviction by watermarks on a small real filesystem (tmpfs): LRU first, never pinned or mounted models,
blobs shared with a kept model stay."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelcache.cache import ModelCache
from modelcache.digest import Digest
from modelcache.eviction import evict
from modelcache.pins import Pins
from modelcache.store import ContentStore
from tests.conftest import make_client, needs_root
from tests.helpers.oci import Fixtures

pytestmark = needs_root


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "fs"
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(root)], check=True)
    yield root
    subprocess.run(["umount", "-l", str(root)], check=False)


def test_lru_eviction_spares_pinned_mounted_and_shared(small_fs: Path, fixtures: Fixtures, tmp_path: Path) -> None:
    shared = os.urandom(4 << 20)
    models = {}
    for name in ("oldest", "pinned", "mounted", "newest"):
        models[name] = {f"{name}.bin": os.urandom(8 << 20), "shared.bin": shared}
        fixtures.raw_model(f"evict/{name}:v1", models[name])
    cache = ModelCache(ContentStore(small_fs / "cache"), make_client())
    results = {}
    for name in models:
        results[name] = cache.pull(fixtures.ref(f"evict/{name}:v1"))
        time.sleep(0.02)
    for i, name in enumerate(models):  # make the LRU order explicit
        os.utime(cache.record_path(results[name].record.key), (1000 + i, 1000 + i))
    Pins(cache.store.root).pin("ns/keep", results["pinned"].record.key)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    subprocess.run(["mount", "--bind", str(results["mounted"].path), str(mountpoint)], check=True)
    try:
        dry = evict(cache, high=0.0, low=0.0, dry_run=True)
        assert dry.evicted == [results["oldest"].record.key, results["newest"].record.key]
        assert cache.get_record(results["oldest"].record.key) is not None
        outcome = evict(cache, high=0.0, low=0.0)
        assert set(outcome.evicted) == {results["oldest"].record.key, results["newest"].record.key}
        assert set(outcome.blocked) == {results["pinned"].record.key, results["mounted"].record.key}
        assert outcome.used_fraction_after < outcome.used_fraction_before
        assert not cache.store.has_blob(Digest.of_bytes(models["oldest"]["oldest.bin"]))
        assert cache.store.has_blob(Digest.of_bytes(shared))
        assert (results["pinned"].path / "shared.bin").read_bytes() == shared
        assert (mountpoint / "mounted.bin").read_bytes() == models["mounted"]["mounted.bin"]
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)


def test_no_eviction_below_the_high_watermark(small_fs: Path, fixtures: Fixtures) -> None:
    fixtures.raw_model("evict/calm:v1", {"w": os.urandom(1 << 20)})
    cache = ModelCache(ContentStore(small_fs / "cache"), make_client())
    result = cache.pull(fixtures.ref("evict/calm:v1"))
    outcome = evict(cache, high=0.99, low=0.5)
    assert outcome.evicted == [] and cache.get_record(result.record.key) is not None


def test_only_as_much_as_needed_is_evicted(small_fs: Path, fixtures: Fixtures) -> None:
    cache = ModelCache(ContentStore(small_fs / "cache"), make_client())
    keys = []
    for i in range(3):
        fixtures.raw_model(f"evict/seq{i}:v1", {"w": os.urandom(10 << 20)})
        keys.append(cache.pull(fixtures.ref(f"evict/seq{i}:v1")).record.key)
        os.utime(cache.record_path(keys[-1]), (2000 + i, 2000 + i))
    total = 64 << 20
    used = total - shutil.disk_usage(small_fs).free
    low = (used - (5 << 20)) / total  # freeing one 10 MiB model is enough
    outcome = evict(cache, high=0.0, low=low)
    assert outcome.evicted == [keys[0]]
