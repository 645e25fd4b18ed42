"""A model directory of small files, and the lazy tree of a model built in-process (what a lazy mount shows)."""

from __future__ import annotations

import os
from pathlib import Path

from modelcache.assemble.options import PullOptions
from modelcache.cache import ModelCache
from modelcache.lazy.model import LazyModel
from modelcache.registry.client import RegistryClient
from modelcache.registry.reference import parse_reference
from modelcache.store.content import ContentStore


def files_dir(path: Path, count: int, size: int = 4096) -> dict[str, bytes]:
    """``count`` files of ``size`` random bytes in a new directory ``path``: their names and contents."""
    path.mkdir(parents=True)
    files = {f"f{i:04d}.json": os.urandom(size) for i in range(count)}
    for name, data in files.items():
        (path / name).write_bytes(data)
    return files


def lazy_model(root: Path, client: RegistryClient, reference: str, **limits: int) -> LazyModel:
    """The (unbuilt) lazy model of ``reference`` over a cache at ``root``, with the cache's ``limits``."""
    cache = ModelCache(ContentStore(root), client, **limits)
    return LazyModel(cache, client.resolve(parse_reference(reference)), PullOptions())


def read_all(model: LazyModel, path: str) -> bytes:
    """The whole file at ``path`` of a built lazy model."""
    node = model.lookup_path(path)
    assert node is not None and node.kind == "file"
    return model.read_node(node, 0, node.size + 1)
