"""``ocimodel push`` packing small files (issue 24): a directory of many small files is pushed as its large
files plus one tar layer of the small ones per kind, by default only when there are many; a pull and a lazy
tree give the same files, the lazy tree with one request for the pack."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from modelcache import push
from modelcache.cache import ModelCache
from modelcache.push import PACK_AUTO_FILES, PACK_BELOW, layer_groups, push_directory
from modelcache.registry import mediatypes as mt
from modelcache.registry.reference import parse_reference
from modelcache.store.content import ContentStore
from tests.conftest import make_client
from tests.helpers.lazymodels import files_dir, lazy_model, read_all
from tests.helpers.proxy import RegistryProxy

TAR = mt.model_layer_type("weight.config", mt.Compression.TAR)


def test_layer_groups_pack_small_files_by_kind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Auto: small files are packed (one tar layer per kind, after the large files) only when there are more
    than PACK_AUTO_FILES of them; always and never as said; a pack full at PACK_LAYER_BYTES starts another."""
    def file(name: str, size: int):  # type: ignore[no-untyped-def]
        path = tmp_path / name
        with open(path, "wb") as out:
            out.truncate(size)
        return name, path, path.lstat()

    large = file("model.safetensors", PACK_BELOW)
    few = [file(f"c{i}.json", 10) for i in range(3)] + [file("run.py", 10)]
    assert layer_groups([large, *few], None) == [[large], *[[f] for f in few]]
    assert layer_groups([large, *few], False) == [[large], *[[f] for f in few]]
    assert layer_groups([large, *few], True) == [[large], few[:3], few[3:]]
    many = [file(f"d{i}.json", 10) for i in range(PACK_AUTO_FILES + 1)]
    assert layer_groups([*many, large], None) == [[large], many]
    monkeypatch.setattr(push, "PACK_LAYER_BYTES", 25)  # a pack holds at most 25 bytes: two files of 10
    assert layer_groups(few, True) == [few[:2], few[2:3], few[3:]]


def test_push_packs_a_directory_of_many_small_files(registry, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """By default a directory of many small files is pushed as its large files plus one tar layer of the small
    ones (named by their common directory), covered by the chunk index; a pull and a lazy tree give the same
    files, the lazy tree from one request for the pack."""
    files = files_dir(tmp_path / "model" / "conf", PACK_AUTO_FILES + 1, 100)
    shard = os.urandom(PACK_BELOW)
    (tmp_path / "model" / "model.safetensors").write_bytes(shard)
    ref = parse_reference(f"{registry.host}/many/packed:v1")
    client = make_client()
    push_directory(client, tmp_path / "model", ref)
    manifest = client.resolve(ref).manifest
    assert [(layer.media_type, layer.annotations[mt.ANNOTATION_FILEPATH]) for layer in manifest.layers] == [
        (mt.model_layer_type("weight", mt.Compression.RAW), "model.safetensors"), (TAR, "conf")]
    proxy = RegistryProxy(registry.host)
    try:
        model = lazy_model(tmp_path / "lazy", make_client(), f"{proxy.host}/many/packed:v1")
        model.build()
        assert model.index is not None and model.index.covers(manifest.layers[1].digest)
        assert proxy.stats.blob_gets[str(manifest.layers[1].digest)] == 1
        assert {f"conf/{n}": read_all(model, f"conf/{n}") for n in files} == {f"conf/{n}": d for n, d in files.items()}
        assert read_all(model, "model.safetensors") == shard
        model.close()
    finally:
        proxy.close()
    pulled = ModelCache(ContentStore(tmp_path / "pull"), make_client()).pull(str(ref)).path
    assert sorted(str(p.relative_to(pulled)) for p in pulled.rglob("*") if p.is_file()) == sorted(
        ["model.safetensors", *(f"conf/{n}" for n in files)])
    push_directory(client, tmp_path / "model", parse_reference(f"{registry.host}/many/unpacked:v1"), pack_small=False)
    assert len(client.resolve(parse_reference(f"{registry.host}/many/unpacked:v1")).manifest.layers) == len(files) + 1


