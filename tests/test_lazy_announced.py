"""Tar layers that announce their one file in their annotations (ModelPack's filepath and file metadata, as
modctl and ``ocimodel push`` write them): the lazy tree is shown from the manifest alone, and a layer that
holds anything but the announced file breaks the model at the first read of it, or when the pull ends.
Counted by a proxy in front of a real registry; no FUSE (the tree is what a mount shows)."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from modelcache.errors import Kind
from modelcache.lazy.model import LazyModel
from modelcache.lazy.state import LazyBroken
from modelcache.push import push_directory
from modelcache.registry import mediatypes as mt
from modelcache.registry.reference import parse_reference
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
