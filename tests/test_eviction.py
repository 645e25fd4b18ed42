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

from modelcache.assemble.options import PullOptions
from modelcache.cache import ModelCache
from modelcache.digest import Digest
from modelcache.errors import Kind, ModelCacheError, StoreFull
from modelcache.records import PullResult
from modelcache.registry import mediatypes as mt
from modelcache.registry.hosts import HostsConfig
from modelcache.registry.reference import parse_reference
from modelcache.settings import Settings
from modelcache.singleflight import PullFlights
from modelcache.store.content import ContentStore
from modelcache.upkeep.eviction import evict
from modelcache.upkeep.pins import Pins
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


# -- a need the cache could never hold evicts nothing (issue 22) ------------------------------------------

def flights_on(root: Path, **settings: object) -> PullFlights:
    return PullFlights(Settings(root=root, hosts=HostsConfig(plain_http=True), **settings))  # type: ignore[arg-type]


def cached_models(fixtures: Fixtures, flights: PullFlights, names: list[str], size: int) -> list[str]:
    keys = []
    for i, name in enumerate(names):
        fixtures.raw_model(f"evict/{name}:v1", {"w": os.urandom(size)})
        keys.append(pull_through(flights, fixtures.ref(f"evict/{name}:v1")).record.key)
        os.utime(flights.cache.record_path(keys[-1]), (3000 + i, 3000 + i))
    return keys


def pull_through(flights: PullFlights, ref: str) -> PullResult:
    return flights.start(parse_reference(ref), PullOptions(), None, "").future.result(timeout=60)


def declaring(fixtures: Fixtures, name: str, *sizes: int) -> str:
    """A model whose layers declare ``sizes`` (their real blobs are a few bytes)."""
    fixtures.manifest(name, [fixtures.layer(name, os.urandom(64), mt.model_layer_type("weight", mt.Compression.RAW),
                                            {mt.ANNOTATION_FILEPATH: f"w{i}"}, size=size)
                             for i, size in enumerate(sizes)])
    return fixtures.ref(name)


def test_a_manifest_declaring_16_tib_evicts_nothing(small_fs: Path, fixtures: Fixtures) -> None:
    flights = flights_on(small_fs / "cache")
    keys = cached_models(fixtures, flights, ["victim-a", "victim-b"], 10 << 20)
    with pytest.raises(ModelCacheError) as info:
        pull_through(flights, declaring(fixtures, "evict/huge:v1", 16 << 40))
    assert info.value.kind is Kind.UNSAFE_CONTENT
    assert str(16 << 40) in str(info.value) and str(1 << 40) in str(info.value)  # declared size and the limit
    assert [flights.cache.get_record(k) is not None for k in keys] == [True, True]


def test_a_need_larger_than_the_filesystem_evicts_nothing(small_fs: Path, fixtures: Fixtures) -> None:
    flights = flights_on(small_fs / "cache")
    keys = cached_models(fixtures, flights, ["stay-a", "stay-b"], 10 << 20)
    with pytest.raises(StoreFull) as info:
        pull_through(flights, declaring(fixtures, "evict/too-big:v1", 100 << 20))  # the filesystem holds 64 MiB
    assert "could ever hold" in str(info.value)
    assert [flights.cache.get_record(k) is not None for k in keys] == [True, True]


def test_a_need_that_eviction_can_meet_still_evicts(small_fs: Path, fixtures: Fixtures) -> None:
    flights = flights_on(small_fs / "cache")
    keys = cached_models(fixtures, flights, ["lru-a", "lru-b"], 20 << 20)
    fixtures.raw_model("evict/big:v1", {"w": os.urandom(30 << 20)})
    pull_through(flights, fixtures.ref("evict/big:v1"))
    assert flights.cache.get_record(keys[0]) is None and flights.cache.get_record(keys[1]) is not None


def test_max_model_bytes_counts_the_whole_model(small_fs: Path, fixtures: Fixtures) -> None:
    """Each layer is under the limit; together they are over it: refused before any download or eviction."""
    flights = flights_on(small_fs / "cache", max_model_bytes=15 << 20)
    keys = cached_models(fixtures, flights, ["limit-a"], 10 << 20)
    ref = declaring(fixtures, "evict/two-layers:v1", 10 << 20, 10 << 20)
    with pytest.raises(ModelCacheError) as info:
        pull_through(flights, ref)
    assert info.value.kind is Kind.UNSAFE_CONTENT and str(20 << 20) in str(info.value)
    assert "maxModelGiB" in str(info.value)
    assert flights.cache.get_record(keys[0]) is not None
    assert not list(flights.cache.store.ingest_dir.iterdir())  # nothing was downloaded


def test_a_declared_size_that_never_arrives_evicts_nothing(small_fs: Path, fixtures: Fixtures) -> None:
    """A layer declaring a little more than the free space (and less than eviction could free) evicts nothing
    while its bytes do not come: eviction is for bytes that fill the disk, not for declared sizes."""
    flights = flights_on(small_fs / "cache")
    keys = cached_models(fixtures, flights, ["kept-a", "kept-b", "kept-c"], 12 << 20)
    free = shutil.disk_usage(small_fs).free
    with pytest.raises(ModelCacheError) as info:
        pull_through(flights, declaring(fixtures, "evict/liar:v1", free + (8 << 20)))
    assert info.value.kind is not Kind.RESOURCE_EXHAUSTED, info.value
    assert [flights.cache.get_record(k) is not None for k in keys] == [True, True, True]
