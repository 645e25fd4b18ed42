"""Tar layers that announce their one file in their annotations (ModelPack's filepath and file metadata, as
modctl and ``ocimodel push`` write them): the lazy tree is shown from the manifest alone, and a layer that
holds anything but the announced file breaks the model at the first read of it, or when the pull ends.
Counted by a proxy in front of a real registry; no FUSE (the tree is what a mount shows)."""

from __future__ import annotations

import json
import os
import tarfile
import threading
from pathlib import Path

import pytest

from modelcache.assemble.options import PullOptions
from modelcache.assemble.treerules import MAX_DEPTH
from modelcache.cache import ModelCache
from modelcache.errors import IntegrityError, Kind, UnsafeContent
from modelcache.lazy.model import LazyModel
from modelcache.lazy.state import LazyBroken
from modelcache.push import push_directory
from modelcache.registry import mediatypes as mt
from modelcache.registry.reference import parse_reference
from modelcache.store.content import ContentStore
from tests.conftest import make_client
from tests.helpers.lazymodels import files_dir, lazy_model, read_all, without_announcements
from tests.helpers.oci import Entry, Fixtures, make_tar
from tests.helpers.proxy import RegistryProxy

TAR = mt.model_layer_type("weight.config", mt.Compression.TAR)


def announcing(path: str, size: int, mode: int = 0o644, typeflag: object = 48) -> dict[str, str]:
    """The annotations modctl writes for a file layer."""
    return {mt.ANNOTATION_FILEPATH: path, mt.ANNOTATION_FILE_METADATA: json.dumps(
        {"name": path.rsplit("/", 1)[-1], "mode": mode, "uid": 0, "gid": 0, "size": size,
         "mtime": "2026-01-01T00:00:00Z", "typeflag": typeflag})}


def layer_gets(proxy: RegistryProxy, model: LazyModel) -> int:
    return sum(proxy.stats.blob_gets[str(layer.digest)] for layer in model.resolved.manifest.layers)


def test_announced_layers_show_the_tree_before_a_layer_is_read(registry, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """No layer is fetched to build the tree; each file's layer is fetched when the file is first read, and
    the bytes are the file's; the finished pull agrees with the tree shown. The same model without the
    annotations has its layers' headers read to build the tree."""
    files = files_dir(tmp_path / "model", 24)
    name = "announced/files:v1"
    push_directory(make_client(), tmp_path / "model", parse_reference(f"{registry.host}/{name}"),
                   compression=mt.Compression.TAR, pack_small=False)
    proxy = RegistryProxy(registry.host)
    try:
        model = lazy_model(tmp_path / "root", make_client(), f"{proxy.host}/{name}")
        model.build()
        assert model.announced and layer_gets(proxy, model) == 0
        assert sorted(model.root.children) == sorted(files)
        assert all(node.mode == 0o444 and node.size == 4096 for node in model.root.children.values())
        assert all(read_all(model, path) == data for path, data in files.items())
        assert layer_gets(proxy, model) == len(files)
        model.start_background().join()
        assert model.failure is None and model.final is not None
        model.check_usable()
        model.close()

        without_announcements(registry.host, name)
        plain = lazy_model(tmp_path / "plain", make_client(), f"{proxy.host}/{name}")
        before = layer_gets(proxy, plain)
        plain.build()
        assert not plain.announced and layer_gets(proxy, plain) - before == len(files)
        assert sorted(plain.root.children) == sorted(files)
        plain.close()
    finally:
        proxy.close()


def test_a_file_in_a_directory_with_its_directory_entries(fixtures: Fixtures, tmp_path: Path) -> None:
    """A layer may hold the directories on its file's path besides the file (as tar writers add them)."""
    data = b"weights" * 100
    name = "announced/nested:v1"
    fixtures.manifest(name, [fixtures.layer(
        "announced/nested", make_tar([Entry("sub/", type=tarfile.DIRTYPE, mode=0o755),
                                      Entry("sub/dir/", type=tarfile.DIRTYPE, mode=0o755),
                                      Entry("sub/dir/w.bin", data, mode=0o755)]),
        TAR, announcing("sub/dir/w.bin", len(data), mode=0o755))])
    model = lazy_model(tmp_path / "lazy", make_client(), fixtures.ref(name))
    model.build()
    assert model.announced
    node = model.lookup_path("sub/dir/w.bin")
    assert node is not None and node.mode == 0o555
    assert read_all(model, "sub/dir/w.bin") == data
    model.start_background().join()
    assert model.failure is None
    model.close()


LIES = {
    "another name": ([Entry("b.json", b"x" * 10)], "a.json"),
    "another size": ([Entry("a.json", b"x" * 11)], "a.json"),
    "another mode": ([Entry("a.json", b"x" * 10, mode=0o755)], "a.json"),
    "a second file": ([Entry("a.json", b"x" * 10), Entry("extra.json", b"y")], "a.json"),
    "a symlink": ([Entry("a.json", b"x" * 10), Entry("link", type=tarfile.SYMTYPE, linkname="a.json")], "a.json"),
    "a directory elsewhere": ([Entry("other/", type=tarfile.DIRTYPE), Entry("a.json", b"x" * 10)], "a.json"),
}


@pytest.mark.parametrize("lie", list(LIES), ids=lambda lie: lie.replace(" ", "-"))
def test_a_layer_holding_other_than_it_announces_breaks_the_model_at_the_first_read(
        fixtures: Fixtures, tmp_path: Path, lie: str) -> None:
    """Not a byte of a layer that holds anything but the one file it announces is served: the first read
    fails, and so does every later read of any file."""
    entries, path = LIES[lie]
    name = f"announced/lie-{lie.replace(' ', '-')}:v1"
    fixtures.manifest(name, [
        fixtures.layer(name.split(":")[0], make_tar(entries), TAR, announcing(path, 10)),
        fixtures.layer(name.split(":")[0], make_tar([Entry("good.json", b"{}")]), TAR, announcing("good.json", 2))])
    model = lazy_model(tmp_path / "lazy", make_client(), fixtures.ref(name))
    model.build()
    assert model.announced and sorted(model.root.children) == ["a.json", "good.json"]
    with pytest.raises(LazyBroken, match="its annotations announce one file, 'a.json'") as info:
        read_all(model, path)
    assert info.value.kind is Kind.INTEGRITY
    with pytest.raises(LazyBroken):
        read_all(model, "good.json")
    model.close()


def test_the_finished_pull_must_be_the_tree_announced(fixtures: Fixtures, tmp_path: Path) -> None:
    """A lying layer that nobody reads is found when the pull ends: the model is broken, nothing stacked."""
    name = "announced/unread-lie:v1"
    fixtures.manifest(name, [
        fixtures.layer(name.split(":")[0], make_tar([Entry("b.json", b"x" * 10)]), TAR, announcing("a.json", 10)),
        fixtures.layer(name.split(":")[0], make_tar([Entry("good.json", b"{}")]), TAR, announcing("good.json", 2))])
    model = lazy_model(tmp_path / "lazy", make_client(), fixtures.ref(name))
    model.build()
    assert read_all(model, "good.json") == b"{}"
    model.start_background().join()
    assert model.failure is not None and model.failure.kind is Kind.INTEGRITY
    assert "the finished tree is not the one the layers' annotations announced" in str(model.failure)
    with pytest.raises(LazyBroken):
        read_all(model, "good.json")
    model.close()


UNUSABLE = {
    "no metadata": {mt.ANNOTATION_FILEPATH: "a.json"},
    "a directory's metadata": announcing("a.json", 10, typeflag=53),
    "a size its layer cannot hold": announcing("a.json", 1 << 20),
    "a path out of the tree": announcing("../a.json", 10),
    "metadata that is not JSON": {mt.ANNOTATION_FILEPATH: "a.json", mt.ANNOTATION_FILE_METADATA: "{"},
    "a size that is not a number": {mt.ANNOTATION_FILEPATH: "a.json",
                                    mt.ANNOTATION_FILE_METADATA: json.dumps({"size": "10", "typeflag": 48})},
}


@pytest.mark.parametrize("kind", list(UNUSABLE), ids=lambda kind: kind.replace(" ", "-"))
def test_a_model_with_a_layer_announcing_nothing_usable_has_every_header_read(
        fixtures: Fixtures, tmp_path: Path, kind: str) -> None:
    """One layer without a usable announcement: the tree is built from every layer's headers, as before."""
    name = f"announced/unusable-{list(UNUSABLE).index(kind)}:v1"
    fixtures.manifest(name, [
        fixtures.layer(name.split(":")[0], make_tar([Entry("a.json", b"x" * 10)]), TAR, UNUSABLE[kind]),
        fixtures.layer(name.split(":")[0], make_tar([Entry("good.json", b"{}")]), TAR, announcing("good.json", 2))])
    model = lazy_model(tmp_path / "lazy", make_client(), fixtures.ref(name))
    model.build()
    assert not model.announced
    assert sorted(model.root.children) == ["a.json", "good.json"]
    assert all(node.source is not None for node in model.root.children.values())
    assert read_all(model, "a.json") == b"x" * 10
    model.close()


def file_layer(fixtures: Fixtures, repo: str, path: str, data: bytes, mode: int = 0o644) -> dict[str, object]:
    """An honest single-file layer as modctl writes it: the tar member named by the path it announces."""
    return fixtures.layer(repo, make_tar([Entry(path, data, mode=mode)]), TAR, announcing(path, len(data), mode))


@pytest.mark.parametrize("options", [PullOptions(exclude=("*.json",)), PullOptions(include=("*.bin",))],
                         ids=["exclude", "include"])
def test_a_file_left_out_by_a_filter_leaves_its_directories(fixtures: Fixtures, tmp_path: Path,
                                                           options: PullOptions) -> None:
    """As extraction does, the directories of a file a filter leaves out are in the tree: the finished pull
    agrees with the tree shown (an honest model is not broken)."""
    name = f"announced/filtered:{options.variant()}"
    repository = name.split(":")[0]
    fixtures.manifest(name, [file_layer(fixtures, repository, "model.bin", b"W" * 100),
                             file_layer(fixtures, repository, "tokenizer/tokenizer.json", b"{}")])
    client = make_client()
    model = LazyModel(ModelCache(ContentStore(tmp_path / "lazy"), client),
                      client.resolve(parse_reference(fixtures.ref(name))), options)
    model.build()
    assert model.announced and sorted(model.root.children) == ["model.bin", "tokenizer"]
    assert not model.root.children["tokenizer"].children
    assert read_all(model, "model.bin") == b"W" * 100
    model.start_background().join()
    assert model.failure is None and model.final is not None
    model.close()


@pytest.mark.parametrize("marker", [".wh.secret.json", ".wh..wh..opq"])
def test_a_whiteout_is_never_taken_for_an_announced_file(fixtures: Fixtures, tmp_path: Path, marker: str) -> None:
    """A layer announcing a whiteout as its file: its headers are read, and what it removes is not shown."""
    name = f"announced/whiteout-{len(marker)}:v1"
    repository = name.split(":")[0]
    fixtures.manifest(name, [file_layer(fixtures, repository, "secret.json", b"removed by the next layer"),
                             fixtures.layer(repository, make_tar([Entry(marker, b"")]), TAR, announcing(marker, 0))])
    model = lazy_model(tmp_path / "lazy", make_client(), fixtures.ref(name))
    model.build()
    assert not model.announced and "secret.json" not in model.root.children
    model.close()


def test_metadata_nested_past_the_parser_is_refused_cleanly(fixtures: Fixtures, tmp_path: Path) -> None:
    """JSON nested deep enough to exhaust the parser's stack: a tar layer's announcement is unusable (its
    headers are read); a raw layer's metadata fails the plan with a clear error, not a RecursionError."""
    deep = {mt.ANNOTATION_FILEPATH: "a.json", mt.ANNOTATION_FILE_METADATA: "[" * 60_000}
    name = "announced/deep-json:v1"
    fixtures.manifest(name, [fixtures.layer("announced/deep-json", make_tar([Entry("a.json", b"x")]), TAR, deep)])
    model = lazy_model(tmp_path / "lazy", make_client(), fixtures.ref(name))
    model.build()
    assert not model.announced and read_all(model, "a.json") == b"x"
    model.close()
    raw = "announced/deep-json-raw:v1"
    fixtures.manifest(raw, [fixtures.layer("announced/deep-json-raw", b"x", mt.model_layer_type(
        "weight.config", mt.Compression.RAW), deep)])
    with pytest.raises(IntegrityError, match="is not valid JSON"):
        lazy_model(tmp_path / "raw", make_client(), fixtures.ref(raw))


def test_an_announced_path_deeper_than_allowed_is_not_taken(fixtures: Fixtures, tmp_path: Path) -> None:
    """A path nested deeper than extraction allows is no announcement: the layer's headers are read, and
    refused as extraction refuses them."""
    path = "d/" * (MAX_DEPTH + 10) + "x"
    name = "announced/deep-path:v1"
    fixtures.manifest(name, [fixtures.layer("announced/deep-path", make_tar([Entry(path, b"x")]), TAR,
                                            announcing(path, 1))])
    model = lazy_model(tmp_path / "lazy", make_client(), fixtures.ref(name))
    with pytest.raises(UnsafeContent, match="deep"):
        model.build()
    assert not model.announced
    model.close()


def test_the_checks_of_all_layers_share_the_models_budget(fixtures: Fixtures, tmp_path: Path) -> None:
    """Each layer alone fits the model's limits but all together do not: a check that takes the model over
    them breaks it (as the pull would refuse it), so a hostile model cannot make each read index a model's
    worth of headers."""
    name = "announced/budget:v1"
    layers = [fixtures.layer("announced/budget",
                             make_tar([Entry("d/", type=tarfile.DIRTYPE)] * 20 + [Entry(f"d/f{i}", b"z" * 5)]), TAR,
                             announcing(f"d/f{i}", 5)) for i in range(3)]
    fixtures.manifest(name, layers)
    model = lazy_model(tmp_path / "lazy", make_client(), fixtures.ref(name), max_model_files=50)
    model.build()
    assert read_all(model, "d/f0") == b"z" * 5 and read_all(model, "d/f1") == b"z" * 5
    with pytest.raises(LazyBroken, match="maxModelFiles"):
        read_all(model, "d/f2")
    model.close()


def test_concurrent_first_reads_of_a_file_check_its_layer_once(fixtures: Fixtures, tmp_path: Path) -> None:
    """Eight readers start on one announced file at once: its layer is fetched once (one check), and each
    gets the file's bytes."""
    data = os.urandom(64 << 10)
    name = "announced/race:v1"
    fixtures.manifest(name, [file_layer(fixtures, "announced/race", "w.bin", data)])
    proxy = RegistryProxy(fixtures.host)
    try:
        model = lazy_model(tmp_path / "lazy", make_client(), f"{proxy.host}/{name}")
        model.build()
        node = model.lookup_path("w.bin")
        assert node is not None
        start = threading.Barrier(8)
        results: list[bool] = []

        def reader(i: int) -> None:
            start.wait()
            results.append(model.read_node(node, i * 4096, 4096) == data[i * 4096:(i + 1) * 4096])
        threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert results == [True] * 8
        assert layer_gets(proxy, model) == 1
        model.close()
    finally:
        proxy.close()


def test_a_mode_announced_but_not_held_breaks_the_model_when_the_pull_ends(fixtures: Fixtures,
                                                                          tmp_path: Path) -> None:
    """A file shown executable whose layer holds it not executable, never read: found when the pull ends."""
    name = "announced/mode:v1"
    fixtures.manifest(name, [fixtures.layer("announced/mode", make_tar([Entry("run.sh", b"echo hi", mode=0o644)]),
                                            TAR, announcing("run.sh", 7, mode=0o755))])
    model = lazy_model(tmp_path / "lazy", make_client(), fixtures.ref(name))
    model.build()
    node = model.lookup_path("run.sh")
    assert node is not None and node.mode == 0o555
    model.start_background().join()
    assert model.failure is not None and model.failure.kind is Kind.INTEGRITY
    model.close()
