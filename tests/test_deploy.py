"""The manifests under deploy/: every kustomization renders, every object has what its kind needs, image
references and CLI flags match the code, and the node containers start with exactly the DaemonSet's
arguments (paths remapped into a temporary directory)."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
import requests
import yaml

from csi_driver.proto import csi_pb2, csi_pb2_grpc
from modelcache import __version__
from modelcache.settings import Settings
from ocimodel.cli import build_parser
from tests.conftest import needs_root
from tests.helpers.fakekube import FakeKubeAPI

ROOT = Path(__file__).resolve().parent.parent
KUSTOMIZATIONS = ["deploy/base", "deploy/overlays/production", "deploy/overlays/dev", "deploy/examples"]
needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
IMAGE = f"ghcr.io/ocimodel/ocimodel:{__version__}"


def render(path: str) -> list[dict[str, Any]]:
    out = subprocess.run(["kubectl", "kustomize", str(ROOT / path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["template"]["spec"] if obj["kind"] in ("DaemonSet", "Deployment") else obj["spec"]


def ocimodel_containers(objects: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(o, c) for o in objects if o["kind"] in ("DaemonSet", "Deployment")
            for c in pod_spec(o)["containers"] if "ocimodel" in c["image"]]


@needs_kubectl
@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_every_object_has_what_its_kind_requires(path: str) -> None:
    objects = render(path)
    assert objects
    for obj in objects:
        assert obj.get("apiVersion") and obj.get("kind") and obj.get("metadata", {}).get("name"), obj
        kind = obj["kind"]
        if kind in ("DaemonSet", "Deployment"):
            selector = obj["spec"]["selector"]["matchLabels"]
            labels = obj["spec"]["template"]["metadata"]["labels"]
            assert selector.items() <= labels.items()
            volumes = {v["name"] for v in pod_spec(obj).get("volumes", [])}
            for container in pod_spec(obj)["containers"]:
                assert container["name"] and container["image"]
                assert container.get("resources", {}).get("requests"), container["name"]
                assert {m["name"] for m in container.get("volumeMounts", [])} <= volumes
        elif kind in ("Role", "ClusterRole"):
            for rule in obj["rules"]:
                assert rule["apiGroups"] is not None and rule["resources"] and rule["verbs"]
                assert "*" not in rule["verbs"] and "*" not in rule["resources"]
        elif kind in ("RoleBinding", "ClusterRoleBinding"):
            assert obj["roleRef"]["name"] and obj["subjects"]
        elif kind == "Pod":
            assert pod_spec(obj)["containers"]
        elif kind == "StorageClass":
            assert obj["provisioner"] == "ocimodel.csi.dev"
        elif kind == "ConfigMap":
            for value in obj.get("data", {}).values():
                assert '"auth"' not in value and "password" not in value.lower()


@needs_kubectl
def test_base_driver_objects() -> None:
    objects = render("deploy/base")
    driver = by_kind(objects, "CSIDriver")[0]
    assert driver["metadata"]["name"] == "ocimodel.csi.dev"
    assert driver["spec"]["attachRequired"] is False and driver["spec"]["podInfoOnMount"] is True
    assert driver["spec"]["fsGroupPolicy"] == "None"
    assert set(driver["spec"]["volumeLifecycleModes"]) == {"Persistent", "Ephemeral"}
    crd = by_kind(objects, "CustomResourceDefinition")[0]
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}} and version["additionalPrinterColumns"]
    nodes = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["nodes"]
    assert nodes["x-kubernetes-list-type"] == "map" and nodes["x-kubernetes-list-map-keys"] == ["node"]
    for column in version["additionalPrinterColumns"]:
        # the API server prints only the first result of a column's path, and nothing when its type
        # differs from the column's: each column must name one schema field of the same type
        path = column["jsonPath"]
        assert re.fullmatch(r"(\.[A-Za-z]+)+", path), f"{column['name']}: {path} is not a simple field path"
        schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
        for part in path.strip(".").split("."):
            if part == "metadata":
                schema = {"type": "object", "properties": {"creationTimestamp": {"type": "string",
                                                                                 "format": "date-time"}}}
                continue
            schema = schema["properties"][part]
        wanted = "string" if column["type"] == "date" else column["type"]
        assert schema["type"] == wanted, f"column {column['name']} is {column['type']}, {path} is {schema['type']}"
    node = by_kind(objects, "DaemonSet")[0]
    containers = {c["name"]: c for c in pod_spec(node)["containers"]}
    assert set(containers) == {"ocimodel-csi", "ocimodel-fuse", "ocimodel-agent", "node-driver-registrar",
                               "liveness-probe"}
    assert pod_spec(node)["shareProcessNamespace"] is True
    kubelet_mount = [m for m in containers["ocimodel-csi"]["volumeMounts"] if m["mountPath"] == "/var/lib/kubelet"]
    assert kubelet_mount[0]["mountPropagation"] == "Bidirectional"
    assert containers["ocimodel-csi"]["securityContext"]["privileged"] is True
    assert containers["ocimodel-csi"]["livenessProbe"]
    controller = by_kind(objects, "Deployment")[0]
    provisioner = [c for c in pod_spec(controller)["containers"] if c["name"] == "csi-provisioner"][0]
    assert "--extra-create-metadata" in provisioner["args"] and "--leader-election" in provisioner["args"]
    rules = {(g, r): set(rule["verbs"]) for o in by_kind(objects, "ClusterRole") if o["metadata"]["name"] ==
             "ocimodel-node" for rule in o["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    assert rules[("ocimodel.csi.dev", "modelcaches")] == {"get", "list", "watch"}
    assert rules[("ocimodel.csi.dev", "modelcaches/status")] == {"patch"}
    assert rules[("", "events")] == {"create"}
    assert ("", "secrets") not in rules  # no cluster-wide Secret access for nodes
    secret_roles = [o for o in by_kind(objects, "ClusterRole")
                    if o["metadata"]["name"] == "ocimodel-node-pull-secrets"]
    assert secret_roles
    assert secret_roles[0]["rules"] == [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]
    bindings = [b for b in by_kind(objects, "ClusterRoleBinding") if b["roleRef"]["name"] != "ocimodel-controller"]
    assert all(b["roleRef"]["name"] != "ocimodel-node-pull-secrets" for b in bindings)  # never bound cluster-wide
    controller_rules = {(g, r): set(rule["verbs"]) for o in by_kind(objects, "ClusterRole")
                        if o["metadata"]["name"] == "ocimodel-controller" for rule in o["rules"]
                        for g in rule["apiGroups"] for r in rule["resources"]}
    assert {"get", "patch"} <= controller_rules[("", "persistentvolumeclaims")]
    examples = render("deploy/examples")
    binding = by_kind(examples, "RoleBinding")[0]
    assert binding["metadata"]["namespace"] == "inference"
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": "ocimodel-node-pull-secrets"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "ocimodel-node", "namespace": "ocimodel-system"}]
    config = by_kind(objects, "ConfigMap")[0]["data"]["config.yaml"]
    Settings.from_mapping(yaml.safe_load(config))  # the real validation accepts it
    assert by_kind(objects, "Secret")[0]["metadata"]["name"] == "ocimodel-registry-auth"


@needs_kubectl
@pytest.mark.parametrize("path", ["deploy/base", "deploy/overlays/production"])
def test_images_and_flags_match_the_code(path: str) -> None:
    parser = build_parser()
    containers = ocimodel_containers(render(path))
    assert len(containers) == 4
    for _, container in containers:
        assert container["image"] == IMAGE
        args = [re.sub(r"\$\((\w+)\)", "value", a) for a in container["args"]]
        parsed = parser.parse_args(args)
        assert parsed.handler is not None
        if "--config=/etc/ocimodel/config/config.yaml" in args:
            mounts = {m["mountPath"] for m in container["volumeMounts"]}
            assert "/etc/ocimodel/config" in mounts


@needs_kubectl
def test_examples_use_known_volume_attributes() -> None:
    from csi_driver.attributes import parse_volume_context
    from csi_driver.errors import CsiError
    for pod in by_kind(render("deploy/examples"), "Pod"):
        for volume in pod_spec(pod)["volumes"]:
            if "csi" in volume:
                attributes = volume["csi"]["volumeAttributes"]
                if attributes.get("mount") == "lazy":
                    with pytest.raises(CsiError):
                        parse_volume_context(attributes)
                else:
                    parse_volume_context(attributes)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@needs_kubectl
@needs_root
def test_node_containers_start_with_the_daemonset_arguments(tmp_path: Path) -> None:
    objects = render("deploy/base")
    daemonset = by_kind(objects, "DaemonSet")[0]
    config_text = by_kind(objects, "ConfigMap")[0]["data"]["config.yaml"]
    remap = {"/etc/ocimodel/config": str(tmp_path / "config"), "/etc/ocimodel/auth": str(tmp_path / "auth"),
             "/var/lib/ocimodel": str(tmp_path / "cache"), "/csi": str(tmp_path / "csi")}
    (tmp_path / "config").mkdir()
    (tmp_path / "auth").mkdir()
    config = yaml.safe_load(config_text)
    config["root"] = remap["/var/lib/ocimodel"]
    config["dockerConfig"] = config["dockerConfig"].replace("/etc/ocimodel/auth", remap["/etc/ocimodel/auth"])
    (tmp_path / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "auth" / "config.json").write_text('{"auths": {}}')
    api = FakeKubeAPI()
    api.route("GET", "/api/v1/nodes/node-x", (200, {"kind": "Node", "apiVersion": "v1",
                                                    "metadata": {"name": "node-x", "labels": {}}}))
    api.route("GET", "/apis/ocimodel.csi.dev/v1alpha1/modelcaches", (200, {
        "kind": "ModelCacheList", "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": []}))
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({"apiVersion": "v1", "kind": "Config", "current-context": "c",
                                      "clusters": [{"name": "c", "cluster": {"server": api.url}}],
                                      "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
                                      "users": [{"name": "u", "user": {}}]}))
    processes = []
    ports = {}
    try:
        for container in pod_spec(daemonset)["containers"]:
            if "ocimodel" not in container["image"]:
                continue
            env = {"PATH": "/usr/bin:/bin", "KUBECONFIG": str(kubeconfig)}
            for item in container.get("env", []):
                env[item["name"]] = "node-x" if "fieldRef" in item.get("valueFrom", {}) else item.get("value", "")
            args = []
            for arg in container["args"]:
                arg = re.sub(r"\$\((\w+)\)", lambda m, e=env: e[m.group(1)], arg)  # type: ignore[misc]
                for old, new in remap.items():
                    arg = arg.replace(f"={old}", f"={new}").replace(f"unix://{old}", f"unix://{new}")
                if arg.startswith("--metrics-address="):
                    ports[container["name"]] = _free_port()
                    arg = f"--metrics-address=127.0.0.1:{ports[container['name']]}"
                args.append(arg)
            log = (tmp_path / f"{container['name']}.log").open("wb")
            processes.append(subprocess.Popen([sys.executable, "-m", "ocimodel.cli", *args], env=env, stdout=log,
                                              stderr=subprocess.STDOUT))
        channel = grpc.insecure_channel(f"unix:{tmp_path / 'csi' / 'csi.sock'}")
        identity = csi_pb2_grpc.IdentityStub(channel)
        deadline = time.monotonic() + 30
        ready = False
        while time.monotonic() < deadline and not ready:
            try:
                ready = identity.Probe(csi_pb2.ProbeRequest(), timeout=1).ready.value
            except grpc.RpcError:
                time.sleep(0.1)
        assert ready, (tmp_path / "ocimodel-csi.log").read_text()
        info = csi_pb2_grpc.NodeStub(channel).NodeGetInfo(csi_pb2.NodeGetInfoRequest())
        assert info.node_id == "node-x"
        for name, port in ports.items():
            text = ""
            while time.monotonic() < deadline:
                try:
                    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
                    break
                except requests.ConnectionError:
                    time.sleep(0.1)
            assert "ocimodel_" in text, (name, (tmp_path / f"{name}.log").read_text())
        assert all(p.poll() is None for p in processes)
        assert any(r.path == "/api/v1/nodes/node-x" for r in api.requests)
    finally:
        for process in processes:
            process.terminate()
            process.wait(20)
        api.close()


def test_every_dependency_is_pinned_for_the_image() -> None:
    """The Dockerfile and scripts/install.sh install through constraints.txt, which pins every dependency."""
    import tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wanted = [re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0] for d in
              project["project"]["dependencies"] + project["build-system"]["requires"]]
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    for name in wanted:
        assert pins.get(re.sub(r"[-_.]+", "-", name).lower()), f"{name} is not pinned in constraints.txt"
    assert "-c constraints.txt" in (ROOT / "scripts" / "install.sh").read_text()
    assert "-c constraints.txt" in (ROOT / "Dockerfile").read_text()
