"""Every model layout and layer media type, pulled from a real registry into a real store."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest

from modelcache.assemble.options import PullOptions
from modelcache.cache import ModelCache
from modelcache.digest import Digest
from modelcache.errors import Kind, ModelCacheError
from modelcache.registry import mediatypes as mt
from modelcache.store.content import ContentStore
from tests.conftest import make_client
from tests.helpers.oci import Entry, Fixtures, compress, make_tar

COMPRESSIONS = [mt.Compression.TAR, mt.Compression.TAR_GZIP, mt.Compression.TAR_ZSTD]


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_modelpack_raw_layers_are_hardlinks_to_blobs(fixtures: Fixtures, cache: ModelCache) -> None:
    files = {"model.safetensors": os.urandom(300_000), "config.json": b'{"hidden": 8}', "sub/dir/tok.json": b"[]"}
    digest = fixtures.raw_model("raw/model:v1", files)
    result = cache.pull(fixtures.ref("raw/model:v1"))
    assert result.record.digest == digest
    assert result.record.layout == "modelpack"
    assert read_tree(result.path) == files
    weights = result.path / "model.safetensors"
    blob = cache.store.blob_path(Digest.of_bytes(files["model.safetensors"]))
    assert weights.stat().st_ino == blob.stat().st_ino
    assert weights.stat().st_mode & 0o222 == 0
    assert result.record.files == 3
    assert result.record.total_bytes == sum(len(v) for v in files.values())
    assert result.downloaded_bytes >= sum(len(v) for v in files.values())


def test_legacy_cnai_filepath_annotation(fixtures: Fixtures, cache: ModelCache) -> None:
    layer = fixtures.layer("legacy/model:v1", b"weights", "application/vnd.cncf.model.weight.v1.raw",
                           {mt.ANNOTATION_FILEPATH_LEGACY: "w.bin"})
    fixtures.manifest("legacy/model:v1", [layer])
    assert read_tree(cache.pull(fixtures.ref("legacy/model:v1")).path) == {"w.bin": b"weights"}


@pytest.mark.parametrize("compression", COMPRESSIONS, ids=lambda c: c.value)
@pytest.mark.parametrize("kind", mt.MODEL_KINDS)
def test_modelpack_tar_layers(fixtures: Fixtures, cache: ModelCache, compression: mt.Compression,
                              kind: str) -> None:
    name = f"tar/{kind.replace('.', '-')}-{compression.value.replace('+', '-')}:v1"
    entries = [Entry("docs/"), Entry("docs/a.txt", b"alpha" * 1000), Entry("b.py", b"print(1)", mode=0o755),
               Entry("link.txt", type=tarfile.SYMTYPE, linkname="docs/a.txt")]
    entries[0].type = tarfile.DIRTYPE
    fixtures.tar_model(name, entries, compression, kind)
    result = cache.pull(fixtures.ref(name))
    tree = read_tree(result.path)
    assert tree == {"docs/a.txt": b"alpha" * 1000, "b.py": b"print(1)", "link.txt": b"alpha" * 1000}
    assert os.readlink(result.path / "link.txt") == "docs/a.txt"
    assert (result.path / "b.py").stat().st_mode & 0o777 == 0o555
    assert (result.path / "docs").stat().st_mode & 0o777 == 0o555


def test_oras_generic_artifact_with_titles_and_unpacked_directory(fixtures: Fixtures, cache: ModelCache) -> None:
    directory = mt.image_layer("application/vnd.oci.image.layer.v1.tar+gzip")
    assert directory is mt.Compression.TAR_GZIP
    tarball = compress(make_tar([Entry("tokenizer.json", b"{}"), Entry("merges.txt", b"a b")]), directory)
    layers = [
        fixtures.layer("oras/art:v1", b"GGUF....", "application/octet-stream", {mt.ANNOTATION_TITLE: "model.gguf"}),
        fixtures.layer("oras/art:v1", tarball, "application/vnd.oci.image.layer.v1.tar+gzip",
                       {mt.ANNOTATION_TITLE: "tokenizer", mt.ANNOTATION_ORAS_UNPACK: "true"}),
    ]
    fixtures.manifest("oras/art:v1", layers, config_type=mt.OCI_EMPTY, artifact_type="application/vnd.example")
    result = cache.pull(fixtures.ref("oras/art:v1"))
    assert result.record.layout == "oras"
    assert read_tree(result.path) == {"model.gguf": b"GGUF....", "tokenizer/tokenizer.json": b"{}",
                                      "tokenizer/merges.txt": b"a b"}


def test_oras_layer_without_title_is_refused(fixtures: Fixtures, cache: ModelCache) -> None:
    layer = fixtures.layer("oras/notitle:v1", b"x", "application/octet-stream")
    fixtures.manifest("oras/notitle:v1", [layer], config_type=mt.OCI_EMPTY, artifact_type="application/x")
    with pytest.raises(ModelCacheError) as info:
        cache.pull(fixtures.ref("oras/notitle:v1"))
    assert info.value.kind is Kind.UNSUPPORTED
    assert "title" in str(info.value)
    assert list(cache.store.trees.iterdir()) == []


@pytest.mark.parametrize("compression", COMPRESSIONS, ids=lambda c: c.value)
def test_modelcar_image_layers_with_whiteouts(fixtures: Fixtures, cache: ModelCache,
                                              compression: mt.Compression) -> None:
    base = make_tar([Entry("usr/bin/tool", b"elf", mode=0o4755), Entry("models/old.bin", b"old"),
                     Entry("models/keep.json", b"{}"), Entry("models/dir/x", b"x")])
    upper = make_tar([Entry("models/.wh.old.bin"), Entry("models/new.bin", b"new"),
                      Entry("models/dir/.wh..wh..opq"), Entry("models/dir/y", b"y")])
    name = f"images/modelcar-{compression.value.replace('+', '-')}:v1"
    fixtures.image(name, [base, upper], compression)
    result = cache.pull(fixtures.ref(name))
    assert result.record.layout == "image"
    assert read_tree(result.path) == {"keep.json": b"{}", "new.bin": b"new", "dir/y": b"y"}


def test_modelcar_whiteout_of_models_dir_clears_lower_layers(fixtures: Fixtures, cache: ModelCache) -> None:
    fixtures.image("images/replaced:v1", [make_tar([Entry("models/a", b"a")]),
                                          make_tar([Entry(".wh.models"), Entry("models/b", b"b")])])
    assert read_tree(cache.pull(fixtures.ref("images/replaced:v1")).path) == {"b": b"b"}


def test_docker_v2_manifest_and_custom_subpath(fixtures: Fixtures, cache: ModelCache) -> None:
    fixtures.image("images/docker:v1", [make_tar([Entry("opt/model/w.bin", b"w"), Entry("models/other", b"o")])],
                   media_type=mt.DOCKER_MANIFEST)
    result = cache.pull(fixtures.ref("images/docker:v1"), PullOptions(subpath="/opt/model"))
    assert read_tree(result.path) == {"w.bin": b"w"}
    default = cache.pull(fixtures.ref("images/docker:v1"))
    assert read_tree(default.path) == {"other": b"o"}
    assert default.path != result.path


def test_image_without_models_dir_is_not_found(fixtures: Fixtures, cache: ModelCache) -> None:
    fixtures.image("images/nomodels:v1", [make_tar([Entry("etc/hostname", b"h")])])
    with pytest.raises(ModelCacheError) as info:
        cache.pull(fixtures.ref("images/nomodels:v1"))
    assert info.value.kind is Kind.NOT_FOUND


def test_index_selects_this_platform(fixtures: Fixtures, cache: ModelCache) -> None:
    amd = fixtures.raw_model("multi/model:amd64", {"arch": b"amd64"})
    arm = fixtures.raw_model("multi/model:arm64", {"arch": b"arm64"})
    index = fixtures.index("multi/model:v1", [(arm, {"os": "linux", "architecture": "arm64"}),
                                              (amd, {"os": "linux", "architecture": "amd64"})])
    result = cache.pull(fixtures.ref("multi/model:v1"))
    arch = {"x86_64": "amd64", "aarch64": "arm64"}[os.uname().machine]  # the machine's name, not the code's
    assert read_tree(result.path) == {"arch": arch.encode()}
    assert result.record.digest == index
    assert result.record.manifest_digest == {"amd64": amd, "arm64": arm}[arch]


def test_single_entry_index_is_followed(fixtures: Fixtures, cache: ModelCache) -> None:
    only = fixtures.raw_model("single/model:m", {"f": b"1"})
    fixtures.index("single/model:v1", [(only, {"os": "windows", "architecture": "s390x"})])
    assert read_tree(cache.pull(fixtures.ref("single/model:v1")).path) == {"f": b"1"}


def test_include_exclude_filters_skip_downloads(fixtures: Fixtures, cache: ModelCache, proxy_factory) -> None:
    proxy = proxy_factory()
    files = {"a.safetensors": b"A" * 1000, "b.safetensors": b"B" * 1000, "config.json": b"{}", "x/README.md": b"r"}
    Fixtures(fixtures.client, proxy.host).raw_model("filter/model:v1", files)
    proxied = ModelCache(ContentStore(cache.store.root), make_client())
    result = proxied.pull(f"{proxy.host}/filter/model:v1", PullOptions(include=("*.safetensors", "config.json"),
                                                                       exclude=("b.*",)))
    assert read_tree(result.path) == {"a.safetensors": b"A" * 1000, "config.json": b"{}"}
    assert str(Digest.of_bytes(b"B" * 1000)) not in proxy.stats.blob_gets
    full = proxied.pull(f"{proxy.host}/filter/model:v1")
    assert read_tree(full.path) == files


def test_digest_reference_hits_cache_without_network(fixtures: Fixtures, cache: ModelCache, registry) -> None:
    digest = fixtures.raw_model("offline/model:v1", {"w": b"123"})
    first = cache.pull(fixtures.ref(f"offline/model@{digest}"))
    assert not first.cached
    registry.process.send_signal(19)  # SIGSTOP: the registry cannot answer
    try:
        second = cache.pull(fixtures.ref(f"offline/model@{digest}"))
    finally:
        registry.process.send_signal(18)  # SIGCONT
    assert second.cached and second.downloaded_bytes == 0 and second.path == first.path


def test_tag_pull_after_cache_is_a_hit(fixtures: Fixtures, cache: ModelCache) -> None:
    fixtures.raw_model("hit/model:v1", {"w": b"1" * 10})
    cache.pull(fixtures.ref("hit/model:v1"))
    again = cache.pull(fixtures.ref("hit/model:v1"))
    assert again.cached and again.downloaded_bytes == 0


def test_unknown_tag_and_repository_are_not_found(fixtures: Fixtures, cache: ModelCache) -> None:
    fixtures.raw_model("exists/model:v1", {"w": b"1"})
    for ref in ("exists/model:nope", "nothing/here:v1"):
        with pytest.raises(ModelCacheError) as info:
            cache.pull(fixtures.ref(ref))
        assert info.value.kind is Kind.NOT_FOUND
