"""The tree of a lazy model: its nodes, where a file's bytes live, and the rules by which layers merge and
links are checked (those the assembled tree obeys)."""

from __future__ import annotations

from dataclasses import dataclass, field

from modelcache.assemble.paths import PathFilter
from modelcache.assemble.safetar import OPAQUE, WHITEOUT
from modelcache.assemble.treerules import check_symlink, walk_tree
from modelcache.digest import Digest
from modelcache.errors import UnsafeContent
from modelcache.registry.manifest import Descriptor


@dataclass(frozen=True)
class Source:
    """Where a file's bytes live: ``size`` bytes at ``offset`` inside blob ``digest``."""

    digest: Digest
    blob_size: int
    offset: int
    size: int


@dataclass(frozen=True)
class Announced:
    """The file a single-file tar layer announces: at ``path`` (from the tree's root), ``size`` bytes, with
    the mode the lazy tree gives it."""

    descriptor: Descriptor
    path: str
    size: int
    mode: int


@dataclass
class Node:
    """A directory, file or symlink of the lazy tree. A file ``announced`` by its layer's annotations has no
    ``source`` until its layer has been read and checked."""

    kind: str
    mode: int
    size: int = 0
    children: dict[str, Node] = field(default_factory=dict)
    source: Source | None = None
    announced: Announced | None = None
    target: str = ""
    local: str = ""


def file_mode(mode: int) -> int:
    """The mode of a lazy tree's file whose tar header (or announcement) gives ``mode``: read-only, executable
    where it was."""
    return (mode & 0o555) | 0o444


def ensure_dir(root: Node, parts: list[str]) -> Node:
    """The directory at ``parts`` under ``root``, created as needed."""
    node = root
    for part in parts:
        child = node.children.get(part)
        if child is None:
            child = node.children[part] = Node("dir", 0o555)
        if child.kind != "dir":
            raise UnsafeContent(f"path component {part!r} is both a file and a directory")
        node = child
    return node


def check_links(root: Node) -> None:
    """Check every symlink of the merged tree by the rule the assembled tree obeys
    (:func:`modelcache.assemble.treerules.check_symlink`): inside, from its own directory, never climbing out of a
    link."""
    def kind_of(relpath: str) -> str | None:
        node: Node | None = root
        for part in relpath.split("/"):
            node = node.children.get(part) if node is not None and node.kind == "dir" else None
        return None if node is None else node.kind

    for path, child in walk_tree(root):
        if child.kind == "symlink":
            check_symlink(path, child.target, kind_of, "model")



def merge_layer(target: Node, layer: Node, relbase: str, path_filter: PathFilter) -> None:
    """Lay ``layer`` over ``target`` as the tree assembler does: an opaque marker clears what lower layers
    put in that directory, a ``.wh.<name>`` removes ``<name>``, files outside the filter are left out."""
    if OPAQUE in layer.children:
        target.children.clear()
    for name in layer.children:
        if name.startswith(WHITEOUT) and name != OPAQUE:
            target.children.pop(name[len(WHITEOUT):], None)
    for name, child in sorted(layer.children.items()):
        if name.startswith(WHITEOUT):
            continue
        relpath = f"{relbase}/{name}" if relbase else name
        if child.kind == "dir":
            existing = target.children.get(name)
            if existing is None or existing.kind != "dir":
                existing = target.children[name] = Node("dir", 0o555)
            merge_layer(existing, child, relpath, path_filter)
        elif path_filter.accepts(relpath):
            target.children[name] = child
