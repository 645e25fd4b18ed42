"""The lazy tree of a model of many tar layers (issue 24): their headers read for many layers at once (a
bounded pool), a small layer fetched whole in one verified request, and the charges, checks and errors those
of indexing one layer after another; push packing small files into one tar layer per kind. Counted by a
proxy in front of a real registry; no FUSE (the tree is what a mount shows)."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest
import requests

from modelcache.cache import ModelCache
from modelcache.digest import Digest
from modelcache.errors import IntegrityError, ModelCacheError, UnsafeContent
from modelcache.lazy.model import LazyModel
from modelcache.lazy.tarindex import INDEX_WORKERS
from modelcache.push import push_directory
from modelcache.registry import mediatypes as mt
from modelcache.registry.reference import parse_reference
from modelcache.store.content import ContentStore
from tests.conftest import make_client
from tests.helpers.lazymodels import files_dir, lazy_model, read_all, without_announcements
from tests.helpers.oci import Entry, Fixtures, compress, make_tar
from tests.helpers.proxy import ProxyBehaviour, RegistryProxy

TAR = mt.model_layer_type("weight.config", mt.Compression.TAR)


def lazy(root: Path, host: str, name: str, **limits: int) -> LazyModel:
    return lazy_model(root, make_client(), f"{host}/{name}", **limits)


def layer_digests(proxy: RegistryProxy, name: str) -> list[str]:
    client = make_client()
    return [str(layer.digest) for layer in client.resolve(parse_reference(f"{proxy.host}/{name}")).manifest.layers]


@pytest.mark.parametrize("chunk_index", [True, False], ids=["with-index", "without-index"])
def test_small_tar_layers_are_fetched_whole_once_and_verified(registry, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                             chunk_index: bool) -> None:
    """One request per small tar layer, a plain GET of the whole blob (no range of it read header by header,
    none recorded as served: it is verified); a file read afterwards needs no request."""
    files = files_dir(tmp_path / "model", 40)
    name = f"many/small-{str(chunk_index).lower()}:v1"
    push_directory(make_client(), tmp_path / "model", parse_reference(f"{registry.host}/{name}"),
                   compression=mt.Compression.TAR, chunk_index=chunk_index, pack_small=False)
    without_announcements(registry.host, name)
    proxy = RegistryProxy(registry.host)
    try:
        model = lazy(tmp_path / "root", proxy.host, name)
        model.build()
        digests = layer_digests(proxy, name)
        assert len(digests) == 40
        assert {d: proxy.stats.blob_gets[d] for d in digests} == {d: 1 for d in digests}
        blob_requests = [headers for method, path, headers in proxy.stats.requests
                         if method == "GET" and any(d in path for d in digests)]
        assert blob_requests and not any("range" in headers for headers in blob_requests)
        assert sorted(model.root.children) == sorted(files)
        before = len(proxy.stats.requests)
        assert all(read_all(model, path) == data for path, data in files.items())
        assert len(proxy.stats.requests) == before
        assert not list((tmp_path / "root").rglob("*.ranges"))
        model.close()
    finally:
        proxy.close()


def test_tar_layers_are_indexed_concurrently(registry, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The headers of many layers are read at once, never more than INDEX_WORKERS layers at a time."""
    files_dir(tmp_path / "model", 3 * INDEX_WORKERS)
    push_directory(make_client(), tmp_path / "model", parse_reference(f"{registry.host}/many/pool:v1"),
                   compression=mt.Compression.TAR, pack_small=False)
    without_announcements(registry.host, "many/pool:v1")
    proxy = RegistryProxy(registry.host, ProxyBehaviour(blob_delay=0.2))
    try:
        model = lazy(tmp_path / "root", proxy.host, "many/pool:v1")
        model.build()
        assert len(model.root.children) == 3 * INDEX_WORKERS
        assert 1 < proxy.stats.blob_gets_peak <= INDEX_WORKERS + 1  # + the chunk index
        model.close()
    finally:
        proxy.close()


def test_tar_layers_are_indexed_last_first_and_those_the_pull_committed_are_read_locally(
        registry, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The background pull fetches layers first to last: the index starts from the last one (the first blob
    asked for is one of the last INDEX_WORKERS layers), and a layer whose blob is committed is read from the
    store, not fetched again."""
    files_dir(tmp_path / "model", 3 * INDEX_WORKERS)
    name = "many/order:v1"
    push_directory(make_client(), tmp_path / "model", parse_reference(f"{registry.host}/{name}"),
                   compression=mt.Compression.TAR, pack_small=False)
    without_announcements(registry.host, name)
    proxy = RegistryProxy(registry.host)
    try:
        digests = layer_digests(proxy, name)
        model = lazy(tmp_path / "root", proxy.host, name)
        committed = digests[:INDEX_WORKERS]  # as the background pull would have by now
        for digest in committed:
            data = requests.get(f"http://{registry.host}/v2/many/order/blobs/{digest}", timeout=30).content
            model.cache.store.put_bytes(Digest.parse(digest), data)
        model.build()
        assert len(model.root.children) == 3 * INDEX_WORKERS
        assert {d: proxy.stats.blob_gets[d] for d in digests} == {d: int(d not in committed) for d in digests}
        first = next(path.rsplit("/", 1)[-1] for method, path, _ in proxy.stats.requests
                     if method == "GET" and any(path.endswith(d) for d in digests))
        assert first in digests[-INDEX_WORKERS:]
        model.close()
    finally:
        proxy.close()


def test_a_mixed_model_is_the_tree_a_pull_builds(fixtures: Fixtures, tmp_path: Path, cache: ModelCache) -> None:
    """Raw layers, small tar layers, a tar layer larger than a range chunk (its headers read by range), a
    later layer replacing a file and removing another: the lazy tree serves what the pull extracts."""
    big = os.urandom(5 << 20)
    layers = [
        fixtures.layer("many/mixed", b"raw bytes", mt.model_layer_type("weight", mt.Compression.RAW),
                       {mt.ANNOTATION_FILEPATH: "raw.bin"}),
        fixtures.layer("many/mixed", make_tar([Entry("big/shard.bin", big), Entry("big/note.txt", b"first")]), TAR),
        fixtures.layer("many/mixed", make_tar([Entry("a/one.txt", b"one"), Entry("a/two.txt", b"two")]), TAR),
        fixtures.layer("many/mixed", make_tar([Entry("big/note.txt", b"second"), Entry("a/.wh.two.txt")]), TAR),
    ]
    fixtures.manifest("many/mixed:v1", layers)
    proxy = RegistryProxy(fixtures.host)
    try:
        model = lazy(tmp_path / "lazy", proxy.host, "many/mixed:v1")
        model.build()
        large = layers[1]["digest"]
        assert any(method == "GET" and large in path and "range" in headers
                   for method, path, headers in proxy.stats.requests)
        pulled = cache.pull(fixtures.ref("many/mixed:v1")).path
        expected = {str(p.relative_to(pulled)): p.read_bytes() for p in pulled.rglob("*") if p.is_file()}
        assert sorted(expected) == ["a/one.txt", "big/note.txt", "big/shard.bin", "raw.bin"]
        assert {path: read_all(model, path) for path in expected} == expected
        assert model.lookup_path("a/two.txt") is None
        model.close()
    finally:
        proxy.close()


def refusal(call) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(ModelCacheError) as info:
        call()
    return str(info.value)


@pytest.mark.parametrize("case", ["over-at-layer-7", "budget-before-bad-layer", "bad-layer-before-budget"])
def test_refusals_are_those_of_one_layer_after_another(fixtures: Fixtures, tmp_path: Path, case: str) -> None:
    """Layers indexed at once are charged to the model's budget in layer order: the lazy build refuses a model
    with the very error the pull's extraction (one layer after another) gives, and a model over its budget
    stops the indexing of other layers: each of the (at most two) passes over the layers stops once what it
    indexed is over (about 7 layers here) and the layers in flight end, so most of 60 layers are not fetched."""
    name = f"many/refused-{case}:v1"
    ok = [make_tar([Entry(f"l{i}/f{j}", os.urandom(64)) for j in range(2)]) for i in range(60)]  # 3 entries each
    bad = make_tar([Entry("x", b"file"), Entry("x/y", b"through a file")])
    if case == "budget-before-bad-layer":
        ok[3] = make_tar([Entry(f"wide/f{j}", b"") for j in range(40)])
        ok[5] = bad
    elif case == "bad-layer-before-budget":
        ok[3] = bad
        ok[5] = make_tar([Entry(f"wide/f{j}", b"") for j in range(40)])
    fixtures.manifest(name, [fixtures.layer(name.split(":")[0], data, TAR) for data in ok])
    proxy = RegistryProxy(fixtures.host)
    try:
        model = lazy(tmp_path / "lazy", proxy.host, name, max_model_files=20)
        lazy_error = refusal(model.build)
        model.close()
        fetched = sum(1 for digest in layer_digests(proxy, name) if proxy.stats.blob_gets[digest])
    finally:
        proxy.close()
    pull = ModelCache(ContentStore(tmp_path / "pull"), make_client(), max_model_files=20)
    assert lazy_error == refusal(lambda: pull.pull(fixtures.ref(name)))
    digests = [str(Digest.of_bytes(data)) for data in ok]
    if case == "bad-layer-before-budget":
        assert lazy_error.startswith(f"layer {digests[3]}: 'x/y' goes through 'x'")
    else:
        layer = 6 if case == "over-at-layer-7" else 3
        assert lazy_error.startswith(f"layer {digests[layer]}: the model has more than 20 files")
        assert fetched <= 2 * (7 + INDEX_WORKERS) < len(ok)


def test_a_wrong_small_layer_fails_the_build(fixtures: Fixtures, tmp_path: Path) -> None:
    """A small tar layer whose bytes do not match its digest fails the build at once (it is verified whole)."""
    data = make_tar([Entry("config.json", b"{}")])
    fixtures.manifest("many/wrong:v1", [fixtures.layer("many/wrong", data, TAR)])
    proxy = RegistryProxy(fixtures.host, ProxyBehaviour(corrupt_blobs=True))
    try:
        model = lazy(tmp_path / "lazy", proxy.host, "many/wrong:v1")
        with pytest.raises(IntegrityError, match="no endpoint answered the blob its digest names"):
            model.build()
        model.close()
        assert not any(model.cache.store.iter_blobs())  # nothing committed, nothing half-written left
        assert not list(model.cache.store.ingest_dir.iterdir())
    finally:
        proxy.close()


def test_unsafe_content_is_refused_alike(fixtures: Fixtures, tmp_path: Path) -> None:
    """A hard link to a file of another layer is refused by the lazy index as by extraction."""
    name = "many/link:v1"
    fixtures.manifest(name, [fixtures.layer("many/link", make_tar([Entry("a", b"x")]), TAR),
                             fixtures.layer("many/link", make_tar([Entry("b", type=tarfile.LNKTYPE, linkname="a")]),
                                            TAR)])
    model = lazy(tmp_path / "lazy", fixtures.host, name)
    with pytest.raises(UnsafeContent) as info:
        model.build()
    model.close()
    pull = ModelCache(ContentStore(tmp_path / "pull"), make_client())
    assert str(info.value) == refusal(lambda: pull.pull(fixtures.ref(name)))


@pytest.mark.parametrize("first", ["raw", "tar"])
def test_a_compressed_layer_after_a_readable_one_holds_back_the_whole_tree(fixtures: Fixtures, tmp_path: Path,
                                                                          first: str) -> None:
    """A compressed layer may replace (or remove) a file an earlier, readable layer holds: such a model shows
    nothing until the pull has finished, and then the files it builds, never the replaced bytes. A compressed
    layer before the readable ones holds nothing back."""
    name = f"many/replaced-{first}:v1"
    repository = name.split(":")[0]
    earlier = (fixtures.layer(repository, b"X" * 10, mt.model_layer_type("weight", mt.Compression.RAW),
                              {mt.ANNOTATION_FILEPATH: "a.json"}) if first == "raw" else
               fixtures.layer(repository, make_tar([Entry("a.json", b"X" * 10)]), TAR))
    later = fixtures.layer(repository, compress(make_tar([Entry("a.json", b"Y" * 10)]), mt.Compression.TAR_GZIP),
                           mt.model_layer_type("weight", mt.Compression.TAR_GZIP))
    fixtures.manifest(name, [earlier, later])
    model = lazy(tmp_path / "lazy", fixtures.host, name)
    model.build()
    assert model.pending and not model.root.children
    model.start_background().join()
    assert model.failure is None
    model.adopt_final_tree()
    assert read_all(model, "a.json") == b"Y" * 10
    model.close()

    name = f"{repository}:compressed-first"
    fixtures.manifest(name, [later, earlier])
    model = lazy(tmp_path / "first", fixtures.host, name)
    model.build()
    assert model.pending and read_all(model, "a.json") == b"X" * 10  # the last layer's: shown at once
    model.close()
