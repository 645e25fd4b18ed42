"""A model directory of small files, and the lazy tree of a model built in-process (what a lazy mount shows)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import requests

from modelcache.assemble.options import PullOptions
from modelcache.cache import ModelCache
from modelcache.lazy.model import LazyModel
from modelcache.registry import mediatypes as mt
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


def without_announcements(host: str, name: str) -> None:
    """Push manifest ``name`` (``repository:tag``) of the registry at ``host`` again without its layers' file
    metadata (as producers other than modctl and ocimodel write them): a lazy mount then reads the headers of
    its tar layers to show their files."""
    repository, tag = name.rsplit(":", 1)
    url = f"http://{host}/v2/{repository}/manifests/{tag}"
    answer = requests.get(url, headers={"Accept": mt.OCI_MANIFEST}, timeout=30)
    answer.raise_for_status()
    manifest = answer.json()
    for layer in manifest["layers"]:
        layer.get("annotations", {}).pop(mt.ANNOTATION_FILE_METADATA, None)
    requests.put(url, data=json.dumps(manifest), headers={"Content-Type": mt.OCI_MANIFEST},
                 timeout=30).raise_for_status()
