"""The lazy tree of uncompressed tar layers, from their headers only: many layers indexed at once (a bounded
pool; each layer's index is independent), then merged in layer order with the charges each made to the
model's budget replayed there, so the checks, charges and errors are those of indexing one layer after
another."""

from __future__ import annotations

import os
import threading
from array import array
from bisect import bisect_right
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

from modelcache.assemble.safetar import checked_members, open_tar, tar_errors
from modelcache.assemble.treerules import Budget
from modelcache.digest import Digest
from modelcache.errors import UnsafeContent
from modelcache.lazy.lazytree import Node, Source, ensure_dir, file_mode
from modelcache.registry.manifest import Descriptor
from modelcache.registry.mediatypes import Compression

INDEX_WORKERS = 16  # tar layers whose headers are read at once (one connection each)

# the tree of one tar layer, its charges made to the budget given
IndexLayer = Callable[[Descriptor, Budget], Node]


class BlobFile:
    """A read-only, seekable file of ``size`` bytes read with ``read(offset, n)`` (so tarfile can read the
    headers of an uncompressed tar layer and seek over the data it never reads)."""

    def __init__(self, size: int, read: Callable[[int, int], bytes]) -> None:
        self.size, self._read, self.position = size, read, 0

    def read(self, n: int = -1) -> bytes:
        n = self.size - self.position if n is None or n < 0 else min(n, self.size - self.position)
        if n <= 0:
            return b""
        data = self._read(self.position, n)
        self.position += len(data)
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.position, os.SEEK_END: self.size}[whence]
        self.position = max(0, base + offset)
        return self.position

    def tell(self) -> int:
        return self.position

    def seekable(self) -> Literal[True]:
        return True


def tar_tree(blob: BlobFile, digest: Digest, size: int, budget: Budget) -> Node:
    """The tree of uncompressed tar blob ``digest`` read from ``blob`` (headers only), built from
    the members as extraction creates them (:func:`modelcache.assemble.safetar.checked_members`: the same
    checks, the same order, links last, the same charges to ``budget``)."""
    what = f"layer {digest}"
    layer = Node("dir", 0o555)
    files: dict[str, Node] = {}
    with tar_errors(what, Compression.TAR), open_tar(blob, streaming=False) as archive:
        for member in checked_members(archive, prefix="", budget=budget, what=what):
            info = member.info
            parts = info.name.split("/")
            parent = ensure_dir(layer, parts[:-1])
            if member.removes:
                parent.children.pop(parts[-1], None)
            elif info.isdir():
                existing = parent.children.get(parts[-1])
                if existing is None or existing.kind != "dir":
                    parent.children[parts[-1]] = Node("dir", 0o555)
            elif info.isreg():
                files[info.name] = parent.children[parts[-1]] = Node(
                    "file", file_mode(info.mode), info.size,
                    source=Source(digest, size, info.offset_data, info.size))
            elif info.issym():
                parent.children[parts[-1]] = Node("symlink", 0o777, len(info.linkname), target=info.linkname)
            else:  # a hard link: the same file as the one it names (checked_members: a file of this layer)
                source = files.get(info.linkname)
                if source is None:
                    raise UnsafeContent(f"{what}: hard link {info.name!r} points to {info.linkname!r}, "
                                        f"which is not a file of this layer")
                files[info.name] = parent.children[parts[-1]] = Node("file", source.mode, source.size,
                                                                     source=source.source)
    return layer


class _Cut(Exception):
    """The layers indexed so far already charge more than the model may hold: stop indexing."""


class _Total:
    """What all layers indexed at once have charged: once it is more than the model may hold, the model
    fails somewhere, so every layer stops (bounding the work a hostile model makes before it fails)."""

    def __init__(self, budget: Budget) -> None:
        self.max_entries, self.max_bytes = budget.max_entries, budget.max_bytes
        self.entries = self.bytes = 0
        self.lock = threading.Lock()
        self.over = threading.Event()

    def add(self, entries: int, nbytes: int) -> None:
        with self.lock:
            self.entries += entries
            self.bytes += nbytes
            if self.entries > self.max_entries or self.bytes > self.max_bytes:
                self.over.set()
        if self.over.is_set():
            raise _Cut


class _Charges(Budget):
    """One layer's charges, kept (as running totals) to be replayed into the model's budget in layer order.
    Uncompressed layers expand nothing (:meth:`Budget.expand` is never called)."""

    def __init__(self, total: _Total) -> None:
        super().__init__(total.max_entries, total.max_bytes, 0)
        self.total = total
        self.entries_after: array[int] = array("q")
        self.bytes_after: array[int] = array("q")

    def charge(self, what: str, *, entries: int = 0, nbytes: int = 0) -> None:
        self.entries += entries
        self.bytes += nbytes
        self.entries_after.append(self.entries)
        self.bytes_after.append(self.bytes)
        self.total.add(entries, nbytes)

    def replay(self, budget: Budget, what: str, *, apply: bool = True) -> None:
        """Raise where charging ``budget`` this layer's charges one at a time would; else, with ``apply``,
        charge them all."""
        failing = min(bisect_right(self.entries_after, budget.max_entries - budget.entries),
                      bisect_right(self.bytes_after, budget.max_bytes - budget.bytes))
        if failing < len(self.entries_after):  # the totals after that charge are over: charge() raises
            budget.charge(what, entries=self.entries_after[failing], nbytes=self.bytes_after[failing])
        if apply:
            budget.charge(what, entries=self.entries, nbytes=self.bytes)


@dataclass
class _Indexed:
    charges: _Charges
    tree: Node | None = None
    error: Exception | None = None  # what indexing the layer raised, after its charges
    cut: bool = False  # stopped before its end (:class:`_Cut`)


class TarLayers:
    """The trees of ``layers`` (uncompressed tar descriptors, in layer order), indexed at once by
    ``index``; :meth:`next` hands them out in order against the model's budget."""

    def __init__(self, index: IndexLayer, layers: list[Descriptor], budget: Budget) -> None:
        self.index = index
        self.layers = layers
        # last layer first: the background pull fetches them first to last, so the two meet in the middle and
        # each reads the other half from the blobs the pull has committed (no second fetch)
        self.results = self._index_all(list(range(len(layers))[::-1]), _Total(budget))
        self.position = 0

    def _index_all(self, order: list[int], total: _Total) -> dict[int, _Indexed]:
        """Index the layers at positions ``order`` at once (started in that order), all charging ``total``."""
        def run(position: int) -> _Indexed:
            result = _Indexed(_Charges(total))
            if total.over.is_set():
                result.cut = True
                return result
            try:
                result.tree = self.index(self.layers[position], result.charges)
            except _Cut:
                result.cut = True
            except Exception as exc:  # noqa: BLE001 - raised in layer order by next()
                result.error = exc
            return result

        if not order:
            return {}
        with ThreadPoolExecutor(min(INDEX_WORKERS, len(order)), thread_name_prefix="tar-index") as pool:
            futures = {position: pool.submit(run, position) for position in order}
            return {position: future.result() for position, future in futures.items()}

    def next(self, budget: Budget) -> Node:
        """The tree of the next layer, its charges made to ``budget`` (where a charge fails, it raises as
        indexing that layer alone would; after them, what indexing it raised)."""
        position = self.position
        descriptor, result = self.layers[position], self.results[position]
        self.position += 1
        result.charges.replay(budget, f"layer {descriptor.digest}", apply=not result.cut)
        if result.cut:  # its charges so far fit: it and every later cut layer again, at once, from the budget's
            # totals now, first to last (the first of them alone if it is cut again: one layer per pass at least)
            total = _Total(budget)
            total.entries, total.bytes = budget.entries, budget.bytes
            self.results.update(self._index_all(
                [p for p in range(position, len(self.layers)) if self.results[p].cut], total))
            result = self.results[position]
            if result.cut:
                return self.index(descriptor, budget)
            result.charges.replay(budget, f"layer {descriptor.digest}")
        if result.error is not None:
            raise result.error
        assert result.tree is not None
        return result.tree
