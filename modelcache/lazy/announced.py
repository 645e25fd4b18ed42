"""Single-file tar layers whose annotations announce the file they hold (ModelPack's ``filepath`` and file
metadata, which modctl writes for every file it packs): a lazy tree of such layers is shown from the manifest
alone, before a byte of them is read.

An announcement is a claim of the artifact's author, not a fact: before the first byte of an announced file
is served its layer is indexed and must hold exactly that file (:func:`check_layer`), and once the pull has
finished its tree must be the tree that was shown (:func:`check_final`). Either failing marks the model
broken, so every read fails."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from modelcache.assemble.layout import file_metadata
from modelcache.assemble.paths import safe_relpath
from modelcache.assemble.safetar import WHITEOUT
from modelcache.assemble.treerules import check_depth, walk_tree
from modelcache.errors import IntegrityError, UnsafeContent
from modelcache.lazy.lazytree import Announced, Node, Source, file_mode
from modelcache.registry import mediatypes as mt
from modelcache.registry.manifest import Descriptor

REGULAR_TYPEFLAGS = (0, 48, "0", "")  # tar.TypeReg ('0', 48 as Go writes a byte), and the old NUL flag
TAR_HEADER = 512


def announced_file(descriptor: Descriptor) -> Announced | None:
    """The file ``descriptor``'s annotations announce, or None when they announce none that can be shown (no
    path or metadata, not a regular file, a size its layer cannot hold, an unsafe path): its headers are
    then read as for any tar layer."""
    where = f"layer {descriptor.digest}"
    annotations = descriptor.annotations
    path = annotations.get(mt.ANNOTATION_FILEPATH) or annotations.get(mt.ANNOTATION_FILEPATH_LEGACY)
    if not path:
        return None
    try:
        meta = file_metadata(descriptor, where)
        path = safe_relpath(path, where)
        check_depth(path, where)
    except (IntegrityError, UnsafeContent):
        return None
    if meta is None or any(part.startswith(WHITEOUT) for part in path.split("/")):
        return None  # a whiteout removes what lower layers hold: the layer's headers say what
    size, mode = meta.get("size"), meta.get("mode", 0o444)
    if meta.get("typeflag", 0) not in REGULAR_TYPEFLAGS or type(size) is not int or type(mode) is not int:
        return None
    if not 0 <= size <= descriptor.size - TAR_HEADER:
        return None
    return Announced(descriptor, path, size, file_mode(mode))


def check_layer(announced: Announced, layer: Node) -> Source:
    """Where the announced file's bytes are in its layer, given the layer's tree (read from its headers);
    IntegrityError unless the layer holds that file and nothing else (directories on its path aside)."""
    parents = {"/".join(announced.path.split("/")[:i]) for i in range(1, announced.path.count("/") + 1)}
    found: Source | None = None
    for path, node in walk_tree(layer):
        if node.kind == "dir" and path in parents:
            continue
        if (path == announced.path and node.kind == "file" and node.source is not None
                and node.size == announced.size and node.mode == announced.mode):
            found = node.source
            continue
        found = None
        break
    if found is None:
        raise IntegrityError(f"layer {announced.descriptor.digest}: its annotations announce one file, "
                             f"{announced.path!r} ({announced.size} bytes, mode {announced.mode:o}), but the "
                             f"layer holds {_listing(layer)}")
    return found


def _listing(layer: Node) -> str:
    entries = [f"{path!r} ({node.kind}, {node.size} bytes, mode {node.mode:o})" for path, node in walk_tree(layer)]
    shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
    return shown or "nothing"


def check_final(shown: Node, final: Path, *, exact: bool) -> None:
    """IntegrityError unless every path of the lazy tree ``shown`` is in the finished tree at ``final``, of
    the same kind, a file of the same size and mode; with ``exact`` (no layer's paths were left to the pull),
    unless the finished tree holds nothing else either."""
    expected = {path: (node.kind, node.size, node.mode) if node.kind == "file" else (node.kind, 0, 0)
                for path, node in walk_tree(shown)}
    found: dict[str, tuple[str, int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(final):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            kind = "dir" if stat.S_ISDIR(st.st_mode) else "symlink" if stat.S_ISLNK(st.st_mode) else "file"
            found[os.path.relpath(full, final)] = ((kind, st.st_size, stat.S_IMODE(st.st_mode)) if kind == "file"
                                                   else (kind, 0, 0))
    differing = {path for path, entry in expected.items() if found.get(path) != entry}
    if exact:
        differing |= found.keys() - expected.keys()
    if differing:
        raise IntegrityError(f"the finished tree is not the one the layers' annotations announced (it differs "
                             f"at {', '.join(repr(path) for path in sorted(differing)[:3])})")
