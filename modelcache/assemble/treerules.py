"""The rules a model tree from a registry obeys, in one place for extraction, assembly and the lazy view:
where a symbolic link may lead, how deep a layer may nest, and how much one model may hold across its
layers."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol, TypeVar

from modelcache.errors import UnsafeContent

MAX_DEPTH = 128  # directories a tar member may be nested in (trees are walked, merged and removed by path)
MAX_LINK_TARGET = 4095
EXPAND_SLACK = 64 << 20  # what a model's tar layers may expand to beyond expand_ratio times their size, once

# the kind of what is at a path of the tree ("dir", "file", "symlink", ...), None when nothing is there
KindOf = Callable[[str], str | None]


def link_destination(link: str, target: str, kind_of: KindOf) -> str | None:
    """The path in the tree (``""``: its root) that symlink ``link`` (a path in the tree) leads to, or None
    when it may lead outside: an empty, absolute or overlong target, one that climbs above the root from the
    link's directory, or one with a ``..`` after a component that is itself a symlink (whose ``..`` is not
    the lexical one). Every other link, followed one after another, stays inside."""
    if not target or target.startswith("/") or "\x00" in target or len(target.encode(errors="surrogateescape")) \
            > MAX_LINK_TARGET:
        return None
    parts = link.split("/")[:-1]
    through_link = False
    names = [p for p in target.split("/") if p not in ("", ".")]
    for position, name in enumerate(names):
        if name == "..":
            if not parts or through_link:
                return None
            parts.pop()
            continue
        parts.append(name)
        if not through_link and position < len(names) - 1 and kind_of("/".join(parts)) == "symlink":
            through_link = True
    return "/".join(parts)


class TreeNode(Protocol):
    """A node of an in-memory tree: a kind ("dir" for directories) and, for directories, its children."""

    @property
    def kind(self) -> str: ...

    @property
    def children(self) -> Mapping[str, TreeNode]: ...


NodeT = TypeVar("NodeT", bound=TreeNode)


def walk_tree(root: NodeT) -> Iterator[tuple[str, NodeT]]:
    """Every node below ``root`` with its relative path, depth first, without recursion (trees from a
    registry may be deep); directories are yielded before what they hold."""
    pending: list[tuple[str, NodeT]] = [("", root)]
    while pending:
        base, node = pending.pop()
        for name, child in node.children.items():
            path = f"{base}/{name}" if base else name
            yield path, child  # type: ignore[misc]
            if child.kind == "dir":
                pending.append((path, child))  # type: ignore[arg-type]


def check_symlink(link: str, target: str, kind_of: KindOf, what: str) -> None:
    """Refuse symlink ``link`` unless :func:`link_destination` keeps it inside the tree."""
    if target.startswith("/"):
        raise UnsafeContent(f"{what}: symlink {link!r} has an absolute link target {target[:200]!r}")
    if link_destination(link, target, kind_of) is None:
        raise UnsafeContent(f"{what}: symlink {link!r} points outside the tree ({target[:200]!r})")


def check_depth(relpath: str, what: str) -> None:
    """Refuse a path nested deeper than MAX_DEPTH directories."""
    if relpath.count("/") > MAX_DEPTH:
        raise UnsafeContent(f"{what}: {relpath[:80]!r}... is nested more than {MAX_DEPTH} directories deep")


@dataclass
class Budget:
    """What one model may hold, counted across all its layers: entries (files, directories, links; a raw
    layer is one), bytes of file data, and bytes its compressed tar layers may expand to when read."""

    max_entries: int
    max_bytes: int
    max_expanded: int
    entries: int = 0
    bytes: int = 0
    expanded: int = 0

    @classmethod
    def for_model(cls, max_entries: int, max_bytes: int, compressed: int, expand_ratio: int) -> Budget:
        """A model whose tar layers total ``compressed`` bytes: they may expand to ``expand_ratio`` times
        that plus EXPAND_SLACK (once per model, however many layers)."""
        return cls(max_entries, max_bytes, compressed * expand_ratio + EXPAND_SLACK)

    def charge(self, what: str, *, entries: int = 0, nbytes: int = 0) -> None:
        """Count ``entries`` and ``nbytes`` more; refuse the model once it holds more than allowed."""
        self.entries += entries
        self.bytes += nbytes
        if self.entries > self.max_entries:
            raise UnsafeContent(f"{what}: the model has more than {self.max_entries} files, directories and "
                                f"links in all its layers (maxModelFiles)")
        if self.bytes > self.max_bytes:
            raise UnsafeContent(f"{what}: the model holds more than {self.max_bytes} bytes in all its layers "
                                f"(maxModelGiB)")

    def expand(self, nbytes: int, what: str) -> None:
        """Count ``nbytes`` more read out of compressed tar layers."""
        self.expanded += nbytes
        if self.expanded > self.max_expanded:
            raise UnsafeContent(f"{what}: the model's tar layers expand to more than {self.max_expanded} bytes "
                                f"(decompression bomb?)")
