"""Turning a manifest into a plan of files: ModelPack model-spec (both vocabularies), KitOps ModelKits, generic
ORAS artifacts, container images; narrowed to the layer kinds asked for."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from modelcache.assemble import kitfile
from modelcache.assemble.paths import PathFilter, safe_relpath
from modelcache.digest import Digest
from modelcache.errors import IntegrityError, Kind, ModelCacheError, UnsupportedArtifact
from modelcache.registry import mediatypes as mt
from modelcache.registry.manifest import Descriptor, Manifest

DEFAULT_IMAGE_PATH = "models"


@dataclass(frozen=True)
class Step:
    """One layer's contribution: a raw file at ``dest``, or a tar extracted under ``dest``; ``kind`` is its
    ``--layers`` kind (None outside ModelPacks and ModelKits)."""

    descriptor: Descriptor
    compression: mt.Compression
    dest: str
    prefix: str = ""
    kind: str | None = None


@dataclass
class Plan:
    """The layout of a model and the ordered steps that build its tree. ``synthesized`` holds the blobs of
    steps made here rather than fetched (a ModelKit's Kitfile): store them before building or reading."""

    layout: str
    steps: list[Step] = field(default_factory=list)
    subpath: str = ""
    synthesized: dict[Digest, bytes] = field(default_factory=dict)

    def needed(self, path_filter: PathFilter) -> list[Step]:
        """The steps whose content is needed under ``path_filter`` (raw files can be skipped)."""
        return [s for s in self.steps if s.compression.is_tar or path_filter.accepts(s.dest)]


MAX_METADATA = 64 << 10  # characters of a layer's file metadata annotation


def file_metadata(layer: Descriptor, where: str) -> dict[str, Any] | None:
    """The file metadata annotation of ``layer`` (either vocabulary), parsed; None when it has none.
    IntegrityError when it is not a JSON object of at most MAX_METADATA characters."""
    annotations = layer.annotations
    text = annotations.get(mt.ANNOTATION_FILE_METADATA) or annotations.get(mt.ANNOTATION_FILE_METADATA_LEGACY)
    if not text:
        return None
    if len(text) > MAX_METADATA:
        raise IntegrityError(f"{where}: {mt.ANNOTATION_FILE_METADATA} is longer than {MAX_METADATA} characters")
    try:
        meta = json.loads(text)
    except (ValueError, RecursionError):  # nesting deep enough to exhaust the parser's stack is not metadata
        raise IntegrityError(f"{where}: {mt.ANNOTATION_FILE_METADATA} is not valid JSON") from None
    if not isinstance(meta, dict):
        raise IntegrityError(f"{where}: {mt.ANNOTATION_FILE_METADATA} is not an object")
    return meta


def _check_metadata(layer: Descriptor, where: str) -> None:
    meta = file_metadata(layer, where)
    if meta is None:
        return
    size = meta.get("size")
    if isinstance(size, int) and size != layer.size:
        raise IntegrityError(f"{where}: file metadata says {size} bytes but the layer has {layer.size}")
    typeflag = meta.get("typeflag")
    if typeflag not in (None, 0, "0", "", 48):
        raise UnsupportedArtifact(f"{where}: raw layer with typeflag {typeflag!r} is not a regular file")


def _modelpack(manifest: Manifest) -> Plan:
    plan = Plan("modelpack")
    for i, layer in enumerate(manifest.layers):
        where = f"layer {i} ({layer.digest})"
        parsed = mt.model_layer(layer.media_type)
        if parsed is None:
            plan.steps.append(_oras_step(layer, where))
            continue
        _, compression = parsed
        kind = mt.model_kind(layer.media_type)
        path = layer.annotations.get(mt.ANNOTATION_FILEPATH) or layer.annotations.get(mt.ANNOTATION_FILEPATH_LEGACY)
        if compression is mt.Compression.RAW:
            if not path:
                raise UnsupportedArtifact(f"{where}: raw model layer has no {mt.ANNOTATION_FILEPATH} annotation")
            _check_metadata(layer, where)
            plan.steps.append(Step(layer, compression, safe_relpath(path, where), kind=kind))
        else:
            plan.steps.append(Step(layer, compression, "", kind=kind))
    return plan


def _modelkit(manifest: Manifest, config: bytes | None) -> Plan:
    """The tree ``kit unpack`` lays out: the Kitfile at the root (a blob made here), then every layer."""
    if config is None:
        raise UnsupportedArtifact("a ModelKit's layout is in its config (the Kitfile), which was not given")
    document = kitfile.parse(config)
    text = kitfile.to_yaml(document)
    descriptor = Descriptor(mt.KITFILE, Digest.of_bytes(text), len(text))
    plan = Plan("modelkit", [Step(descriptor, mt.Compression.RAW, kitfile.KITFILE_NAME, kind="config")],
                synthesized={descriptor.digest: text})
    plan.steps += [Step(k.descriptor, k.compression, k.dest, kind=mt.model_kind(k.descriptor.media_type))
                   for k in kitfile.layers(manifest, document)]
    return plan


def _only_kinds(plan: Plan, kinds: tuple[str, ...]) -> None:
    """Keep the steps of ``kinds`` (all when empty): the others are never fetched."""
    if not kinds:
        return
    if plan.layout not in ("modelpack", "modelkit"):
        raise ModelCacheError(f"layers {','.join(kinds)}: layer kinds exist in ModelPack and ModelKit artifacts, "
                              f"not in this {plan.layout} layout", kind=Kind.INVALID_ARGUMENT)
    plan.steps = [s for s in plan.steps if s.kind in kinds]
    if not plan.steps:
        raise ModelCacheError(f"the model has no layer of the kinds {','.join(kinds)}", kind=Kind.NOT_FOUND)


def _oras_step(layer: Descriptor, where: str) -> Step:
    title = layer.annotations.get(mt.ANNOTATION_TITLE)
    if not title:
        raise UnsupportedArtifact(f"{where}: layer of type {layer.media_type!r} has no "
                                  f"{mt.ANNOTATION_TITLE} annotation, so it has no file name")
    dest = safe_relpath(title, where)
    if layer.annotations.get(mt.ANNOTATION_ORAS_UNPACK, "").lower() == "true":
        compression = mt.image_layer(layer.media_type) or mt.Compression.TAR_GZIP
        return Step(layer, compression, dest)
    return Step(layer, mt.Compression.RAW, dest)


def _image(manifest: Manifest, subpath: str) -> Plan:
    prefix = safe_relpath(subpath.lstrip("/"), "path") if subpath.strip("/") else ""
    plan = Plan("image", subpath=prefix)
    for i, layer in enumerate(manifest.layers):
        compression = mt.image_layer(layer.media_type)
        if compression is None:
            raise UnsupportedArtifact(f"layer {i}: media type {layer.media_type!r} is not an image layer")
        if layer.has_urls:
            raise UnsupportedArtifact(f"layer {i}: foreign layers with external URLs are not fetched")
        plan.steps.append(Step(layer, compression, "", prefix))
    return plan


def needs_config(manifest: Manifest) -> bool:
    """True when the plan of ``manifest`` is in its config (a ModelKit's Kitfile): pass it to :func:`plan_for`."""
    return kitfile.is_modelkit(manifest)


def plan_for(manifest: Manifest, subpath: str | None = None, *, config: bytes | None = None,
             layers: tuple[str, ...] = ()) -> Plan:
    """Classify ``manifest`` and list what each layer contributes.

    ``subpath`` selects the directory exposed from a container image (default ``/models``); ``config`` is the
    manifest's config blob when :func:`needs_config`; ``layers`` keeps only layers of those kinds.
    """
    layer_types = [layer.media_type for layer in manifest.layers]
    if not manifest.layers:
        raise UnsupportedArtifact("manifest has no layers: there are no model files")
    if kitfile.is_modelkit(manifest):
        plan = _modelkit(manifest, config)
    elif (manifest.artifact_type in (mt.MODEL_ARTIFACT, mt.MODEL_ARTIFACT_LEGACY)
            or manifest.config.media_type in (mt.MODEL_CONFIG, mt.MODEL_CONFIG_LEGACY)
            or any(mt.model_layer(t) for t in layer_types)):
        plan = _modelpack(manifest)
    elif manifest.config.media_type in mt.IMAGE_CONFIG_TYPES and all(mt.image_layer(t) for t in layer_types) \
            and not any(layer.annotations.get(mt.ANNOTATION_TITLE) for layer in manifest.layers):
        plan = _image(manifest, DEFAULT_IMAGE_PATH if subpath is None else subpath)
        _only_kinds(plan, layers)
        return plan
    else:
        plan = Plan("oras", [_oras_step(layer, f"layer {i} ({layer.digest})")
                             for i, layer in enumerate(manifest.layers)])
    _only_kinds(plan, layers)
    if subpath and subpath.strip("/"):
        plan.subpath = safe_relpath(subpath.lstrip("/"), "path")
    seen: set[str] = set()
    for step in plan.steps:
        if step.compression is mt.Compression.RAW:
            if step.dest in seen:
                raise IntegrityError(f"two layers claim the same file {step.dest!r}")
            seen.add(step.dest)
    return plan
