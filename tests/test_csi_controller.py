"""CSI Controller service over real gRPC against the real server process, and the PVC lookup through the
Kubernetes adapter against an HTTP-level fake API server."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi_driver.controller import PVC_REFERENCE_ANNOTATION, RESOLVED_ANNOTATION, ControllerService
from csi_driver.errors import CsiError
from csi_driver.proto import csi_pb2
from kubeadapter.client import KubeClient
from modelcache.settings import Settings
from tests.conftest import needs_root
from tests.helpers.csi import CsiProcess, Mode, block_capability, code_of, mount_capability, publish_request
from tests.helpers.fakekube import FakeKubeAPI, Recorded, write_kubeconfig
from tests.helpers.oci import Fixtures

OK, INVALID = grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture
def csi(tmp_path: Path) -> Iterator[CsiProcess]:
    process = CsiProcess(tmp_path, mode="controller")
    yield process
    process.stop()


def create(name: str, **parameters: str) -> csi_pb2.CreateVolumeRequest:
    return csi_pb2.CreateVolumeRequest(name=name, parameters=parameters,
                                       volume_capabilities=[mount_capability(Mode.MULTI_NODE_READER_ONLY)])


def test_create_resolves_tag_to_digest_and_is_idempotent(csi: CsiProcess, fixtures: Fixtures) -> None:
    files = {"w": os.urandom(5000), "c.json": b"{}"}
    digest = fixtures.raw_model("ctl/model:v1", files)
    request = create("pvc-1", reference=fixtures.ref("ctl/model:v1"), include="*.json")
    first = csi.controller.CreateVolume(request).volume
    assert first.volume_context["reference"] == f"{fixtures.ref('ctl/model:v1')}@{digest}"
    assert first.volume_context["include"] == "*.json"
    assert first.capacity_bytes == sum(len(v) for v in files.values())
    fixtures.raw_model("ctl/model:v1", {"w": b"moved tag"})
    again = csi.controller.CreateVolume(request).volume
    assert again == first
    other = csi.controller.CreateVolume(create("pvc-2", reference=fixtures.ref("ctl/model:v1"))).volume
    assert other.volume_id != first.volume_id


def test_create_conflicts_and_argument_checks(csi: CsiProcess, fixtures: Fixtures) -> None:
    fixtures.raw_model("ctl/c:v1", {"w": b"12345"})
    ref = fixtures.ref("ctl/c:v1")
    csi.controller.CreateVolume(create("pvc-x", reference=ref))
    assert code_of(csi.controller.CreateVolume, create("pvc-x", reference=ref, include="*")) == \
        grpc.StatusCode.ALREADY_EXISTS
    with_block = csi_pb2.CreateVolumeRequest(name="b", parameters={"reference": ref},
                                             volume_capabilities=[block_capability()])
    from_snapshot = create("s", reference=ref)
    from_snapshot.volume_content_source.snapshot.snapshot_id = "snap"
    too_small = create("small", reference=ref)
    too_small.capacity_range.limit_bytes = 2
    cases = [
        (csi_pb2.CreateVolumeRequest(parameters={"reference": ref}, volume_capabilities=[mount_capability()]), INVALID),
        (csi_pb2.CreateVolumeRequest(name="n", parameters={"reference": ref}), INVALID),
        (create("n"), INVALID),
        (create("n", reference=ref, colour="red"), INVALID),
        (with_block, INVALID),
        (from_snapshot, INVALID),
        (create("n", reference=fixtures.ref("ctl/absent:v1")), grpc.StatusCode.NOT_FOUND),
        (too_small, grpc.StatusCode.OUT_OF_RANGE),
    ]
    for request, code in cases:
        assert code_of(csi.controller.CreateVolume, request) == code, request


def test_delete_validate_and_capabilities(csi: CsiProcess, fixtures: Fixtures) -> None:
    fixtures.raw_model("ctl/d:v1", {"w": b"1"})
    volume = csi.controller.CreateVolume(create("pvc-d", reference=fixtures.ref("ctl/d:v1"))).volume
    good = csi_pb2.ValidateVolumeCapabilitiesRequest(volume_id=volume.volume_id, volume_context=volume.volume_context,
                                                     volume_capabilities=[mount_capability()])
    assert csi.controller.ValidateVolumeCapabilities(good).confirmed.volume_capabilities
    writer = csi_pb2.ValidateVolumeCapabilitiesRequest(volume_id=volume.volume_id,
                                                       volume_capabilities=[mount_capability(Mode.MULTI_NODE_MULTI_WRITER)])
    answer = csi.controller.ValidateVolumeCapabilities(writer)
    assert not answer.HasField("confirmed") and "read-only" in answer.message
    unknown = csi_pb2.ValidateVolumeCapabilitiesRequest(volume_id="nope", volume_capabilities=[mount_capability()])
    assert code_of(csi.controller.ValidateVolumeCapabilities, unknown) == grpc.StatusCode.NOT_FOUND
    assert code_of(csi.controller.ValidateVolumeCapabilities,
                   csi_pb2.ValidateVolumeCapabilitiesRequest(volume_id=volume.volume_id)) == INVALID
    csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id))
    csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id))
    assert code_of(csi.controller.DeleteVolume, csi_pb2.DeleteVolumeRequest()) == INVALID
    deleted = csi_pb2.ValidateVolumeCapabilitiesRequest(volume_id=volume.volume_id,
                                                        volume_capabilities=[mount_capability()])
    assert code_of(csi.controller.ValidateVolumeCapabilities, deleted) == grpc.StatusCode.NOT_FOUND
    caps = csi.controller.ControllerGetCapabilities(csi_pb2.ControllerGetCapabilitiesRequest()).capabilities
    assert [c.rpc.type for c in caps] == [csi_pb2.ControllerServiceCapability.RPC.CREATE_DELETE_VOLUME]


def test_controller_state_survives_restart(csi: CsiProcess, fixtures: Fixtures, tmp_path: Path) -> None:
    fixtures.raw_model("ctl/r:v1", {"w": b"r"})
    request = create("pvc-r", reference=fixtures.ref("ctl/r:v1"))
    first = csi.controller.CreateVolume(request).volume
    fixtures.raw_model("ctl/r:v1", {"w": b"the tag moved"})
    csi.restart()  # the container restarts; its state directory (an emptyDir) stays
    assert csi.controller.CreateVolume(request).volume == first


def stored_pvc(api: FakeKubeAPI, namespace: str, name: str, annotations: dict[str, str]) -> dict[str, str]:
    """A PVC the fake API server keeps: GET answers it, a merge patch changes its annotations."""
    path = f"/api/v1/namespaces/{namespace}/persistentvolumeclaims/{name}"

    def body() -> dict[str, object]:
        return {"kind": "PersistentVolumeClaim", "apiVersion": "v1",
                "metadata": {"name": name, "namespace": namespace, "annotations": dict(annotations)}}

    def patch(request: Recorded) -> tuple[int, object]:
        assert request.content_type == "application/merge-patch+json"
        annotations.update(request.body["metadata"]["annotations"])
        return 200, body()

    api.route("GET", path, lambda _r: (200, body()))
    api.route("PATCH", path, patch)
    return annotations


def test_create_volume_answer_survives_controller_replacement(tmp_path: Path, fixtures: Fixtures) -> None:
    """The provisioner retries CreateVolume after the controller pod was replaced (its emptyDir gone) and
    the tag moved: the answer is the same, because it was kept on the PVC before it was given."""
    fixtures.raw_model("ctl/moving:v1", {"w": b"first"})
    api = FakeKubeAPI()
    annotations = stored_pvc(api, "team-a", "weights", {})
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", api.url)
    request = create("pvc-0d3f", reference=fixtures.ref("ctl/moving:v1"),
                     **{"csi.storage.k8s.io/pvc/name": "weights", "csi.storage.k8s.io/pvc/namespace": "team-a",
                        "csi.storage.k8s.io/pv/name": "pvc-0d3f"})
    first_pod = CsiProcess(tmp_path / "pod-1", "--state-dir", str(tmp_path / "state-1"), mode="controller",
                           kubeconfig=str(kubeconfig))
    try:
        first = first_pod.controller.CreateVolume(request).volume
    finally:
        first_pod.stop()
    assert json.loads(annotations["ocimodel.csi.dev/resolved-volume"])["volume_context"] == \
        dict(first.volume_context)
    fixtures.raw_model("ctl/moving:v1", {"w": b"the tag moved on"})
    second_pod = CsiProcess(tmp_path / "pod-2", "--state-dir", str(tmp_path / "state-2"), mode="controller",
                            kubeconfig=str(kubeconfig))
    try:
        assert second_pod.controller.CreateVolume(request).volume == first
        changed = create("pvc-0d3f", reference=fixtures.ref("ctl/moving:v1"), include="*.json",
                         **{"csi.storage.k8s.io/pvc/name": "weights", "csi.storage.k8s.io/pvc/namespace": "team-a"})
        assert code_of(second_pod.controller.CreateVolume, changed) == grpc.StatusCode.ALREADY_EXISTS
    finally:
        second_pod.stop()
        api.close()


@needs_root
def test_pv_from_controller_mounts_the_pinned_digest(tmp_path: Path, fixtures: Fixtures) -> None:
    fixtures.raw_model("ctl/pin:v1", {"w": b"original"})
    csi = CsiProcess(tmp_path, mode="all")
    try:
        volume = csi.controller.CreateVolume(create("pvc-pin", reference=fixtures.ref("ctl/pin:v1"))).volume
        fixtures.raw_model("ctl/pin:v1", {"w": b"tag moved on"})
        target = tmp_path / "pod" / "mnt"
        target.parent.mkdir()
        csi.node.NodePublishVolume(publish_request(volume.volume_id, target, volume.volume_context["reference"],
                                                   capability=mount_capability(Mode.MULTI_NODE_READER_ONLY)))
        assert (target / "w").read_bytes() == b"original"
        csi.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume.volume_id,
                                                                        target_path=str(target)))
    finally:
        subprocess.run(["umount", str(tmp_path / "pod" / "mnt")], check=False, capture_output=True)
        csi.stop()


# -- PVC annotation through the Kubernetes adapter --------------------------------------------------------

def test_reference_from_pvc_annotation(tmp_path: Path, fixtures: Fixtures) -> None:
    fixtures.raw_model("ctl/pvc:v1", {"w": b"from annotation"})
    api = FakeKubeAPI()
    try:
        stored_pvc(api, "team-a", "claim-1", {PVC_REFERENCE_ANNOTATION: fixtures.ref("ctl/pvc:v1")})
        settings = Settings(root=tmp_path)
        settings.hosts.plain_http = True
        controller = ControllerService(settings, tmp_path, pvcs=KubeClient.for_url(api.url))
        request = create("pvc-from-annotation", **{"csi.storage.k8s.io/pvc/name": "claim-1",
                                                   "csi.storage.k8s.io/pvc/namespace": "team-a"})
        volume = controller.create(request)
        assert volume.volume_context["reference"].startswith(fixtures.ref("ctl/pvc:v1") + "@sha256:")
        assert [(r.method, r.path) for r in api.requests] == [
            ("GET", "/api/v1/namespaces/team-a/persistentvolumeclaims/claim-1"),
            ("PATCH", "/api/v1/namespaces/team-a/persistentvolumeclaims/claim-1")]
        recorded = json.loads(api.requests[1].body["metadata"]["annotations"][RESOLVED_ANNOTATION])
        assert recorded["name"] == "pvc-from-annotation" and recorded["volume_context"] == dict(volume.volume_context)
        missing = create("pvc-missing", **{"csi.storage.k8s.io/pvc/name": "absent",
                                           "csi.storage.k8s.io/pvc/namespace": "team-a"})
        with pytest.raises(CsiError) as info:
            controller.create(missing)
        assert info.value.code == grpc.StatusCode.NOT_FOUND
    finally:
        api.close()


def test_resolved_volume_annotation_is_trusted_only_for_the_class_model(tmp_path: Path, fixtures: Fixtures) -> None:
    """A PVC author who writes the resolved-volume annotation cannot swap the StorageClass's model (or
    its options, or the volume id): such an annotation is ignored, and the volume resolved again."""
    fixtures.raw_model("ctl/class-model:v1", {"w": b"the class's model"})
    evil = fixtures.ref("ctl/evil:v1") + "@" + fixtures.raw_model("ctl/evil:v1", {"w": b"the PVC author's model"})
    other = fixtures.ref("ctl/class-model:v0") + "@" + fixtures.raw_model("ctl/class-model:v0", {"w": b"old"})
    api = FakeKubeAPI()
    try:
        annotations = stored_pvc(api, "team-a", "claim", {})
        settings = Settings(root=tmp_path)
        settings.hosts.plain_http = True
        pvc = {"csi.storage.k8s.io/pvc/name": "claim", "csi.storage.k8s.io/pvc/namespace": "team-a"}
        request = create("pvc-class", reference=fixtures.ref("ctl/class-model:v1"), include="*", **pvc)
        honest = ControllerService(settings, tmp_path / "first", pvcs=KubeClient.for_url(api.url)).create(request)
        genuine = json.loads(annotations[RESOLVED_ANNOTATION])
        forgeries = {
            "another repository": {"reference": evil},
            "another tag": {"reference": other},
            "a digest the repository does not hold": {"reference": fixtures.ref("ctl/class-model:v1") + "@" +
                                                      evil.rpartition("@")[2]},
            "other options": {"include": "", "exclude": "*"},
        }
        for i, (what, change) in enumerate(forgeries.items()):
            forged = {**genuine, "volume_context": {**genuine["volume_context"], **change}}
            annotations[RESOLVED_ANNOTATION] = json.dumps(forged)
            controller = ControllerService(settings, tmp_path / f"replaced-{i}", pvcs=KubeClient.for_url(api.url))
            assert controller.create(request) == honest, what
            assert json.loads(annotations[RESOLVED_ANNOTATION]) == genuine, what  # the annotation is rewritten
        annotations[RESOLVED_ANNOTATION] = json.dumps({**genuine, "volume_id": "ocimodel-someone-elses-volume"})
        replaced = ControllerService(settings, tmp_path / "replaced-id", pvcs=KubeClient.for_url(api.url))
        assert replaced.create(request) == honest
    finally:
        api.close()
