"""The CSI Controller service: a PersistentVolume per model reference, pinned to a digest at creation."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import grpc

from csi_driver.attributes import (
    KNOWN_ATTRIBUTES,
    capability_problem,
    check_capability,
    credentials_from_secrets,
    parse_volume_context,
    unknown_keys,
)
from csi_driver.errors import CsiError, from_core, invalid
from csi_driver.proto import csi_pb2, csi_pb2_grpc
from modelcache.digest import Digest
from modelcache.errors import ModelCacheError
from modelcache.fsutil import atomic_write_json, read_json
from modelcache.registry.client import RegistryClient
from modelcache.registry.reference import parse_reference
from modelcache.settings import Settings

log = logging.getLogger(__name__)

PVC_NAME = "csi.storage.k8s.io/pvc/name"
PVC_NAMESPACE = "csi.storage.k8s.io/pvc/namespace"
PVC_REFERENCE_ANNOTATION = "ocimodel.csi.dev/reference"
PASSED_THROUGH = ("mount", "include", "exclude", "path", "layers", "warm", "lazyVerify")
MAX_NAME = 128
RESOLVED_ANNOTATION = "ocimodel.csi.dev/resolved-volume"


class PvcAccess(Protocol):
    """What the controller asks of the Kubernetes API (the adapter's KubeClient provides it)."""

    def pvc_annotations(self, namespace: str, name: str) -> dict[str, str]:
        """The annotations of a PVC."""

    def annotate_pvc(self, namespace: str, name: str, key: str, value: str) -> None:
        """Set the annotation ``key`` of a PVC."""


@dataclass
class VolumeRecord:
    """A volume this controller created."""

    name: str
    volume_id: str
    request: str
    capacity_bytes: int
    volume_context: dict[str, str]


def _request_fingerprint(request: csi_pb2.CreateVolumeRequest) -> str:
    data = {
        "parameters": dict(sorted(request.parameters.items())),
        "capabilities": sorted(c.SerializeToString(deterministic=True).hex() for c in request.volume_capabilities),
        "capacity": [request.capacity_range.required_bytes, request.capacity_range.limit_bytes],
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


class ControllerService(csi_pb2_grpc.ControllerServicer):
    """Controller RPCs with volume records under ``state_dir``."""

    def __init__(self, settings: Settings, state_dir: Path, *, pvcs: PvcAccess | None = None) -> None:
        self.settings = settings
        self.dir = state_dir / "controller" / "volumes"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.pvcs = pvcs
        self._lock = threading.Lock()

    def _path(self, volume_id: str) -> Path:
        return self.dir / f"{volume_id}.json"

    def _load(self, volume_id: str) -> VolumeRecord | None:
        data = read_json(self._path(volume_id))
        return VolumeRecord(**data) if isinstance(data, dict) else None

    @staticmethod
    def volume_id_for(name: str) -> str:
        """The deterministic volume id of a CreateVolume name."""
        return "ocimodel-" + hashlib.sha256(name.encode()).hexdigest()[:40]

    def _reference(self, parameters: Mapping[str, str], annotations: Mapping[str, str] | None) -> str:
        if parameters.get("reference"):
            return parameters["reference"]
        name, namespace = parameters.get(PVC_NAME), parameters.get(PVC_NAMESPACE)
        if annotations is not None:
            if annotations.get(PVC_REFERENCE_ANNOTATION):
                return annotations[PVC_REFERENCE_ANNOTATION]
            raise invalid(f"PVC {namespace}/{name} has no {PVC_REFERENCE_ANNOTATION} annotation and the "
                          f"StorageClass has no 'reference' parameter")
        raise invalid("StorageClass parameter 'reference' is required (or run the provisioner with "
                      "--extra-create-metadata and annotate the PVC with ocimodel.csi.dev/reference)")

    def create(self, request: csi_pb2.CreateVolumeRequest) -> csi_pb2.Volume:
        """CreateVolume: validate, lock, reuse an identical earlier answer, resolve the tag, persist."""
        if not request.name:
            raise invalid("name is required")
        if len(request.name) > MAX_NAME:
            raise invalid(f"name is longer than {MAX_NAME} characters")
        if not request.volume_capabilities:
            raise invalid("volume_capabilities is required")
        for i, capability in enumerate(request.volume_capabilities):
            check_capability(capability, what=f"volume_capabilities[{i}]")
        if request.HasField("volume_content_source"):
            raise invalid("volume content sources (snapshots, clones) are not supported for model volumes")
        capacity = request.capacity_range
        if capacity.required_bytes < 0 or capacity.limit_bytes < 0:
            raise invalid("capacity_range values must not be negative")
        if capacity.limit_bytes and capacity.required_bytes > capacity.limit_bytes:
            raise invalid("capacity_range.required_bytes exceeds limit_bytes")
        volume_id = self.volume_id_for(request.name)
        fingerprint = _request_fingerprint(request)
        with self._lock:
            existing = self._load(volume_id)
            if existing is not None:
                if existing.request != fingerprint:
                    raise CsiError(grpc.StatusCode.ALREADY_EXISTS,
                                   f"volume {request.name} exists with other parameters, capabilities or capacity")
                return self._volume(existing)
            annotations = self._pvc_annotations(request)
            record = self._recorded_on_pvc(request, fingerprint, annotations)
            if record is None:
                record = self._resolve(request, volume_id, fingerprint, annotations)
                self._record_on_pvc(request, record)
            atomic_write_json(self._path(volume_id), asdict(record))
            log.info("created volume %s for %s", volume_id, record.volume_context["reference"])
            return self._volume(record)

    def _pvc_of(self, request: csi_pb2.CreateVolumeRequest) -> tuple[str, str] | None:
        namespace, name = request.parameters.get(PVC_NAMESPACE), request.parameters.get(PVC_NAME)
        return (namespace, name) if namespace and name and self.pvcs is not None else None

    def _pvc_annotations(self, request: csi_pb2.CreateVolumeRequest) -> dict[str, str] | None:
        """The annotations of the PVC this volume is for (None without --extra-create-metadata or API)."""
        pvc = self._pvc_of(request)
        if pvc is None:
            return None
        assert self.pvcs is not None
        try:
            return self.pvcs.pvc_annotations(*pvc)
        except ModelCacheError as exc:
            raise from_core(exc, f"reading PVC {pvc[0]}/{pvc[1]}") from None

    def _recorded_on_pvc(self, request: csi_pb2.CreateVolumeRequest, fingerprint: str,
                         annotations: Mapping[str, str] | None) -> VolumeRecord | None:
        """The answer an earlier CreateVolume of this name gave (whichever controller instance, before any
        restart), kept on the PVC: a retry gets the same digest even if the tag has moved since. Whoever may
        edit the PVC can write that annotation, so it counts only when it is exactly what this controller
        answers for the StorageClass's model pinned at the digest it names; otherwise it is ignored."""
        text = (annotations or {}).get(RESOLVED_ANNOTATION)
        try:
            data = json.loads(text) if text else None
            record = VolumeRecord(**data) if isinstance(data, dict) else None
        except (ValueError, TypeError):
            log.warning("ignoring an unreadable %s annotation for volume %s", RESOLVED_ANNOTATION, request.name)
            return None
        if record is None or record.name != request.name:
            return None
        if record.request != fingerprint:
            raise CsiError(grpc.StatusCode.ALREADY_EXISTS,
                           f"volume {request.name} exists with other parameters, capabilities or capacity")
        if not self._is_own_answer(request, record, fingerprint, annotations):
            log.warning("ignoring the %s annotation of volume %s: it is not this controller's answer for the "
                        "StorageClass's model; resolving again", RESOLVED_ANNOTATION, request.name)
            return None
        log.info("volume %s was created before (recorded on its PVC): %s", request.name,
                 record.volume_context.get("reference"))
        return record

    def _is_own_answer(self, request: csi_pb2.CreateVolumeRequest, record: VolumeRecord, fingerprint: str,
                       annotations: Mapping[str, str] | None) -> bool:
        """Whether ``record`` equals the answer for the StorageClass's reference pinned at the digest ``record``
        names (same volume id, repository, tag, options and size; a digest that repository holds)."""
        try:
            pin = parse_reference(record.volume_context.get("reference", "")).digest
        except ModelCacheError:
            return False
        if pin is None:
            return False
        try:
            expected = self._resolve(request, self.volume_id_for(request.name), fingerprint, annotations, pin)
        except CsiError as exc:
            if exc.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OUT_OF_RANGE):
                return False
            raise
        return expected == record

    def _record_on_pvc(self, request: csi_pb2.CreateVolumeRequest, record: VolumeRecord) -> None:
        """Keep the answer on the PVC before giving it, so that it outlives this controller's state."""
        pvc = self._pvc_of(request)
        if pvc is None:
            return
        assert self.pvcs is not None
        try:
            self.pvcs.annotate_pvc(*pvc, RESOLVED_ANNOTATION, json.dumps(asdict(record), sort_keys=True))
        except ModelCacheError as exc:
            raise from_core(exc, f"recording volume {request.name} on PVC {pvc[0]}/{pvc[1]}") from None

    def _resolve(self, request: csi_pb2.CreateVolumeRequest, volume_id: str, fingerprint: str,
                 annotations: Mapping[str, str] | None, pin: Digest | None = None) -> VolumeRecord:
        """The answer for the StorageClass's (or PVC's) reference; ``pin`` resolves its tag at that digest
        instead of where the tag points now (a reference with a digest of its own keeps it)."""
        parameters = dict(request.parameters)
        unknown = unknown_keys(parameters)
        if unknown:
            raise invalid(f"unknown StorageClass parameters {unknown}; known: {', '.join(KNOWN_ATTRIBUTES)}")
        context = {k: v for k, v in parameters.items() if k in PASSED_THROUGH}
        context["reference"] = self._reference(parameters, annotations)
        spec = parse_volume_context(context, lazy_supported=True)
        credentials = credentials_from_secrets(request.secrets, spec.reference.endpoint_host)
        client = RegistryClient(self.settings.transport(credentials))
        reference = spec.reference if pin is None or spec.reference.digest else spec.reference.with_digest(pin)
        try:
            resolved = client.resolve(reference)
        except ModelCacheError as exc:
            raise from_core(exc, f"resolving {spec.reference}") from None
        size = sum(layer.size for layer in resolved.manifest.layers)
        limit, required = request.capacity_range.limit_bytes, request.capacity_range.required_bytes
        if limit and size > limit:
            raise CsiError(grpc.StatusCode.OUT_OF_RANGE,
                           f"model {spec.reference} needs {size} bytes, more than the limit of {limit}")
        context["reference"] = str(spec.reference.with_digest(resolved.digest))
        return VolumeRecord(request.name, volume_id, fingerprint, max(size, required), context)

    @staticmethod
    def _volume(record: VolumeRecord) -> csi_pb2.Volume:
        return csi_pb2.Volume(volume_id=record.volume_id, capacity_bytes=record.capacity_bytes,
                              volume_context=record.volume_context)

    def delete(self, request: csi_pb2.DeleteVolumeRequest) -> None:
        """DeleteVolume: forget the record; an unknown id is already deleted. The node cache evicts on its own."""
        if not request.volume_id:
            raise invalid("volume_id is required")
        with self._lock:
            self._path(request.volume_id).unlink(missing_ok=True)

    def validate(
            self, request: csi_pb2.ValidateVolumeCapabilitiesRequest) -> csi_pb2.ValidateVolumeCapabilitiesResponse:
        """Confirm supported capabilities; unsupported ones leave ``confirmed`` empty with the reason."""
        if not request.volume_id:
            raise invalid("volume_id is required")
        if not request.volume_capabilities:
            raise invalid("volume_capabilities is required")
        record = self._load(request.volume_id)
        if record is None and "reference" not in request.volume_context:
            raise CsiError(grpc.StatusCode.NOT_FOUND, f"volume {request.volume_id} does not exist")
        for capability in request.volume_capabilities:
            problem = capability_problem(capability)
            if problem:
                return csi_pb2.ValidateVolumeCapabilitiesResponse(message=problem)
        confirmed = csi_pb2.ValidateVolumeCapabilitiesResponse.Confirmed(
            volume_context=request.volume_context, volume_capabilities=request.volume_capabilities,
            parameters=request.parameters)
        return csi_pb2.ValidateVolumeCapabilitiesResponse(confirmed=confirmed)

    # -- gRPC -------------------------------------------------------------------------------------------
    def CreateVolume(self, request, context):  # type: ignore[no-untyped-def]  # noqa: N802
        """gRPC entry of :meth:`create`."""
        return csi_pb2.CreateVolumeResponse(volume=self.create(request))

    def DeleteVolume(self, request, context):  # type: ignore[no-untyped-def]  # noqa: N802
        """gRPC entry of :meth:`delete`."""
        self.delete(request)
        return csi_pb2.DeleteVolumeResponse()

    def ValidateVolumeCapabilities(self, request, context):  # type: ignore[no-untyped-def]  # noqa: N802
        """gRPC entry of :meth:`validate`."""
        return self.validate(request)

    def ControllerGetCapabilities(self, request, context):  # type: ignore[no-untyped-def]  # noqa: N802
        """CREATE_DELETE_VOLUME only: nothing to attach."""
        rpc = csi_pb2.ControllerServiceCapability.RPC
        return csi_pb2.ControllerGetCapabilitiesResponse(capabilities=[
            csi_pb2.ControllerServiceCapability(rpc=rpc(type=rpc.CREATE_DELETE_VOLUME))])
