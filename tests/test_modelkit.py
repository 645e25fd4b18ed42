"""KitOps ModelKits (current kit, kit <= 1.9, kit < 0.5; tar, gzip, zstd and raw layers), pre-rename
ModelPacks, and pulls narrowed to layer kinds: the tree `kit unpack` lays out, assembled and lazy alike,
hostile input refused alike, skipped layers never fetched. Fixtures are packed here from the format's facts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from modelcache.assemble.options import PullOptions, parse_layer_kinds
from modelcache.cache import ModelCache
from modelcache.digest import Digest
from modelcache.errors import Kind, ModelCacheError
from modelcache.records import tree_key
from modelcache.registry import mediatypes as mt
from modelcache.store.content import ContentStore
from tests.conftest import make_client, needs_root
from tests.helpers.oci import KIT_STYLES, Entry, Fixtures, KitPart, compress, make_tar
from tests.helpers.proxy import RegistryProxy
from tests.test_hostile import HOSTILE_TARS
from tests.test_one_view import bind_view, outcome
from tests.test_pull_layouts import read_tree

TAR, GZIP, ZSTD, RAW = mt.Compression.TAR, mt.Compression.TAR_GZIP, mt.Compression.TAR_ZSTD, mt.Compression.RAW
WEIGHTS = os.urandom(50_000)


def sample(compression: mt.Compression, weights: mt.Compression | None = None) -> list[KitPart]:
    """A ModelKit with every kind: a model file, a part, a code directory, a dataset, docs."""
    weights = weights or compression
    return [
        KitPart("model", "models/model.safetensors", {"models/model.safetensors": WEIGHTS}, weights,
                {"name": "tiny", "framework": "safetensors"}),
        KitPart("modelpart", "models/tokenizer.json", {"models/tokenizer.json": b'{"v": 1}'}, weights,
                {"name": "tokenizer", "type": "tokenizer"}),
        KitPart("code", "src", {"src/serve.py": b"print(1)\n", "src/lib/util.py": b"X = 1\n"}, compression),
        KitPart("dataset", "data/eval.csv", {"data/eval.csv": b"a,b\n1,2\n"}, compression, {"name": "eval"}),
        KitPart("docs", "README.md", {"README.md": b"# tiny\n"}, compression),
    ]


def files_of(parts: list[KitPart]) -> dict[str, bytes]:
    return {path: data for part in parts for path, data in part.files.items()}


CASES = [(style, c, None) for style in KIT_STYLES for c in (TAR, GZIP, ZSTD)] + [("current", TAR, RAW)]


def case_id(case: tuple[str, mt.Compression, mt.Compression | None]) -> str:
    style, compression, weights = case
    return f"{style}-{compression.value}" + ("-raw-weights" if weights else "")


def check_kitfile(text: bytes, expected: dict[str, Any]) -> None:
    """The Kitfile `kit unpack` writes: YAML, the config's fields in their order, no layer digests."""
    assert b"digest" not in text and b"diffId" not in text
    loaded = yaml.safe_load(text)
    assert loaded == expected
    assert list(loaded) == list(expected) and list(loaded["model"]) == list(expected["model"])


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_modelkit_pulls_to_the_kit_unpack_tree(fixtures: Fixtures, cache: ModelCache,
                                                case: tuple[str, mt.Compression, mt.Compression | None]) -> None:
    style, compression, weights = case
    name = f"kit/{case_id(case).replace('+', '-')}:v1"
    parts = sample(compression, weights)
    digest, kitfile = fixtures.modelkit(name, parts, style)
    result = cache.pull(fixtures.ref(name))
    assert result.record.layout == "modelkit" and result.record.digest == digest
    tree = read_tree(result.path)
    check_kitfile(tree.pop("Kitfile"), kitfile)
    assert tree == files_of(parts)
    assert {p.stat().st_mode & 0o777 for p in result.path.rglob("*") if p.is_file()} == {0o444}
    if weights is RAW:  # a raw layer is the blob itself
        blob = cache.store.blob_path(Digest.of_bytes(WEIGHTS))
        assert (result.path / "models/model.safetensors").stat().st_ino == blob.stat().st_ino


@pytest.mark.parametrize("case", [c for c in CASES if c[1] is TAR], ids=case_id)
def test_lazy_view_is_the_same_tree_kitfile_included(fixtures: Fixtures, tmp_path: Path,
                                                     case: tuple[str, mt.Compression, mt.Compression | None]) -> None:
    style, compression, weights = case
    name = f"kit-view/{case_id(case).replace('+', '-')}:v1"
    fixtures.modelkit(name, sample(compression, weights), style)
    bind, lazy = outcome(fixtures, tmp_path, name)
    assert isinstance(bind, dict) and "Kitfile" in bind and "models/model.safetensors" in bind
    assert lazy == bind


def test_kitfile_digest_that_disagrees_with_the_manifest_is_an_integrity_error(fixtures: Fixtures,
                                                                                tmp_path: Path) -> None:
    def swap(config: dict[str, Any]) -> None:
        config["code"][0]["digest"], config["docs"][0]["digest"] = config["docs"][0]["digest"], \
            config["code"][0]["digest"]
    fixtures.modelkit("kit/swapped:v1", sample(TAR), tamper=swap)
    assert outcome(fixtures, tmp_path, "kit/swapped:v1") == (Kind.INTEGRITY, Kind.INTEGRITY)


def test_extra_layer_and_model_from_another_kit_are_refused(fixtures: Fixtures, tmp_path: Path) -> None:
    def drop_part(config: dict[str, Any]) -> None:
        del config["model"]["parts"]
    fixtures.modelkit("kit/unlisted:v1", sample(TAR), tamper=drop_part)
    assert outcome(fixtures, tmp_path / "a", "kit/unlisted:v1") == (Kind.INTEGRITY, Kind.INTEGRITY)

    def refer(config: dict[str, Any]) -> None:
        config["model"] = {"name": "base", "path": "registry.example.com/kits/base:v1"}
    docs = [p for p in sample(TAR) if p.base == "docs"]
    fixtures.modelkit("kit/parent:v1", docs, tamper=refer)
    assert outcome(fixtures, tmp_path / "b", "kit/parent:v1") == (Kind.UNSUPPORTED, Kind.UNSUPPORTED)


@pytest.mark.parametrize("case", sorted(HOSTILE_TARS))
def test_hostile_kit_layers_are_refused_alike(fixtures: Fixtures, tmp_path: Path, case: str) -> None:
    name = f"kit-hostile/{case}:v1"
    parts = sample(TAR)
    parts[2].extra = HOSTILE_TARS[case][0]
    fixtures.modelkit(name, parts)
    bind, lazy = outcome(fixtures, tmp_path, name)
    assert not isinstance(bind, dict), f"the pull accepted {case}"
    assert lazy == bind


def test_hostile_kitfiles_are_refused(fixtures: Fixtures, tmp_path: Path) -> None:
    raw = [KitPart("model", "m.bin", {"m.bin": b"w"}, RAW)]
    fixtures.modelkit("kit-bad/raw-path:v1", raw,
                      tamper=lambda c: c["model"].update(path="../../etc/cron.d/x"))
    # current kit: the annotation names the file, so the Kitfile's path alone does not; without it, it does
    fixtures.modelkit("kit-bad/raw-path-old:v1", raw, "kit-1.9",
                      tamper=lambda c: c["model"].update(path="/etc/cron.d/x"))
    fixtures.modelkit("kit-bad/old-tar-path:v1", [KitPart("code", "src", {"src/a.py": b"a"})], "kit-0.4",
                      tamper=lambda c: c["code"][0].update(path="../../../outside/src"))
    deep: Any = "leaf"
    for _ in range(200):
        deep = {"x": deep}
    fixtures.modelkit("kit-bad/deep:v1", raw, tamper=lambda c: c["model"].update(parameters=deep))
    found = {name: outcome(fixtures, tmp_path / name, f"kit-bad/{name}:v1")
             for name in ("raw-path-old", "old-tar-path", "deep")}
    assert found == {name: (Kind.UNSAFE_CONTENT, Kind.UNSAFE_CONTENT) for name in found}
    bind, lazy = outcome(fixtures, tmp_path / "ann", "kit-bad/raw-path:v1")
    assert isinstance(bind, dict) and set(bind) == {"m.bin", "Kitfile"} and lazy == bind
    for path in (tmp_path / "outside", Path("/etc/cron.d/x")):
        assert not path.exists()


def test_kit_decompression_bomb_is_refused(fixtures: Fixtures, tmp_path: Path) -> None:
    bomb = KitPart("dataset", "zeros.bin", {"zeros.bin": bytes(100 << 20)}, GZIP)
    fixtures.modelkit("kit-bad/bomb:v1", [bomb])
    cache = ModelCache(ContentStore(tmp_path / "c"), make_client(), expand_ratio=2)
    with pytest.raises(ModelCacheError) as info:
        cache.pull(fixtures.ref("kit-bad/bomb:v1"))
    assert info.value.kind is Kind.UNSAFE_CONTENT and "bomb" in str(info.value)


def test_pre_rename_modelpack_pulls_like_a_current_one(fixtures: Fixtures, tmp_path: Path) -> None:
    name = "cnai/model:v1"
    docs = make_tar([Entry("docs/README.md", b"# old spec\n")])
    layers = [fixtures.layer(name, WEIGHTS, "application/vnd.cnai.model.weight.v1.raw",
                             {mt.ANNOTATION_FILEPATH_LEGACY: "model.safetensors"}),
              fixtures.layer(name, b'{"h": 1}', "application/vnd.cnai.model.weight.config.v1.raw",
                             {mt.ANNOTATION_FILEPATH_LEGACY: "config.json"}),
              fixtures.layer(name, docs, "application/vnd.cnai.model.doc.v1.tar")]
    fixtures.manifest(name, layers, config_type=mt.MODEL_CONFIG_LEGACY, artifact_type=mt.MODEL_ARTIFACT_LEGACY)
    bind, lazy = outcome(fixtures, tmp_path, name)
    assert isinstance(bind, dict) and lazy == bind
    assert {p for p, v in bind.items() if v[0] == "file"} == {"model.safetensors", "config.json", "docs/README.md"}
    result = ModelCache(ContentStore(tmp_path / "bind"), make_client()).pull(fixtures.ref(name))
    assert result.record.layout == "modelpack"
    only = PullOptions(layers=("config",))
    assert read_tree(ModelCache(ContentStore(tmp_path / "c"), make_client()).pull(fixtures.ref(name), only).path) \
        == {"config.json": b'{"h": 1}'}


def fetched(proxy: RegistryProxy) -> set[str]:
    return set(proxy.stats.blob_gets)


def test_layer_kinds_of_a_modelpack_skip_the_rest_unfetched(fixtures: Fixtures, proxy_factory: Any,
                                                             tmp_path: Path) -> None:
    name = "kinds/modelpack:v1"
    code = compress(make_tar([Entry("src/run.py", b"run")]), GZIP)
    blobs = {"weights": WEIGHTS, "config": b'{"h": 2}', "datasets": b"1,2\n", "docs": b"# d\n", "code": code}
    layers = [fixtures.layer(name, WEIGHTS, mt.model_layer_type("weight", RAW), {mt.ANNOTATION_FILEPATH: "w.bin"}),
              fixtures.layer(name, blobs["config"], mt.model_layer_type("weight.config", RAW),
                             {mt.ANNOTATION_FILEPATH: "config.json"}),
              fixtures.layer(name, blobs["datasets"], mt.model_layer_type("dataset", RAW),
                             {mt.ANNOTATION_FILEPATH: "data/d.csv"}),
              fixtures.layer(name, blobs["docs"], mt.model_layer_type("doc", RAW), {mt.ANNOTATION_FILEPATH: "R.md"}),
              fixtures.layer(name, code, mt.model_layer_type("code", GZIP))]
    fixtures.manifest(name, layers)
    proxy = proxy_factory()
    cache = ModelCache(ContentStore(tmp_path / "c"), make_client())
    ref = f"{proxy.host}/{name}"
    result = cache.pull(ref, PullOptions(layers=parse_layer_kinds("config, weights")))
    assert read_tree(result.path) == {"w.bin": WEIGHTS, "config.json": blobs["config"]}
    skipped = {str(Digest.of_bytes(blobs[k])) for k in ("datasets", "docs", "code")}
    assert not fetched(proxy) & skipped
    narrowed = cache.pull(ref, PullOptions(include=("*.md", "*.py"), layers=("code", "docs", "weights")))
    assert read_tree(narrowed.path) == {"R.md": blobs["docs"], "src/run.py": b"run"}
    assert str(Digest.of_bytes(blobs["datasets"])) not in fetched(proxy)
    assert narrowed.record.key != result.record.key != cache.pull(ref).record.key
    bind, lazy = outcome(fixtures, tmp_path / "view", name, PullOptions(layers=("weights", "docs")))
    assert isinstance(bind, dict) and set(bind) == {"w.bin", "R.md"} and lazy == bind


def test_layer_kinds_of_a_modelkit(fixtures: Fixtures, proxy_factory: Any, tmp_path: Path) -> None:
    name = "kinds/modelkit:v1"
    parts = sample(TAR)
    _, kitfile = fixtures.modelkit(name, parts)
    proxy = proxy_factory()
    cache = ModelCache(ContentStore(tmp_path / "c"), make_client())
    ref = f"{proxy.host}/{name}"
    weights = read_tree(cache.pull(ref, PullOptions(layers=("weights",))).path)
    assert weights == files_of(parts[:2])  # kit unpack --model: no Kitfile either
    before = fetched(proxy)
    only_kitfile = read_tree(cache.pull(ref, PullOptions(layers=("config",))).path)
    assert list(only_kitfile) == ["Kitfile"] and fetched(proxy) == before  # the config was kept: nothing fetched
    check_kitfile(only_kitfile["Kitfile"], kitfile)
    rest = read_tree(cache.pull(ref, PullOptions(layers=("code", "datasets", "docs"))).path)
    assert rest == files_of(parts[2:])
    bind, lazy = outcome(fixtures, tmp_path / "view", name, PullOptions(include=("*.py", "Kitfile"),
                                                                        layers=("code", "config")))
    assert isinstance(bind, dict) and lazy == bind
    assert {p for p, v in bind.items() if v[0] == "file"} == {"Kitfile", "src/serve.py", "src/lib/util.py"}


def test_layer_kinds_are_checked(fixtures: Fixtures, cache: ModelCache) -> None:
    with pytest.raises(ModelCacheError) as info:
        parse_layer_kinds("weights,weight")
    assert info.value.kind is Kind.INVALID_ARGUMENT and "weight'" in str(info.value)
    assert parse_layer_kinds(" docs,weights,docs ") == ("docs", "weights") and parse_layer_kinds("") == ()
    fixtures.image("kinds/image:v1", [make_tar([Entry("models/a", b"a")])])
    with pytest.raises(ModelCacheError) as info:
        cache.pull(fixtures.ref("kinds/image:v1"), PullOptions(layers=("weights",)))
    assert info.value.kind is Kind.INVALID_ARGUMENT
    fixtures.raw_model("kinds/weights-only:v1", {"w.bin": b"w"})
    with pytest.raises(ModelCacheError) as info:
        cache.pull(fixtures.ref("kinds/weights-only:v1"), PullOptions(layers=("datasets",)))
    assert info.value.kind is Kind.NOT_FOUND
    digest = Digest.of_bytes(b"x")
    assert tree_key(digest, PullOptions(layers=("weights",))) != tree_key(digest, PullOptions())
    assert tree_key(digest, PullOptions()) == f"sha256-{digest.hex}"


def test_assembled_tree_has_only_regular_files_and_directories(fixtures: Fixtures, cache: ModelCache) -> None:
    fixtures.modelkit("kit/kinds-of-entry:v1", sample(ZSTD), "kit-0.4")
    view = bind_view(cache.pull(fixtures.ref("kit/kinds-of-entry:v1")).path)
    assert {kind for kind, _, _ in view.values()} == {"file", "dir"}
    assert view["models"][0] == "dir" and view["src/lib"][0] == "dir"


def ocimodel(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ocimodel.cli", *args], capture_output=True, text=True, timeout=120)


def test_cli_pull_with_layers(fixtures: Fixtures, tmp_path: Path) -> None:
    fixtures.modelkit("kit-cli/pull:v1", sample(ZSTD, RAW))
    out = ocimodel("pull", fixtures.ref("kit-cli/pull:v1"), "--layers", "config,weights", "--list-files", "--json",
                   "--root", str(tmp_path), "--plain-http")
    assert out.returncode == 0, out.stderr
    assert sorted(json.loads(out.stdout)["file_list"]) == ["Kitfile", "models/model.safetensors",
                                                           "models/tokenizer.json"]
    bad = ocimodel("pull", fixtures.ref("kit-cli/pull:v1"), "--layers", "weights,models", "--root", str(tmp_path),
                   "--plain-http")
    assert bad.returncode == 2 and "models" in bad.stderr


def test_layers_volume_attribute() -> None:
    from csi_driver.attributes import parse_volume_context
    from csi_driver.errors import CsiError
    plain = parse_volume_context({"reference": "r.example.com/m:v1"})
    narrowed = parse_volume_context({"reference": "r.example.com/m:v1", "layers": " weights , config "})
    assert narrowed.options.layers == ("config", "weights") and plain.options.layers == ()
    assert narrowed.fingerprint() != plain.fingerprint()
    with pytest.raises(CsiError) as info:
        parse_volume_context({"reference": "r.example.com/m:v1", "layers": "weights,tokenizer"})
    assert "layers" in info.value.message and "tokenizer" in info.value.message


@needs_root
@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="/dev/fuse is missing")
@pytest.mark.parametrize("lazy", [False, True], ids=["bind", "lazy"])
def test_cli_mount_with_layers(fixtures: Fixtures, tmp_path: Path, lazy: bool) -> None:
    name = f"kit-cli/mount-{'lazy' if lazy else 'bind'}:v1"
    parts = sample(TAR, RAW)
    _, kitfile = fixtures.modelkit(name, parts, "current")
    target, root = tmp_path / "mnt", tmp_path / "root"
    out = ocimodel("mount", fixtures.ref(name), str(target), "--layers", "config,code,weights", "--root", str(root),
                   "--plain-http", *(["--lazy"] if lazy else []))
    assert out.returncode == 0, out.stderr
    try:
        tree = read_tree(target)
        check_kitfile(tree.pop("Kitfile"), kitfile)
        assert tree == files_of([p for p in parts if p.base in ("model", "modelpart", "code")])
        record = json.loads(next((root / "csi" / "publications").glob("*.json")).read_text())
        assert record["layers"] == ["code", "config", "weights"]
    finally:
        out = ocimodel("umount", str(target), "--root", str(root))
    assert out.returncode == 0, out.stderr


def test_a_modelcache_with_layers_prefetches_only_those_kinds(fixtures: Fixtures, proxy_factory: Any,
                                                              tmp_path: Path) -> None:
    """``spec.layers`` of a ModelCache reaches the agent's pull: the node holds only those kinds, and the
    other layers are never fetched."""
    from tests.helpers.fakekube import Cluster, modelcache, write_kubeconfig
    name = "kinds/agent:v1"
    docs = b"# not for this node\n"
    fixtures.manifest(name, [
        fixtures.layer(name, WEIGHTS, mt.model_layer_type("weight", RAW), {mt.ANNOTATION_FILEPATH: "w.bin"}),
        fixtures.layer(name, docs, mt.model_layer_type("doc", RAW), {mt.ANNOTATION_FILEPATH: "R.md"})])
    proxy = proxy_factory()
    cluster = Cluster([modelcache("weights-only", f"{proxy.host}/{name}", layers="weights")], {})
    root = tmp_path / "root"
    agent = subprocess.Popen([sys.executable, "-m", "ocimodel.cli", "agent", "--node-name", "node-a",
                              "--kubeconfig", str(write_kubeconfig(tmp_path / "kubeconfig", cluster.api.url)),
                              "--root", str(root), "--plain-http", "--metrics-address", "127.0.0.1:0"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ready = cluster.wait_for(lambda: [s for s in cluster.status_patches("weights-only")
                                          if s.get("phase") == "Ready"])
        assert ready[0]["bytes"] == len(WEIGHTS)
        trees = [p for p in (root / "trees").iterdir() if not p.name.startswith(".")]
        assert [read_tree(p) for p in trees] == [{"w.bin": WEIGHTS}]
        assert proxy.stats.blob_gets[str(Digest.of_bytes(docs))] == 0
        assert proxy.stats.blob_gets[str(Digest.of_bytes(WEIGHTS))] == 1
    finally:
        agent.terminate()
        agent.wait(20)
        cluster.api.close()
