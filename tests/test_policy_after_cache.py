"""A signature policy added to a node whose cache already holds models: the plugin, restarted with the policy,
publishes a model it cached before only once the policy's check passes. An unsigned cached model is refused
(bind and lazy, by tag and by digest) and nothing is mounted; a signed one is checked and published; one whose
registry is gone cannot be checked and is refused as UNAVAILABLE, never passed on the strength of the cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import grpc

from csi_driver.proto import csi_pb2
from tests.conftest import needs_root
from tests.helpers.csi import CsiProcess, is_mounted, publish_request
from tests.helpers.oci import Fixtures
from tests.helpers.proxy import RegistryProxy
from tests.helpers.registry import RunningRegistry
from tests.test_signatures import cosign_signature, model, write_keys

pytestmark = needs_root
OK, REFUSED = grpc.StatusCode.OK, grpc.StatusCode.FAILED_PRECONDITION


def test_models_cached_before_a_policy_existed_are_checked_at_publish(tmp_path: Path, fixtures: Fixtures,
                                                                       registry: RunningRegistry) -> None:
    key, _, public = write_keys(tmp_path, "release")
    unsigned = model(fixtures, "prod/unsigned:v1")
    signed = model(fixtures, "prod/signed:v1")
    cosign_signature(fixtures, "prod/signed", signed, key)
    away = RegistryProxy(registry.host)  # a registry that will be gone once the policy is in force
    offline = model(fixtures, "prod/offline:v1")
    cosign_signature(fixtures, "prod/offline", offline, key, identity=f"{away.host}/prod/offline")
    refs = {"unsigned": fixtures.ref("prod/unsigned:v1"), "unsigned-digest": fixtures.ref(f"prod/unsigned@{unsigned}"),
            "signed": fixtures.ref("prod/signed:v1"), "offline": f"{away.host}/prod/offline@{offline}"}
    root = tmp_path / "root"
    count = 0

    def publish(csi: CsiProcess, ref: str, mount: str = "bind") -> tuple[grpc.StatusCode, Path, str]:
        nonlocal count
        count += 1
        target = tmp_path / "pods" / f"p{count}" / "mnt"
        request = publish_request(f"vol-{count}", target, ref, mount=mount)
        try:
            csi.node.NodePublishVolume(request, timeout=60)
        except grpc.RpcError as exc:
            return exc.code(), target, exc.details() or ""
        csi.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id=f"vol-{count}",
                                                                        target_path=str(target)), timeout=30)
        return OK, target, ""

    before = CsiProcess(tmp_path / "before", root=root)  # no policy yet: everything is published and cached
    try:
        for name in ("unsigned", "signed", "offline"):
            assert publish(before, refs[name])[0] == OK, name
        away.close()
        assert publish(before, refs["offline"])[0] == OK  # cached by digest: no registry needed without a policy
    finally:
        before.stop()
    assert len([p for p in (root / "trees").iterdir() if not p.name.startswith(".")]) == 3
    assert not (root / "verdicts").exists() or not list((root / "verdicts").iterdir())

    config = tmp_path / "node.yaml"
    config.write_text(json.dumps({"signaturePolicy": [{"name": "prod", "keys": [str(public)], "match": [
        f"{fixtures.host}/prod/*", f"{away.host}/prod/*"]}]}))
    after = CsiProcess(tmp_path / "after", "--config", str(config), root=root)
    try:
        for name, mount in (("unsigned", "bind"), ("unsigned", "lazy"), ("unsigned-digest", "bind"),
                            ("unsigned-digest", "lazy")):
            if mount == "lazy" and not os.path.exists("/dev/fuse"):
                continue
            code, target, details = publish(after, refs[name], mount)
            assert code == REFUSED, (name, mount, code, details)
            assert f"signature required by policy 'prod': no signature by key release.pub for {unsigned}" in details
            assert not is_mounted(target) and not target.exists()
        code, target, details = publish(after, refs["offline"])
        assert code == grpc.StatusCode.UNAVAILABLE, (code, details)  # cannot be checked: never a pass
        assert not is_mounted(target) and not target.exists()
        code, _, details = publish(after, refs["signed"])
        assert code == OK, details
        verdicts = [json.loads(p.read_text()) for p in (root / "verdicts").iterdir()]
        assert [(v["rule"], v["repository"], v["signer"]) for v in verdicts] == [("prod", "prod/signed", "release.pub")]
    finally:
        after.stop()
