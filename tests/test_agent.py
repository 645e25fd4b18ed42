"""The real ``ocimodel agent`` process against an HTTP-level fake Kubernetes API server and a real
registry: exact requests (list, watch, server-side apply of status, node label patches, events),
bad objects failing alone, deletion, and a real metrics scrape."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests

from modelcache.upkeep.pins import Pins
from tests.conftest import PASSWORD, USER
from tests.helpers.fakekube import BASE, Cluster, modelcache, write_kubeconfig
from tests.helpers.oci import Fixtures


@pytest.fixture
def cluster_agent(tmp_path: Path, fixtures: Fixtures, auth_fixtures: Fixtures) -> Iterator[tuple[Cluster, Path, Any]]:
    fixtures.raw_model("agent/model:v1", {"model.safetensors": os.urandom(300_000), "config.json": b"{}"})
    auth_fixtures.raw_model("agent/private:v1", {"w": b"private"})
    dockerconfig = json.dumps({"auths": {auth_fixtures.host: {
        "auth": base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}}})
    objects = [
        modelcache("qwen", fixtures.ref("agent/model:v1"), nodeSelector={"nodegroup": "gpu-a100"},
                   pageCache={"warm": True, "lock": False}, pin=True),
        modelcache("elsewhere", fixtures.ref("agent/model:v1"), nodeSelector={"nodegroup": "cpu"}),
        modelcache("broken", "Not A Reference"),
        modelcache("unreachable", "127.0.0.1:9/none/here:v1"),
        modelcache("private", auth_fixtures.ref("agent/private:v1"), pullSecrets=[{"name": "regcred"}]),
        modelcache("not-granted", auth_fixtures.ref("agent/private:v1"), pullSecrets=[{"name": "elsewhere"}]),
    ]
    cluster = Cluster(objects, {"regcred": {".dockerconfigjson": dockerconfig}})
    cluster.api.route("GET", "/api/v1/namespaces/inference/secrets/elsewhere", (403, {
        "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden", "code": 403}))
    cluster.conflicts["private"] = 1
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": cluster.api.url}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "agent"}}],
        "users": [{"name": "agent", "user": {"token": "agent-token"}}]}))
    root = tmp_path / "root"
    log = tmp_path / "agent.log"
    process = subprocess.Popen([sys.executable, "-m", "ocimodel.cli", "-v", "agent", "--node-name", "node-a",
                                "--kubeconfig", str(kubeconfig), "--root", str(root), "--plain-http",
                                "--metrics-address", "127.0.0.1:0"], stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        yield cluster, root, (process, log)
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
        cluster.api.close()


def test_agent_prefetches_reports_and_forgets(cluster_agent) -> None:
    cluster, root, (process, log) = cluster_agent
    ready = cluster.wait_for(lambda: [s for s in cluster.status_patches("qwen") if s.get("phase") == "Ready"])
    entry = ready[0]
    assert entry["node"] == "node-a" and entry["digest"].startswith("sha256:") and entry["bytes"] == 300_002
    assert entry["residentBytes"] == 300_002  # pageCache.warm
    apply = cluster.requests("PATCH", "/modelcaches/qwen/status")[0]
    assert apply.content_type == "application/apply-patch+yaml"
    assert apply.query == {"fieldManager": ["ocimodel-agent-node-a"], "force": ["true"]}
    assert apply.body["apiVersion"] == "ocimodel.csi.dev/v1alpha1" and apply.body["kind"] == "ModelCache"
    assert apply.headers["authorization"] == "Bearer agent-token"
    short = entry["digest"].removeprefix("sha256:")[:12]
    assert entry["revisions"] == [entry["digest"]] and "stagedDigest" not in entry
    wanted = {"metadata": {"labels": {"ocimodel.csi.dev/inference.qwen": "ready",
                                      "ocimodel.csi.dev/inference.qwen_revision": short}}}
    labels = cluster.wait_for(lambda: [r for r in cluster.requests("PATCH", "/api/v1/nodes/node-a")
                                       if r.body == wanted])
    assert labels[0].content_type == "application/merge-patch+json"
    events = cluster.wait_for(lambda: [r.body for r in cluster.requests("POST", "/events")
                                       if r.body["involvedObject"]["name"] == "qwen" and r.body["reason"] == "Pulled"])
    assert events[0]["involvedObject"]["uid"] == "uid-qwen" and events[0]["type"] == "Normal"
    assert events[0]["source"] == {"component": "ocimodel-agent", "host": "node-a"}
    pinned = Pins(root).pinned()
    assert pinned and (root / "trees" / next(iter(pinned))).is_dir()

    # bad objects fail on their own, with a message; the others keep being served
    broken = cluster.wait_for(lambda: [s for s in cluster.status_patches("broken") if s.get("phase") == "Failed"])
    assert "invalid spec" in broken[0]["message"]
    unreachable = cluster.wait_for(lambda: [s for s in cluster.status_patches("unreachable")
                                            if s.get("phase") == "Failed"])
    assert "unreachable" in unreachable[0]["message"]
    warning = cluster.wait_for(lambda: [r.body for r in cluster.requests("POST", "/events")
                                        if r.body["involvedObject"]["name"] == "unreachable"
                                        and r.body["type"] == "Warning"])
    assert warning[0]["reason"] == "PullFailed"
    private = cluster.wait_for(lambda: [s for s in cluster.status_patches("private") if s.get("phase") == "Ready"])
    assert private[0]["bytes"] == len(b"private")
    assert cluster.requests("GET", "/secrets/regcred")
    assert cluster.status_patches("elsewhere") == []  # not selected: never touched
    denied = cluster.wait_for(lambda: [s for s in cluster.status_patches("not-granted") if s.get("phase") == "Failed"])
    assert "RoleBinding" in denied[0]["message"] and "ocimodel-node-pull-secrets" in denied[0]["message"]

    # status.summary (the Revision, Current, Ready and Nodes columns): written with a resourceVersion precondition
    cluster.wait_for(lambda: cluster.stored["qwen"]["status"].get("summary") == {
        "nodes": 1, "ready": 1, "failed": 0, "revision": short, "current": 1})
    patch = cluster.summary_patches("qwen")[-1]
    assert patch.query == {"fieldManager": ["ocimodel-agent-summary"]}
    assert set(patch.body) == {"metadata", "status"} and set(patch.body["status"]) == {"summary"}
    assert patch.body["metadata"]["resourceVersion"].isdigit()
    # another node's agent wrote in between: a 409, a fresh read, and a count that includes both
    cluster.wait_for(lambda: {"nodes": 2, "ready": 2, "failed": 0, "current": 1}.items()
                     <= cluster.stored["private"]["status"].get("summary", {}).items())
    assert len(cluster.summary_patches("private")) >= 2
    cluster.wait_for(lambda: cluster.stored["broken"]["status"].get("summary") == {
        "nodes": 1, "ready": 0, "failed": 1, "revision": "", "current": 0})

    # metrics, scraped over HTTP
    port = int(cluster.wait_for(lambda: re.findall(r"metrics on port (\d+)", log.read_text()))[0])
    metrics = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    assert re.search(r"^ocimodel_pulls_succeeded_total [1-9]", metrics, re.M)
    assert re.search(r'^ocimodel_pulls_failed_total\{reason="UNAVAILABLE"\} [1-9]', metrics, re.M)
    assert "ocimodel_pull_duration_seconds_bucket" in metrics

    # deletion: unpin, forget the revisions and remove the node labels
    cluster.events.put({"type": "DELETED", "object": modelcache("qwen", "x/y:z") | {
        "metadata": {"name": "qwen", "namespace": "inference", "resourceVersion": "11"}}})
    gone = {"metadata": {"labels": {"ocimodel.csi.dev/inference.qwen": None,
                                    "ocimodel.csi.dev/inference.qwen_revision": None}}}
    cluster.wait_for(lambda: [r for r in cluster.requests("PATCH", "/api/v1/nodes/node-a") if r.body == gone])
    cluster.wait_for(lambda: not Pins(root).pinned())
    assert not (root / "agent" / "revisions" / "inference.qwen.json").exists()
    watches = [r for r in cluster.requests("GET", f"{BASE}/modelcaches") if r.query.get("watch") == ["true"]]
    assert watches and watches[0].query["resourceVersion"] == ["10"]
    assert process.poll() is None


def test_pins_and_locks_follow_the_objects_across_restarts_and_changes(tmp_path: Path, fixtures: Fixtures) -> None:
    fixtures.raw_model("agent/small:v1", {"w": os.urandom(8_000)})
    fixtures.raw_model("agent/large:v1", {"w": os.urandom(400_000)})
    root = tmp_path / "root"
    Pins(root).pin("inference/deleted-while-down", "sha256-0123")  # left by an earlier run of the agent
    objects = [modelcache("keep", fixtures.ref("agent/small:v1"), pin=True, pageCache={"lock": True}),
               modelcache("large", fixtures.ref("agent/large:v1"), pageCache={"lock": True})]
    cluster = Cluster(objects, {})
    config = tmp_path / "config.yaml"
    available = psutil.virtual_memory().available
    config.write_text(f"warmMemoryShare: {100_000 / available:.12f}\n")  # room to lock ~100 kB, not 400 kB
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", cluster.api.url)
    log = tmp_path / "agent.log"
    process = subprocess.Popen([sys.executable, "-m", "ocimodel.cli", "agent", "--node-name", "node-a", "--kubeconfig",
                                str(kubeconfig), "--root", str(root), "--config", str(config), "--plain-http",
                                "--metrics-address", "127.0.0.1:0"], stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        cluster.wait_for(lambda: [s for s in cluster.status_patches("keep") if s.get("phase") == "Ready"])
        large = cluster.wait_for(lambda: [s for s in cluster.status_patches("large") if s.get("phase") == "Ready"])
        assert "could not lock in memory" in large[0]["message"] and "memory share" in large[0]["message"]
        pins = json.loads((root / "agent" / "pins.json").read_text())
        assert set(pins) == {"inference/keep"}  # the pin of the object deleted while the agent was down is gone
        port = int(cluster.wait_for(lambda: re.findall(r"metrics on port (\d+)", log.read_text()))[0])

        def locked() -> float:
            text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            return float(re.search(r"^ocimodel_page_cache_locked_bytes (\S+)$", text, re.M).group(1))  # type: ignore[union-attr]

        assert locked() >= 8_000
        changed = modelcache("keep", fixtures.ref("agent/small:v1"), pin=False, pageCache={"lock": False})
        changed["metadata"]["resourceVersion"] = "11"
        cluster.events.put({"type": "MODIFIED", "object": changed})
        cluster.wait_for(lambda: "inference/keep" not in json.loads((root / "agent" / "pins.json").read_text()))
        cluster.wait_for(lambda: locked() == 0.0)
    finally:
        process.terminate()
        process.wait(20)
        cluster.api.close()
