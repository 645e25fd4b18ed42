"""One view: for every layout and every hostile case, the lazy view of a model (built from tar headers read
by range) is exactly the tree the pull assembles (same paths, kinds, modes, link targets, bytes), or both
refuse it for the same reason."""

from __future__ import annotations

import hashlib
import os
import stat
import tarfile
from pathlib import Path

import pytest

from modelcache.assemble.options import PullOptions
from modelcache.cache import ModelCache
from modelcache.errors import ModelCacheError
from modelcache.lazy.model import LazyModel, Node
from modelcache.registry import mediatypes as mt
from modelcache.registry.reference import parse_reference
from modelcache.store.content import ContentStore
from tests.conftest import make_client
from tests.helpers.oci import Entry, Fixtures, make_tar
from tests.test_hostile import HOSTILE_TARS

TAR = mt.Compression.TAR
LONG = "deep/" + "d" * 120 + "/" + "f" * 110 + ".bin"


def bind_view(root: Path) -> dict[str, tuple[str, int, str]]:
    """path -> (kind, permission bits, content sha256 or link target) of an assembled tree."""
    view = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                view[rel] = ("symlink", 0, os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                view[rel] = ("dir", 0, "")
            else:
                view[rel] = ("file", st.st_mode & 0o777, hashlib.sha256(path.read_bytes()).hexdigest())
    return view


def lazy_view(model: LazyModel) -> dict[str, tuple[str, int, str]]:
    view = {}

    def walk(node: Node, prefix: str) -> None:
        for name, child in node.children.items():
            rel = f"{prefix}{name}"
            if child.kind == "symlink":
                view[rel] = ("symlink", 0, child.target)
            elif child.kind == "dir":
                view[rel] = ("dir", 0, "")
                walk(child, rel + "/")
            else:
                view[rel] = ("file", child.mode & 0o777,
                             hashlib.sha256(model.read_node(child, 0, child.size)).hexdigest())
    walk(model.root, "")
    return view


def outcome(fixtures: Fixtures, tmp_path: Path, name: str, options: PullOptions = PullOptions()
            ) -> tuple[object, object]:
    ref = parse_reference(fixtures.ref(name))
    try:
        bind: object = bind_view(ModelCache(ContentStore(tmp_path / "bind"), make_client()).pull(ref, options).path)
    except ModelCacheError as exc:
        bind = exc.kind
    lazy_cache = ModelCache(ContentStore(tmp_path / "lazy"), make_client())
    try:
        model = LazyModel(lazy_cache, lazy_cache.client.resolve(ref), options)
        model.build()
        lazy: object = lazy_view(model)
        model.close()
    except ModelCacheError as exc:
        lazy = exc.kind
    return bind, lazy


LAYOUTS: dict[str, list[list[Entry]]] = {
    "plain": [[Entry("config.json", b"{}"), Entry("weights/part-1.bin", os.urandom(70_000), mode=0o600),
               Entry("run.sh", b"#!/bin/sh\n", mode=0o755)]],
    "links": [[Entry("w/a.bin", b"A" * 5000), Entry("w/b.bin", type=tarfile.LNKTYPE, linkname="w/a.bin"),
               Entry("latest", type=tarfile.SYMTYPE, linkname="w/a.bin"),
               Entry("w/up", type=tarfile.SYMTYPE, linkname="../config"), Entry("config", b"c")]],
    "long-names": [[Entry(LONG, b"long"), Entry("short", type=tarfile.SYMTYPE, linkname=LONG),
                    Entry("hard", type=tarfile.LNKTYPE, linkname=LONG)]],
    "whiteouts": [[Entry("a/x", b"x"), Entry("a/y", b"y"), Entry("b/old", b"o"), Entry("c/keep", b"k")],
                  [Entry("a/.wh.x", b""), Entry("b/.wh..wh..opq", b""), Entry("b/new", b"n"),
                   Entry("c/keep", b"replaced")]],
    "dir-replaced-by-file": [[Entry("p/q", b"q")], [Entry("p", b"now a file")]],
}


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT], ids=["pax", "gnu"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_lazy_view_equals_the_assembled_tree(fixtures: Fixtures, tmp_path: Path, layout: str, fmt: int) -> None:
    name = f"view/{layout}-{'pax' if fmt == tarfile.PAX_FORMAT else 'gnu'}:v1"
    layers = [fixtures.layer(name, make_tar(entries, fmt), mt.model_layer_type("weight", TAR))
              for entries in LAYOUTS[layout]]
    fixtures.manifest(name, layers)
    bind, lazy = outcome(fixtures, tmp_path, name)
    assert isinstance(bind, dict) and bind, bind
    assert lazy == bind


def test_filters_give_the_same_view(fixtures: Fixtures, tmp_path: Path) -> None:
    name = "view/filtered:v1"
    fixtures.manifest(name, [fixtures.layer(name, make_tar(LAYOUTS["plain"][0] + LAYOUTS["links"][0]),
                                            mt.model_layer_type("weight", TAR))])
    for options in (PullOptions(include=("w/*", "*.json")), PullOptions(exclude=("weights/*",))):
        bind, lazy = outcome(fixtures, tmp_path / str(hash(options)), name, options)
        assert isinstance(bind, dict) and lazy == bind


@pytest.mark.parametrize("case", sorted(HOSTILE_TARS))
def test_hostile_tars_are_refused_alike(fixtures: Fixtures, tmp_path: Path, case: str) -> None:
    name = f"view/hostile-{case}:v1"
    fixtures.tar_model(name, HOSTILE_TARS[case][0], TAR)
    bind, lazy = outcome(fixtures, tmp_path, name)
    assert not isinstance(bind, dict), f"the pull accepted {case}"
    assert lazy == bind
