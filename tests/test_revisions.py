"""ModelCache revisions (issue 19): the agent runs in this process on a trio MockClock that the tests jump
past the resolve interval (never waiting for it), against the HTTP-level fake API server and a real registry
behind a proxy that counts requests and holds blobs on demand (its gate). Every transition: tag moves, staged,
switched, keepRevisions, rollback, a node relabelled out mid-staging, the agent restarted mid-staging; and the
real CSI plugin publishing a covered tag with the registry stopped."""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import trio
import trio.testing

from kubeadapter.client import KubeClient
from modelcache.registry.hosts import HostsConfig
from modelcache.registry.reference import parse_reference
from modelcache.revisions import Revision, Revisions, RevisionState
from modelcache.settings import Settings
from modelcache.upkeep.pins import Pins
from node_agent.agent import Agent, AgentConfig
from tests.conftest import make_client, needs_root
from tests.helpers.csi import CsiProcess, is_mounted, publish_request
from tests.helpers.fakekube import NODE_LABELS, Cluster, modelcache
from tests.helpers.oci import Fixtures
from tests.helpers.proxy import GatedProxy
from tests.helpers.registry import start_registry

TICK = 400.0  # past any jittered resolve interval of the default 300 s
LABEL, REVISION_LABEL = "ocimodel.csi.dev/inference.follow", "ocimodel.csi.dev/inference.follow_revision"


class AgentRun:
    """An agent in a thread of its own, on a clock the test jumps."""

    def __init__(self, root: Path, cluster: Cluster) -> None:
        # a download held at the proxy's gate must not time out while a test looks at the staging
        settings = Settings(root=root, hosts=HostsConfig(plain_http=True), read_timeout=900)
        config = AgentConfig(node_name="node-a", settings=settings, metrics_address="127.0.0.1:0", node_refresh=0.2,
                             progress_interval=0.1, retry_after=1.0)
        self.agent = Agent(config, KubeClient.for_url(cluster.api.url))
        self.clock = trio.testing.MockClock(rate=1.0)
        self.started = threading.Event()
        self.thread = threading.Thread(target=trio.run, args=(self._main,), kwargs={"clock": self.clock}, daemon=True)
        self.thread.start()
        assert self.started.wait(30)

    async def _main(self) -> None:
        self.token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self.scope = nursery.cancel_scope
            await nursery.start(self.agent.run)
            self.started.set()

    def tick(self, seconds: float = TICK) -> None:
        """Let ``seconds`` pass for the agent at once."""
        trio.from_thread.run_sync(self.clock.jump, seconds, trio_token=self.token)

    def tick_until(self, predicate: Callable[[], Any], timeout: float = 60) -> Any:
        """Tick until ``predicate`` holds (the agent may not be asleep yet when a tick comes)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.tick()
            settle = time.monotonic() + 1.0
            while time.monotonic() < settle:
                found = predicate()
                if found:
                    return found
                time.sleep(0.05)
        raise AssertionError("condition not met after ticks")

    def stop(self) -> None:
        trio.from_thread.run_sync(self.scope.cancel, trio_token=self.token)
        self.thread.join(30)
        assert not self.thread.is_alive()


class Setup:
    def __init__(self, tmp_path: Path, fixtures: Fixtures, proxy: GatedProxy, **spec: Any) -> None:
        self.fixtures, self.proxy = fixtures, proxy
        self.name = f"rev/{uuid.uuid4().hex}:prod"
        self.tag = f"{proxy.host}/{self.name}"
        self.root = tmp_path / "root"
        self.cluster = Cluster([modelcache("follow", self.tag, updatePolicy="Follow", pin=True,
                                           nodeSelector={"nodegroup": "gpu-a100"}, **spec)], {})

    def push(self) -> str:
        """Move the tag to a new model; return its digest."""
        return self.fixtures.raw_model(self.name, {"model.safetensors": os.urandom(300_000), "config.json": b"{}"})

    def entries(self, since: int = 0) -> list[dict[str, Any]]:
        return self.cluster.status_patches("follow")[since:]

    def entry(self, predicate: Callable[[dict[str, Any]], bool], since: int = 0) -> dict[str, Any]:
        found: list[dict[str, Any]] = self.cluster.wait_for(lambda: [e for e in self.entries(since) if predicate(e)])
        return found[0]

    def ready(self, digest: str, since: int = 0) -> dict[str, Any]:
        return self.entry(lambda e: e.get("phase") == "Ready" and e.get("digest") == digest
                          and "stagedDigest" not in e, since)

    def label_patches(self) -> list[dict[str, Any]]:
        return [r.body["metadata"]["labels"] for r in self.cluster.requests("PATCH", "/api/v1/nodes/node-a")]

    def key(self, digest: str) -> str:
        return digest.replace(":", "-")

    def state(self) -> RevisionState:
        state = Revisions(self.root).load("inference/follow")
        assert state is not None
        return state

    def tag_requests(self) -> list[str]:
        with self.proxy.stats.lock:
            return [m for m, path, _ in self.proxy.stats.requests if path.endswith("/manifests/prod")]


@pytest.fixture
def setup(tmp_path: Path, fixtures: Fixtures, registry: Any) -> Iterator[Setup]:
    proxy = GatedProxy(registry.host, hold_from=100_000)  # a new model's weights stop at 100 kB while it is shut
    proxy.gate.set()
    made = Setup(tmp_path, fixtures, proxy)
    yield made
    proxy.gate.set()
    proxy.close()
    made.cluster.api.close()


def switches(setup: Setup, count: int) -> None:
    """Wait for the ``count``-th switch's Event (a spec change may cancel a switch's reporting otherwise)."""
    setup.cluster.wait_for(lambda: len(setup.cluster.event_bodies("follow", "RevisionSwitched")) == count)


def short(digest: str) -> str:
    return digest.removeprefix("sha256:")[:12]


def test_follow_stages_switches_keeps_and_rolls_back(setup: Setup) -> None:
    d1 = setup.push()
    run = AgentRun(setup.root, setup.cluster)
    try:
        first = setup.ready(d1)
        assert first["revisions"] == [d1]
        setup.cluster.wait_for(lambda: setup.cluster.event_bodies("follow", "Pulled"))
        assert {LABEL: "ready", REVISION_LABEL: short(d1)} in setup.label_patches()
        assert str(Revisions(setup.root).serving(parse_reference(setup.tag))) == f"{setup.tag}@{d1}"

        # the tag moves: staged (current one still serves and stays pinned), then switched
        d2 = setup.push()
        setup.proxy.gate.clear()  # the new revision stays staging until the gate opens
        seen = len(setup.entries())
        run.tick_until(lambda: [e for e in setup.entries(seen) if e.get("stagedDigest") == d2])
        staged = setup.entry(lambda e: e.get("stagedDigest") == d2, seen)
        assert staged["digest"] == d1 and staged["phase"] == "Ready" and staged["stagedProgress"].endswith("%")
        setup.cluster.wait_for(lambda: setup.cluster.event_bodies("follow", "StagingRevision"))
        state = setup.state()
        assert state.current is not None and state.current.digest == d1 and state.staged == d2
        assert str(Revisions(setup.root).serving(parse_reference(setup.tag))).endswith(d1)  # new volumes: d1
        assert setup.key(d1) in Pins(setup.root).pinned()
        setup.proxy.gate.set()
        switched = setup.ready(d2, seen)
        assert switched["revisions"] == [d2, d1] and switched["switchedAt"]
        event = setup.cluster.wait_for(lambda: setup.cluster.event_bodies("follow", "RevisionSwitched"))[0]
        assert d1 in event["message"] and d2 in event["message"] and event["type"] == "Normal"
        assert {LABEL: "ready", REVISION_LABEL: short(d2)} in setup.label_patches()
        assert {setup.key(d1), setup.key(d2)} <= Pins(setup.root).pinned()
        assert str(Revisions(setup.root).serving(parse_reference(setup.tag))).endswith(d2)
        setup.cluster.wait_for(lambda: setup.cluster.stored["follow"]["status"]["summary"] == {
            "nodes": 1, "ready": 1, "failed": 0, "revision": short(d2), "current": 1})
        assert set(setup.tag_requests()) == {"HEAD"}  # the tag is only ever resolved with HEAD

        # an unmoved tag: one HEAD, and the revision counts as resolved again
        seen, before, resolved = len(setup.entries()), len(setup.tag_requests()), setup.state().resolved_at
        run.tick_until(lambda: setup.state().resolved_at > resolved)
        assert set(setup.tag_requests()[before:]) == {"HEAD"} and setup.state().current.digest == d2  # type: ignore[union-attr]
        assert all(e.get("digest") == d2 and "stagedDigest" not in e for e in setup.entries(seen))

        # a third revision: keepRevisions 2 lets the oldest go (unpinned, still cached until evicted)
        d3 = setup.push()
        run.tick_until(lambda: [e for e in setup.entries(seen) if e.get("digest") == d3])
        third = setup.ready(d3, seen)
        assert third["revisions"] == [d3, d2]
        switches(setup, 2)
        pinned = Pins(setup.root).pinned()
        assert setup.key(d1) not in pinned and {setup.key(d2), setup.key(d3)} <= pinned
        assert (setup.root / "trees" / setup.key(d1)).is_dir()

        # rollback: spec.revision switches at once, with no request to the registry
        requests_before = len(setup.proxy.stats.requests)
        seen = len(setup.entries())
        setup.cluster.modify("follow", revision=d2)
        back = setup.ready(d2, seen)
        assert back["revisions"] == [d2, d3]
        switches(setup, 3)
        assert len(setup.proxy.stats.requests) == requests_before
        state = setup.state()
        assert state.fixed and str(Revisions(setup.root).serving(parse_reference(setup.tag),
                                                                 now=time.time() + 10_000)).endswith(d2)
        # the reference set back to a digest does the same
        seen = len(setup.entries())
        setup.cluster.modify("follow", revision=None, reference=f"{setup.tag}@{d3}")
        setup.ready(d3, seen)
        assert len(setup.proxy.stats.requests) == requests_before
        switches(setup, 4)
    finally:
        run.stop()


def test_relabelled_out_mid_staging(setup: Setup) -> None:
    d1 = setup.push()
    run = AgentRun(setup.root, setup.cluster)
    try:
        setup.ready(d1)
        d2 = setup.push()
        setup.proxy.gate.clear()
        run.tick_until(lambda: [e for e in setup.entries() if e.get("stagedDigest") == d2])
        # mid-staging means the download is running (held at the gate): staging is reported just before it starts
        setup.cluster.wait_for(lambda: setup.proxy.held)
        setup.cluster.node_labels = {k: v for k, v in NODE_LABELS.items() if k != "nodegroup"}
        setup.entry(lambda e: e == {})  # this node's entry removed
        setup.cluster.wait_for(lambda: {LABEL: None, REVISION_LABEL: None} in setup.label_patches())
        assert not Pins(setup.root).pinned()
        assert not Revisions(setup.root).path("inference/follow").exists()
        assert Revisions(setup.root).serving(parse_reference(setup.tag)) is None
        setup.proxy.gate.set()
        setup.cluster.wait_for(lambda: (setup.root / "trees" / setup.key(d2)).is_dir())  # the pull ran out
        assert setup.entries()[-1] == {} and not setup.cluster.event_bodies("follow", "RevisionSwitched")
        assert not Revisions(setup.root).path("inference/follow").exists()
    finally:
        run.stop()


def test_agent_restarted_mid_staging(setup: Setup) -> None:
    d1 = setup.push()
    run = AgentRun(setup.root, setup.cluster)
    try:
        setup.ready(d1)
        d2 = setup.push()
        setup.proxy.gate.clear()
        run.tick_until(lambda: [e for e in setup.entries() if e.get("stagedDigest") == d2])
    finally:
        run.stop()
    state = setup.state()
    assert state.current is not None and state.current.digest == d1 and state.staged == d2
    seen = len(setup.entries())
    run = AgentRun(setup.root, setup.cluster)
    try:
        restored = setup.entry(lambda e: e.get("phase") == "Ready", seen)
        assert restored["digest"] == d1  # at once, the current revision: never the half-staged one
        setup.entry(lambda e: e.get("stagedDigest") == d2 and e.get("digest") == d1, seen)
        setup.proxy.gate.set()
        switched = setup.ready(d2, seen)
        assert switched["revisions"] == [d2, d1]
        setup.cluster.wait_for(lambda: setup.cluster.event_bodies("follow", "RevisionSwitched"))
        assert not setup.cluster.event_bodies("follow", "PullFailed")
    finally:
        run.stop()


def test_revision_file_staleness_and_tags(tmp_path: Path) -> None:
    revisions = Revisions(tmp_path)
    tag = "registry.example.com:443/m/qwen:prod"
    digest = "sha256:" + "ab" * 32
    current = Revision(f"{tag}@{digest}", digest, "sha256-" + "ab" * 32)
    state = RevisionState("ns/qwen", tag, current, [current], resolved_at=1000.0, max_staleness=300.0)
    revisions.save(state)
    served = revisions.serving(parse_reference("registry.example.com/m/qwen:prod"), now=1200.0)  # another spelling
    assert served is not None and str(served.digest) == digest
    assert revisions.serving(parse_reference("registry.example.com/m/qwen:prod"), now=1301.0) is None  # stale
    assert revisions.serving(parse_reference("registry.example.com/m/qwen:canary"), now=1200.0) is None
    assert revisions.serving(parse_reference(f"registry.example.com/m/qwen@{digest}"), now=1200.0) is None
    state.fixed = True
    revisions.save(state)
    assert revisions.serving(parse_reference(tag), now=99_999.0) is not None
    assert revisions.retain({"ns/other"}) == ["ns/qwen"] and revisions.serving(parse_reference(tag)) is None


@needs_root
def test_covered_tag_publishes_with_the_registry_stopped(tmp_path: Path) -> None:
    registry = start_registry(tmp_path / "registry")
    fixtures = Fixtures(make_client(), registry.host)
    first = {"model.safetensors": os.urandom(100_000), "config.json": b'{"v": 1}'}
    d1 = fixtures.raw_model("stopped/model:prod", first)
    tag = fixtures.ref("stopped/model:prod")
    cluster = Cluster([modelcache("follow", tag, updatePolicy="Follow")], {})
    root = tmp_path / "root"
    run = AgentRun(root, cluster)
    csi = None
    targets = []
    try:
        cluster.wait_for(lambda: [e for e in cluster.status_patches("follow") if e.get("digest") == d1])
        csi = CsiProcess(tmp_path / "csi", "--metrics-address", "127.0.0.1:0", root=root)
        fixtures.raw_model("stopped/model:prod", {"model.safetensors": b"second", "config.json": b'{"v": 2}'})

        def publish(name: str, **attributes: str) -> Path:
            (tmp_path / "pods" / name).mkdir(parents=True)
            target = tmp_path / "pods" / name / "mnt"
            targets.append(target)
            assert csi is not None
            csi.node.NodePublishVolume(publish_request(name, target, tag, **attributes), timeout=60)
            return target

        opted_out = publish("registry", resolve="registry")  # asks the registry: the tag has moved
        assert (opted_out / "config.json").read_bytes() == b'{"v": 2}'
        covered = publish("covered")  # the node's current revision
        assert (covered / "config.json").read_bytes() == b'{"v": 1}'
        registry.stop()
        down = publish("down")
        assert {p.name: p.read_bytes() for p in down.iterdir()} == first
        port = int(re.findall(r"metrics on port (\d+)", csi.log_text())[0])
        metrics = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert re.search(r'^ocimodel_csi_tag_resolutions_total\{source="modelcache"\} 2\.0$', metrics, re.M)
        assert re.search(r'^ocimodel_csi_tag_resolutions_total\{source="registry"\} 1\.0$', metrics, re.M)
        assert "no registry round trip" in csi.log_text()
    finally:
        for target in targets:
            while is_mounted(target):
                subprocess.run(["umount", str(target)], check=False)
        if csi is not None:
            csi.stop()
        run.stop()
        registry.stop()
        cluster.api.close()
