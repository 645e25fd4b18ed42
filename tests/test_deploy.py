"""The manifests under deploy/: every kustomization renders, every object has what its kind needs, image
references and CLI flags match the code, the node containers start with exactly the DaemonSet's
arguments (paths remapped into a temporary directory), and every overlay as rendered holds only the
privileges its containers and service accounts use, each with its reason recorded."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

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
from tests.helpers.kustomize import render

ROOT = Path(__file__).resolve().parent.parent
# the driver as installed: the base and every overlay (a new overlay is checked without being listed here)
OVERLAYS = sorted(f"deploy/overlays/{p.parent.name}" for p in (ROOT / "deploy/overlays").glob("*/kustomization.yaml"))
DRIVER_KUSTOMIZATIONS = ["deploy/base", *OVERLAYS]
KUSTOMIZATIONS = [*DRIVER_KUSTOMIZATIONS, "deploy/examples"]
IMAGE = f"ghcr.io/ocimodel/ocimodel:{__version__}"


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["template"]["spec"] if obj["kind"] in ("DaemonSet", "Deployment") else obj["spec"]


def ocimodel_containers(objects: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(o, c) for o in objects if o["kind"] in ("DaemonSet", "Deployment")
            for c in pod_spec(o)["containers"] if "ocimodel" in c["image"]]


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
    assert set(containers) == {"ocimodel-csi", "ocimodel-agent", "node-driver-registrar", "liveness-probe"}
    assert "shareProcessNamespace" not in pod_spec(node)  # FUSE servers run in mount pods, not beside the plugin
    env = {e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
           for e in containers["ocimodel-csi"]["env"]}
    assert env["POD_NAME"] == "metadata.name" and env["POD_NAMESPACE"] == "metadata.namespace"
    kubelet_mount = [m for m in containers["ocimodel-csi"]["volumeMounts"] if m["mountPath"] == KUBELET_PODS]
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
    assert ("", "secrets") not in controller_rules  # provisioner secrets: per namespace, below
    provisioner_secrets = [o for o in by_kind(objects, "ClusterRole")
                           if o["metadata"]["name"] == "ocimodel-controller-provisioner-secrets"]
    assert provisioner_secrets[0]["rules"] == [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]
    examples = render("deploy/examples")
    binding = next(b for b in by_kind(examples, "RoleBinding") if b["metadata"]["name"] == "ocimodel-node-pull-secrets")
    assert binding["metadata"]["namespace"] == "inference"
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": "ocimodel-node-pull-secrets"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "ocimodel-node", "namespace": "ocimodel-system"}]
    # the StorageClass's provisioner-secret-namespace gets the controller's RoleBinding
    storage_class = by_kind(examples, "StorageClass")[0]
    binding = next(b for b in by_kind(examples, "RoleBinding")
                   if b["metadata"]["name"] == "ocimodel-controller-provisioner-secrets")
    parameters = storage_class["parameters"]
    assert binding["metadata"]["namespace"] == parameters["csi.storage.k8s.io/provisioner-secret-namespace"]
    assert binding["roleRef"]["name"] == "ocimodel-controller-provisioner-secrets"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "ocimodel-controller",
                                    "namespace": "ocimodel-system"}]
    config = by_kind(objects, "ConfigMap")[0]["data"]["config.yaml"]
    Settings.from_mapping(yaml.safe_load(config))  # the real validation accepts it
    assert by_kind(objects, "Secret")[0]["metadata"]["name"] == "ocimodel-registry-auth"


@pytest.mark.parametrize("path", ["deploy/base", "deploy/overlays/production"])
def test_images_and_flags_match_the_code(path: str) -> None:
    parser = build_parser()
    containers = ocimodel_containers(render(path))
    assert len(containers) == 3  # csi, agent, controller (FUSE servers run in mount pods)
    for _, container in containers:
        assert container["image"] == IMAGE
        args = [re.sub(r"\$\((\w+)\)", "value", a) for a in container["args"]]
        parsed = parser.parse_args(args)
        assert parsed.handler is not None
        if "--config=/etc/ocimodel/config/config.yaml" in args:
            mounts = {m["mountPath"] for m in container["volumeMounts"]}
            assert "/etc/ocimodel/config" in mounts


def test_examples_use_known_volume_attributes() -> None:
    """Every CSI volume and StorageClass of the examples parses as the node would parse it (lazy included);
    a misspelled key in one of them would be refused, so this check can fail."""
    from csi_driver.attributes import parse_volume_context
    from csi_driver.errors import CsiError
    examples = render("deploy/examples")
    contexts = [{k: v for k, v in sc["parameters"].items() if not k.startswith("csi.storage.k8s.io/")}
                for sc in by_kind(examples, "StorageClass")]
    contexts += [volume["csi"]["volumeAttributes"] for pod in by_kind(examples, "Pod")
                 for volume in pod_spec(pod)["volumes"] if "csi" in volume]
    assert len(contexts) >= 3 and any(c.get("mount") == "lazy" for c in contexts)
    for context in contexts:
        spec = parse_volume_context(context, lazy_supported=True)
        assert str(spec.reference) and spec.mount == context.get("mount", "bind")
        with pytest.raises(CsiError, match="unknown volume attributes"):
            parse_volume_context({**context, "refrence": context["reference"]}, lazy_supported=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


CAP_BITS = {"NET_BIND_SERVICE": 10, "IPC_LOCK": 14, "SYS_ADMIN": 21, "SYS_RESOURCE": 24}


def confined(obj: dict[str, Any], container: dict[str, Any]) -> list[str]:
    """A setpriv prefix that runs a process with only what the container's securityContext grants: its uid,
    the capabilities it adds (all others dropped from the bounding set) and no_new_privs. Privileged
    containers run as they are."""
    security = effective_security(obj, container)
    if security.get("privileged"):
        return []
    uid = security.get("runAsUser", 0)
    added = [c.lower() for c in (security.get("capabilities") or {}).get("add") or []]
    prefix = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all",
              "--bounding-set=" + ",".join(["-all", *(f"+{c}" for c in added)])]
    if security.get("allowPrivilegeEscalation") is False:
        prefix.append("--no-new-privs")
    return prefix


@needs_root
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) missing")
def test_node_containers_start_with_the_daemonset_arguments(tmp_path: Path) -> None:
    """The ocimodel containers of the DaemonSet started with its arguments, and each with no more privilege
    than its securityContext grants (the agent: uid 0 with IPC_LOCK alone, no_new_privs)."""
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
    api.route("GET", "/api/v1/namespaces/node-x/pods", (200, {"kind": "PodList", "apiVersion": "v1", "metadata": {},
                                                             "items": []}))
    api.route("GET", "/apis/ocimodel.csi.dev/v1alpha1/modelcaches", (200, {
        "kind": "ModelCacheList", "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": []}))
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({"apiVersion": "v1", "kind": "Config", "current-context": "c",
                                      "clusters": [{"name": "c", "cluster": {"server": api.url}}],
                                      "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
                                      "users": [{"name": "u", "user": {}}]}))
    processes = []
    bounded: dict[int, int] = {}  # index in processes -> the capability set it may hold
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
            if confined(daemonset, container):
                security = effective_security(daemonset, container)
                bounded[len(processes)] = sum(1 << CAP_BITS[c] for c in security["capabilities"].get("add", []))
            processes.append(subprocess.Popen([*confined(daemonset, container), sys.executable, "-m", "ocimodel.cli",
                                               *args], env=env, stdout=log,
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
        assert bounded  # the agent at least
        for index, mask in bounded.items():
            status = Path(f"/proc/{processes[index].pid}/status").read_text()
            caps = dict(line.split(":\t") for line in status.splitlines() if line.startswith("Cap"))
            assert int(caps["CapBnd"], 16) == mask and int(caps["CapEff"], 16) & ~mask == 0, caps
        assert any(r.path == "/api/v1/nodes/node-x" for r in api.requests)
        # POD_NAME and POD_NAMESPACE (both "node-x" here): the plugin looks for its mount pods at start
        assert any(r.path == "/api/v1/namespaces/node-x/pods" and r.query["labelSelector"] == [
            "ocimodel.csi.dev/mount-pod=true,ocimodel.csi.dev/node=node-x"] for r in api.requests)
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


# -- least privilege, as rendered (issue 23) ------------------------------------------------------------------
# A container's extra privileges are allowed only with their reason on the pod template, one annotation per
# container and kind of privilege (YAML comments vanish when rendered; annotations stay on the object):
#   ocimodel.csi.dev/privileged-because.<container>    privileged: true
#   ocimodel.csi.dev/capabilities-because.<container>  any capabilities.add (the text names each one)
#   ocimodel.csi.dev/root-because.<container>          runs as uid 0 (or not declared non-root)
REASONS = {"privileged": "ocimodel.csi.dev/privileged-because.",
           "capabilities": "ocimodel.csi.dev/capabilities-because.",
           "root": "ocimodel.csi.dev/root-because."}
KUBELET = "/var/lib/kubelet"
KUBELET_PODS = "/var/lib/kubelet/pods"
PLUGIN_DIR = "/var/lib/kubelet/plugins/ocimodel.csi.dev"
REGISTRATION_DIR = "/var/lib/kubelet/plugins_registry"
# the only kubelet directories the node pod may see, and who may write to each
KUBELET_WRITERS = {KUBELET_PODS: {"ocimodel-csi"}, PLUGIN_DIR: {"ocimodel-csi"},
                   REGISTRATION_DIR: {"node-driver-registrar"}}
NODE_NAME_KEY = "authentication.kubernetes.io/node-name"


def workloads(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] in ("DaemonSet", "Deployment")]


def effective_security(obj: dict[str, Any], container: dict[str, Any]) -> dict[str, Any]:
    """The container's securityContext with the pod-level fields it inherits (runAsUser, runAsNonRoot,
    seccompProfile) filled in where the container does not set them."""
    pod = pod_spec(obj).get("securityContext") or {}
    own = dict(container.get("securityContext") or {})
    for key in ("runAsUser", "runAsNonRoot", "seccompProfile"):
        if key not in own and key in pod:
            own[key] = pod[key]
    return own


def may_run_as_root(security: dict[str, Any]) -> bool:
    if "runAsUser" in security:
        return bool(security["runAsUser"] == 0)
    return security.get("runAsNonRoot") is not True  # the image decides, and may say root


def host_paths(obj: dict[str, Any]) -> dict[str, str]:
    return {v["name"]: v["hostPath"]["path"].rstrip("/") or "/"
            for v in pod_spec(obj).get("volumes", []) if "hostPath" in v}


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_every_privilege_has_a_recorded_reason(path: str) -> None:
    for obj in workloads(render(path)):
        annotations = obj["spec"]["template"]["metadata"].get("annotations") or {}
        names = {c["name"] for c in pod_spec(obj)["containers"]}
        needed: set[str] = set()
        for container in pod_spec(obj)["containers"]:
            name, security = container["name"], effective_security(obj, container)
            where = f"{path}: {obj['metadata']['name']}/{name}"
            if security.get("privileged"):
                needed.add(REASONS["privileged"] + name)
            added = (security.get("capabilities") or {}).get("add") or []
            if added:
                needed.add(REASONS["capabilities"] + name)
                reason = annotations.get(REASONS["capabilities"] + name, "")
                for capability in added:
                    assert capability in reason, f"{where} adds {capability} without saying why"
            if may_run_as_root(security):
                needed.add(REASONS["root"] + name)
            for key in needed:
                if key.endswith("." + name):
                    assert len(annotations.get(key, "").split()) >= 5, f"{where}: no reason recorded in {key}"
        recorded = {k for k in annotations if any(k.startswith(prefix) for prefix in REASONS.values())}
        assert recorded <= needed, f"{path}: reasons for privileges no container holds: {sorted(recorded - needed)}"
        assert {k.rsplit(".", 1)[1] for k in recorded} <= names


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_containers_are_confined(path: str) -> None:
    """Every container: read-only root filesystem. Every container that is not privileged: seccomp
    RuntimeDefault (its own or the pod's), no privilege escalation, all capabilities dropped (adds named
    above), and never SYS_ADMIN."""
    for obj in workloads(render(path)):
        for container in [*pod_spec(obj).get("initContainers", []), *pod_spec(obj)["containers"]]:
            security = effective_security(obj, container)
            where = f"{path}: {obj['metadata']['name']}/{container['name']}"
            assert security.get("readOnlyRootFilesystem") is True, where
            if security.get("privileged"):
                continue
            assert (security.get("seccompProfile") or {}).get("type") == "RuntimeDefault", where
            assert security.get("allowPrivilegeEscalation") is False, where
            capabilities = security.get("capabilities") or {}
            assert "ALL" in (capabilities.get("drop") or []), where
            assert "SYS_ADMIN" not in (capabilities.get("add") or []), where


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_host_paths_are_only_what_each_container_uses(path: str) -> None:
    """No hostPath of the whole kubelet directory (it holds every pod's Secret volumes) or anything above it;
    only the pods, plugin and registration directories, writable only by the containers that write there;
    Bidirectional propagation only for the pods directory, in privileged containers."""
    for obj in workloads(render(path)):
        paths = host_paths(obj)
        for volume, host in paths.items():
            assert not (host == KUBELET or KUBELET.startswith(host.rstrip("/") + "/")), \
                f"{path}: volume {volume} mounts {host}, all of the kubelet directory"
            if host.startswith(KUBELET + "/"):
                assert host in KUBELET_WRITERS, f"{path}: volume {volume} mounts {host}"
        for container in [*pod_spec(obj).get("initContainers", []), *pod_spec(obj)["containers"]]:
            privileged = bool(effective_security(obj, container).get("privileged"))
            for mount in container.get("volumeMounts", []):
                source = paths.get(mount["name"], "")
                where = f"{path}: {container['name']} mounts {source} at {mount['mountPath']}"
                if mount.get("mountPropagation") == "Bidirectional":
                    assert privileged and source == KUBELET_PODS, where
                if source in KUBELET_WRITERS and container["name"] not in KUBELET_WRITERS[source]:
                    assert mount.get("readOnly") is True, f"{where}: it only reads there, so read-only"


def _subjects_of(objects: list[dict[str, Any]], role: str) -> list[dict[str, Any]]:
    return [s for b in by_kind(objects, "ClusterRoleBinding") if b["roleRef"]["kind"] == "ClusterRole"
            and b["roleRef"]["name"] == role for s in b["subjects"]]


def _grants(role: dict[str, Any], resource: str, verbs: set[str]) -> bool:
    return any(("" in r["apiGroups"] or "*" in r["apiGroups"]) and (resource in r["resources"] or "*" in r["resources"])
               and (set(r["verbs"]) & (verbs | {"*"})) for r in role.get("rules", []))


def _node_policies(objects: list[dict[str, Any]]) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """Validating admission policies (and their Deny bindings) that check updates of Nodes."""
    found = []
    for policy in by_kind(objects, "ValidatingAdmissionPolicy"):
        rules = policy["spec"].get("matchConstraints", {}).get("resourceRules", [])
        if not any("nodes" in r.get("resources", []) and {"UPDATE", "*"} & set(r.get("operations", [])) for r in rules):
            continue
        bindings = [b for b in by_kind(objects, "ValidatingAdmissionPolicyBinding")
                    if b["spec"]["policyName"] == policy["metadata"]["name"]
                    and "Deny" in b["spec"]["validationActions"]]
        found.append((policy, bindings))
    return found


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_cluster_roles_grant_no_secrets_and_node_writes_are_policed(path: str) -> None:
    objects = render(path)
    roles = {o["metadata"]["name"]: o for o in by_kind(objects, "ClusterRole")}
    for name, role in roles.items():
        subjects = _subjects_of(objects, name)
        if not subjects:
            continue  # bound only by RoleBindings, in the namespaces an admin chose
        assert not _grants(role, "secrets", {"get", "list", "watch"}), f"{path}: {name} reads Secrets cluster-wide"
        assert not _grants(role, "nodes/status", {"patch", "update"}), f"{path}: {name} writes node status"
        if _grants(role, "nodes", {"patch", "update"}):
            policies = _node_policies(objects)
            for subject in subjects:
                user = f"system:serviceaccount:{subject.get('namespace')}:{subject['name']}"
                assert any(b and user in json.dumps(p["spec"].get("matchConditions", [])) for p, b in policies), \
                    f"{path}: {name} lets {user} patch any Node, and no admission policy bound with Deny narrows it"


@pytest.mark.parametrize("path", DRIVER_KUSTOMIZATIONS)
def test_node_label_policy_is_shipped(path: str) -> None:
    """The policy that keeps the node service account to its own node's ocimodel.csi.dev/ labels is in every
    overlay, names the service account as rendered (namespace included), fails closed, and compares the
    old and new object (labels, annotations, spec with its taints)."""
    objects = render(path)
    account = next(o for o in by_kind(objects, "ServiceAccount") if o["metadata"]["name"] == "ocimodel-node")
    user = f"system:serviceaccount:{account['metadata']['namespace']}:ocimodel-node"
    policies = _node_policies(objects)
    assert policies, f"{path}: no ValidatingAdmissionPolicy on Node updates"
    policy, bindings = next((p, b) for p, b in policies if user in json.dumps(p["spec"].get("matchConditions", [])))
    assert policy["apiVersion"] == "admissionregistration.k8s.io/v1" and bindings
    assert "namespace" not in policy["metadata"] and all("namespace" not in b["metadata"] for b in bindings)
    assert policy["spec"]["failurePolicy"] == "Fail"
    text = json.dumps(policy["spec"])
    assert NODE_NAME_KEY in text and "object.metadata.name" in text
    assert "'ocimodel.csi.dev/'" in text
    for field in ("labels", "annotations", "spec", "taints", "ownerReferences", "finalizers"):
        assert f"oldObject.{'spec' if field in ('spec', 'taints') else 'metadata'}" in text and field in text, field


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_tolerations_name_their_taints(path: str) -> None:
    """No toleration of every taint (control-plane nodes included): each names its key."""
    for obj in workloads(render(path)):
        for toleration in pod_spec(obj).get("tolerations") or []:
            assert toleration.get("key"), f"{path}: {obj['metadata']['name']} tolerates every taint: {toleration}"


def test_production_places_the_node_plugin_on_gpu_nodes_from_one_patch() -> None:
    kustomization = yaml.safe_load((ROOT / "deploy/overlays/production/kustomization.yaml").read_text())
    assert {"path": "node-placement.yaml"} in kustomization["patches"]
    spec = pod_spec(by_kind(render("deploy/overlays/production"), "DaemonSet")[0])
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {t["key"] for t in spec["tolerations"]} == {"nvidia.com/gpu"}


@pytest.mark.parametrize("path", DRIVER_KUSTOMIZATIONS)
def test_mirrors_are_real_addresses_over_https(path: str) -> None:
    """A mirror on loopback is the node pod's own (it is not on the host network): unreachable, and
    answerable by any container in the pod. Mirrors are HTTPS and not loopback."""
    config = yaml.safe_load(by_kind(render(path), "ConfigMap")[0]["data"]["config.yaml"])
    for registry, entry in (config.get("registries") or {}).items():
        for mirror in entry.get("mirrors") or []:
            url = urlsplit(mirror if "://" in mirror else f"https://{mirror}")
            host = url.hostname or ""
            assert url.scheme == "https", f"{path}: mirror {mirror} of {registry} is not HTTPS"
            assert host != "localhost" and not host.endswith(".localhost"), f"{path}: {mirror}"
            with contextlib.suppress(ValueError):  # a name rather than an address
                assert not ipaddress.ip_address(host).is_loopback, f"{path}: mirror {mirror} is loopback"


@pytest.mark.parametrize("path", DRIVER_KUSTOMIZATIONS)
def test_images_are_pinned_as_the_kustomization_says(path: str) -> None:
    """A kustomization that says its images are pinned by digest names them by digest."""
    text = " ".join((ROOT / path / "kustomization.yaml").read_text().lower().split())
    if "pinned by digest" in text:
        for obj in workloads(render(path)):
            for container in pod_spec(obj)["containers"]:
                assert re.search(r"@sha256:[0-9a-f]{64}$", container["image"]), f"{path}: {container['image']}"


def _node(labels: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": "gpu-1", "annotations": {"volumes.kubernetes.io/controller-managed": "true"}}
    if labels is not None:
        metadata["labels"] = labels
    return {"apiVersion": "v1", "kind": "Node", "metadata": metadata,
            "spec": {"podCIDR": "10.0.0.0/24", "taints": [{"key": "nvidia.com/gpu", "effect": "NoSchedule"}], **spec}}


OWN = {"kubernetes.io/hostname": "gpu-1", "ocimodel.csi.dev/inference.qwen": "ready"}
POLICY_CASES = {  # name: (old, new, requesting pod's node, operation, allowed)
    "adds a label of its own": (_node(OWN), _node({**OWN, "ocimodel.csi.dev/inference.b": "ready"}), "gpu-1", "UPDATE",
                                True),
    "removes a label of its own": (_node(OWN), _node({"kubernetes.io/hostname": "gpu-1"}), "gpu-1", "UPDATE", True),
    "first label on a node without labels": (_node(), _node({"ocimodel.csi.dev/a": "ready"}), "gpu-1", "UPDATE", True),
    "removes the last label": (_node({"ocimodel.csi.dev/a": "ready"}), _node(), "gpu-1", "UPDATE", True),
    "another node": (_node(OWN), _node({**OWN, "ocimodel.csi.dev/b": "ready"}), "gpu-2", "UPDATE", False),
    "a token without a node": (_node(OWN), _node({**OWN, "ocimodel.csi.dev/b": "ready"}), None, "UPDATE", False),
    "adds another label": (_node(OWN), _node({**OWN, "node-role.kubernetes.io/control-plane": ""}), "gpu-1", "UPDATE",
                           False),
    "changes another label": (_node(OWN), _node({**OWN, "kubernetes.io/hostname": "x"}), "gpu-1", "UPDATE", False),
    "removes another label": (_node(OWN), _node({"ocimodel.csi.dev/inference.qwen": "ready"}), "gpu-1", "UPDATE",
                              False),
    "a look-alike prefix": (_node(OWN), _node({**OWN, "ocimodel.csi.dev.x/a": "1"}), "gpu-1", "UPDATE", False),
    "removes a taint": (_node(OWN), _node(OWN, taints=[]), "gpu-1", "UPDATE", False),
    "cordons": (_node(OWN), _node(OWN, unschedulable=True), "gpu-1", "UPDATE", False),
    "deletes": (_node(OWN), _node(OWN), "gpu-1", "DELETE", False),
    "changes an annotation": (_node(OWN), {**_node(OWN), "metadata": {**_node(OWN)["metadata"], "annotations": {}}},
                              "gpu-1", "UPDATE", False),
}


@pytest.mark.parametrize("case", POLICY_CASES)
def test_node_label_policy_decides_as_intended(case: str) -> None:
    """The rendered policy's CEL, evaluated (cel-python) on Node updates by the service account."""
    import celpy  # a dev dependency: the policy is always evaluated
    old, new, node, operation, allowed = POLICY_CASES[case]
    policy = next(p for p in by_kind(render("deploy/base"), "ValidatingAdmissionPolicy")
                  if p["metadata"]["name"] == "ocimodel-node-labels")["spec"]
    user: dict[str, Any] = {"username": "system:serviceaccount:ocimodel-system:ocimodel-node"}
    if node:
        user["extra"] = {NODE_NAME_KEY: [node]}
    activation = {"object": new, "oldObject": old, "request": {"operation": operation, "userInfo": user}}
    environment = celpy.Environment()

    def holds(expression: str) -> bool:
        program = environment.program(environment.compile(expression))
        result = program.evaluate({k: celpy.json_to_cel(v) for k, v in activation.items()})
        return not isinstance(result, celpy.CELEvalError) and bool(result)  # an error denies (failurePolicy Fail)

    assert all(holds(c["expression"]) for c in policy["matchConditions"])
    assert all(holds(v["expression"]) for v in policy["validations"]) is allowed


# -- mount pods (issue 18): RBAC, the admission policy, and the Pod the plugin really builds ------------------------
MOUNT_TARGET = "/var/lib/kubelet/pods/3f0b5a52/volumes/kubernetes.io~csi/model/mount"


class _OwnPod:
    """The plugin's own Pod as the DaemonSet renders it (what PodRunner reads through the API)."""

    def __init__(self, pod: dict[str, Any]) -> None:
        self.pod = pod

    def get_pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.pod

    def create_pod(self, namespace: str, body: dict[str, Any]) -> bool:
        raise AssertionError("not here")

    def list_pods(self, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        return []

    def delete_pod(self, namespace: str, name: str) -> None:
        raise AssertionError("not here")


def built_mount_pod(path: str, node: str = "gpu-1") -> dict[str, Any]:
    """The mount pod csi_driver/lazyservers.py makes from the plugin pod of ``path`` on ``node``."""
    from csi_driver.lazyservers import PodRunner
    objects = render(path)
    daemonset = by_kind(objects, "DaemonSet")[0]
    namespace = daemonset["metadata"]["namespace"]
    own = {"metadata": {"name": "ocimodel-node-abcde", "namespace": namespace},
           "spec": {**pod_spec(daemonset), "nodeName": node}}
    root = Settings.from_mapping(yaml.safe_load(by_kind(objects, "ConfigMap")[0]["data"]["config.yaml"])).root
    return PodRunner(_OwnPod(own), namespace, "ocimodel-node-abcde", node, Path(root)).pod_spec(MOUNT_TARGET, "csi-1")


def _mount_pod_policy(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return next(p for p in by_kind(objects, "ValidatingAdmissionPolicy")
                if p["metadata"]["name"] == "ocimodel-mount-pods")


def _admits(policy: dict[str, Any], operation: str, obj: dict[str, Any] | None, old: dict[str, Any] | None,
            node: str | None, user: str = "system:serviceaccount:ocimodel-system:ocimodel-node") -> bool | None:
    """The policy's decision (cel-python), None when it does not apply to ``user``."""
    import celpy
    info: dict[str, Any] = {"username": user}
    if node:
        info["extra"] = {NODE_NAME_KEY: [node]}
    activation = {"object": obj, "oldObject": old, "request": {"operation": operation, "userInfo": info}}
    environment = celpy.Environment()

    def holds(expression: str) -> bool:
        program = environment.program(environment.compile(expression))
        result = program.evaluate({k: celpy.json_to_cel(v) for k, v in activation.items()})
        return not isinstance(result, celpy.CELEvalError) and bool(result)

    if not all(holds(c["expression"]) for c in policy["spec"]["matchConditions"]):
        return None
    return all(holds(v["expression"]) for v in policy["spec"]["validations"])


@pytest.mark.parametrize("path", DRIVER_KUSTOMIZATIONS)
def test_mount_pods_are_allowed_as_built_and_rbac_is_namespaced(path: str) -> None:
    """The pod the plugin builds from its own rendered pod passes the rendered policy (so the two agree on
    namespace, host paths and command); the node service account may manage pods only in its namespace, by a
    Role; the mount pods' service account has no token and no role; every privilege of the pod says why."""
    objects = render(path)
    pod = built_mount_pod(path)
    namespace = by_kind(objects, "DaemonSet")[0]["metadata"]["namespace"]
    assert pod["metadata"]["namespace"] == namespace
    assert pod["spec"]["containers"][0]["image"] == next(
        c["image"] for c in pod_spec(by_kind(objects, "DaemonSet")[0])["containers"] if c["name"] == "ocimodel-csi")
    user = f"system:serviceaccount:{namespace}:ocimodel-node"
    assert _admits(_mount_pod_policy(objects), "CREATE", pod, None, "gpu-1", user) is True
    binding = next(b for b in by_kind(objects, "ValidatingAdmissionPolicyBinding")
                   if b["spec"]["policyName"] == "ocimodel-mount-pods")
    assert binding["spec"]["validationActions"] == ["Deny"]
    assert _mount_pod_policy(objects)["spec"]["failurePolicy"] == "Fail"
    role = next(r for r in by_kind(objects, "Role") if r["metadata"]["name"] == "ocimodel-node-mount-pods")
    assert role["metadata"]["namespace"] == namespace
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["create", "get", "list", "delete"]}]
    role_binding = next(b for b in by_kind(objects, "RoleBinding")
                        if b["roleRef"]["name"] == "ocimodel-node-mount-pods")
    assert role_binding["subjects"] == [{"kind": "ServiceAccount", "name": "ocimodel-node", "namespace": namespace}]
    assert not any(_grants(r, "pods", {"create"}) for r in by_kind(objects, "ClusterRole") if _subjects_of(
        objects, r["metadata"]["name"]))
    account = next(a for a in by_kind(objects, "ServiceAccount") if a["metadata"]["name"] == "ocimodel-mount")
    assert account["automountServiceAccountToken"] is False
    assert not any(s.get("name") == "ocimodel-mount" for b in [*by_kind(objects, "RoleBinding"),
                                                              *by_kind(objects, "ClusterRoleBinding")]
                   for s in b["subjects"])
    annotations = pod["metadata"]["annotations"]
    assert len(annotations[REASONS["privileged"] + "fuse"].split()) >= 5
    assert len(annotations[REASONS["root"] + "fuse"].split()) >= 5


def _variant(change: Any) -> dict[str, Any]:
    pod = json.loads(json.dumps(built_mount_pod("deploy/base")))
    change(pod)
    return pod


def _container(pod: dict[str, Any]) -> dict[str, Any]:
    return pod["spec"]["containers"][0]  # type: ignore[no-any-return]


MOUNT_POD_CASES: dict[str, tuple[str, Any, str | None, bool]] = {  # name: (operation, change, node, allowed)
    "as built": ("CREATE", lambda p: None, "gpu-1", True),
    "on another node": ("CREATE", lambda p: None, "gpu-2", False),
    "a token without a node": ("CREATE", lambda p: None, None, False),
    "no node name": ("CREATE", lambda p: p["spec"].pop("nodeName"), "gpu-1", False),
    "without the label": ("CREATE", lambda p: p["metadata"]["labels"].pop("ocimodel.csi.dev/mount-pod"), "gpu-1",
                          False),
    "another service account": ("CREATE", lambda p: p["spec"].update(serviceAccountName="ocimodel-node"), "gpu-1",
                                False),
    "with a token": ("CREATE", lambda p: p["spec"].update(automountServiceAccountToken=True), "gpu-1", False),
    "another command": ("CREATE", lambda p: _container(p).update(command=["sh", "-c", "id"]), "gpu-1", False),
    "other arguments": ("CREATE", lambda p: _container(p).update(args=["csi"]), "gpu-1", False),
    "a socket elsewhere": ("CREATE", lambda p: _container(p)["args"].__setitem__(
        2, "/var/lib/ocimodel/csi/lazy/../../../../etc/x.sock"), "gpu-1", False),
    "a second container": ("CREATE", lambda p: p["spec"]["containers"].append(dict(_container(p), name="x")),
                           "gpu-1", False),
    "an init container": ("CREATE", lambda p: p["spec"].update(initContainers=[_container(p)]), "gpu-1", False),
    "the host's root": ("CREATE", lambda p: p["spec"]["volumes"].append({"name": "r", "hostPath": {"path": "/"}}),
                        "gpu-1", False),
    "a secret volume": ("CREATE", lambda p: p["spec"]["volumes"].append({"name": "s", "secret": {"secretName": "x"}}),
                        "gpu-1", False),
    "the host's PIDs": ("CREATE", lambda p: p["spec"].update(hostPID=True), "gpu-1", False),
    "deletes its mount pod": ("DELETE", lambda p: None, "gpu-1", True),
    "deletes another node's": ("DELETE", lambda p: None, "gpu-2", False),
    "deletes another pod": ("DELETE", lambda p: p["metadata"]["labels"].clear(), "gpu-1", False),
    "updates": ("UPDATE", lambda p: None, "gpu-1", False),
}


@pytest.mark.parametrize("case", MOUNT_POD_CASES)
def test_mount_pod_policy_decides_as_intended(case: str) -> None:
    """The node service account creates and deletes only mount pods as the plugin builds them, on its node."""
    operation, change, node, allowed = MOUNT_POD_CASES[case]
    pod = _variant(change)
    policy = _mount_pod_policy(render("deploy/base"))
    obj, old = (None, pod) if operation == "DELETE" else (pod, pod if operation == "UPDATE" else None)
    assert _admits(policy, operation, obj, old, node) is allowed
    assert _admits(policy, operation, obj, old, node, "system:serviceaccount:kube-system:other") is None
