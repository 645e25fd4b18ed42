"""KitOps ModelKits: the Kitfile their config holds (JSON), where each layer goes in the tree ``kit unpack``
lays out, and the Kitfile (YAML, without digests) it writes at the tree's root.

Layers come in the order model, model parts, code, datasets, docs; the n-th layer of a kind is the n-th
Kitfile entry of that kind. Since kit v0.5 each entry names its layer's digest (it must match the manifest)
and tar entries are named relative to the Kitfile's directory; before, entries had no digest and tar
entries were named relative to the parent of the entry's path. A raw layer is one file, at its
``org.cncf.model.filepath`` annotation or else at the entry's path.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from typing import Any

import yaml

from modelcache.assemble.paths import safe_relpath
from modelcache.errors import IntegrityError, UnsafeContent, UnsupportedArtifact
from modelcache.registry import mediatypes as mt
from modelcache.registry.manifest import Descriptor, Manifest

KITFILE_NAME = "Kitfile"
MAX_NESTING = 64  # parameters are free-form: deeper than this is an attack on the parser, not a model
_LAYER_INFO = ("digest", "diffId")  # json-only fields (kit's yaml:"-"): never in the Kitfile it writes
_SECTIONS = (("code", "code"), ("datasets", "dataset"), ("docs", "docs"))


@dataclass(frozen=True)
class KitLayer:
    """One layer of a ModelKit: its kit base type, how it is stored, and where it goes in the tree (a raw
    file's path; the directory a tar is extracted in)."""

    descriptor: Descriptor
    base: str
    compression: mt.Compression
    dest: str


def is_modelkit(manifest: Manifest) -> bool:
    """True for a ModelKit: current kit's artifactType, or (kit <= 1.9, which wrote none) its config type."""
    return manifest.artifact_type == mt.KIT_ARTIFACT or manifest.config.media_type == mt.KIT_CONFIG


def parse(raw: bytes) -> dict[str, Any]:
    """The Kitfile a ModelKit's config holds, checked to be a JSON object of bounded nesting."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise IntegrityError("the ModelKit's config (its Kitfile) is not valid JSON") from None
    if not isinstance(data, dict):
        raise IntegrityError("the ModelKit's config (its Kitfile) is not a JSON object")
    _check_nesting(data)
    return data


def _check_nesting(value: Any) -> None:
    pending = [(value, 0)]
    while pending:
        item, depth = pending.pop()
        if depth > MAX_NESTING:
            raise UnsafeContent(f"the Kitfile nests deeper than {MAX_NESTING} levels")
        if isinstance(item, dict):
            pending.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            pending.extend((v, depth + 1) for v in item)


def _objects(value: Any, what: str) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise IntegrityError(f"the Kitfile's {what} is not a list of objects")
    return value


def _entries(kitfile: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Kitfile entries by kit base type, in the order their layers come."""
    model = kitfile.get("model")
    if model is not None and not isinstance(model, dict):
        raise IntegrityError("the Kitfile's model is not an object")
    entries = {"model": [model] if model else [], "modelpart": _objects((model or {}).get("parts"), "model.parts")}
    for key, base in _SECTIONS:
        entries[base] = _objects(kitfile.get(key), key)
    return entries


def _text(entry: dict[str, Any], key: str, where: str) -> str:
    value = entry.get(key) or ""
    if not isinstance(value, str):
        raise IntegrityError(f"{where}: the Kitfile's {key} is not a string")
    return value


def layers(manifest: Manifest, kitfile: dict[str, Any]) -> list[KitLayer]:
    """Where each layer of ``manifest`` goes, matched to the entries of ``kitfile``; a digest that disagrees
    with the manifest is an integrity error."""
    entries = _entries(kitfile)
    used = dict.fromkeys(entries, 0)
    result = []
    for i, layer in enumerate(manifest.layers):
        where = f"layer {i} ({layer.digest})"
        parsed = mt.kit_layer(layer.media_type)
        if parsed is None:
            raise UnsupportedArtifact(f"{where}: {layer.media_type!r} is not a ModelKit layer type this driver reads")
        base, compression = parsed
        if used[base] >= len(entries[base]):
            raise IntegrityError(f"{where}: a {base} layer the Kitfile does not list")
        entry = entries[base][used[base]]
        used[base] += 1
        path = _text(entry, "path", where)
        digest = _text(entry, "digest", where)
        if digest and digest != str(layer.digest):
            raise IntegrityError(f"{where}: the Kitfile says the {base} {path!r} is {digest}, the manifest "
                                 f"says {layer.digest}")
        if compression is mt.Compression.RAW:
            named = layer.annotations.get(mt.ANNOTATION_FILEPATH) or path
            result.append(KitLayer(layer, base, compression, safe_relpath(named, where)))
        elif digest:
            result.append(KitLayer(layer, base, compression, ""))
        else:  # before kit v0.5: entries relative to the parent of the entry's path
            result.append(KitLayer(layer, base, compression, _parent(path, where)))
    if entries["model"] and not used["model"] and _text(entries["model"][0], "path", "model"):
        raise UnsupportedArtifact(f"the Kitfile's model {entries['model'][0]['path']!r} has no layer here (a model "
                                  f"taken from another ModelKit is not pulled)")
    return result


def _parent(path: str, where: str) -> str:
    """The directory that holds ``path`` ('' for the Kitfile's own directory)."""
    if not [p for p in path.split("/") if p not in ("", ".")]:
        return ""
    return posixpath.dirname(safe_relpath(path, where))


def to_yaml(kitfile: dict[str, Any]) -> bytes:
    """The Kitfile ``kit unpack`` writes: the config's fields in their order, without layer digests."""
    def strip(entry: Any) -> Any:
        return {k: v for k, v in entry.items() if k not in _LAYER_INFO} if isinstance(entry, dict) else entry

    data = dict(kitfile)
    if isinstance(data.get("model"), dict):
        model = strip(data["model"])
        if isinstance(model.get("parts"), list):
            model["parts"] = [strip(p) for p in model["parts"]]
        data["model"] = model
    for key, _ in _SECTIONS:
        if isinstance(data.get(key), list):
            data[key] = [strip(e) for e in data[key]]
    text = yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True, indent=2)
    return text.encode()
