"""``ocimodel inspect``, run as a real process through a counting proxy: what a model holds (media types,
layout, layers with kinds, formats, paths and sizes, signatures, chunk index), with no layer downloaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from modelcache.digest import Digest
from modelcache.registry import mediatypes as mt
from modelcache.registry.reference import parse_reference
from tests.helpers.oci import Fixtures
from tests.helpers.proxy import RegistryProxy
from tests.test_modelkit import sample
from tests.test_signatures import sigstore_bundle_referrer, write_keys

CLI = [sys.executable, "-m", "ocimodel.cli"]


def inspect(ref: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "inspect", ref, "--plain-http", *extra], capture_output=True, text=True, timeout=60)


def inspect_json(ref: str) -> dict[str, Any]:
    out = inspect(ref, "--json")
    assert out.returncode == 0, out.stderr
    data: dict[str, Any] = json.loads(out.stdout)
    return data


def test_a_pushed_signed_modelpack(fixtures: Fixtures, proxy_factory: Any, tmp_path: Path) -> None:
    key, private, _ = write_keys(tmp_path, "release")
    source = tmp_path / "model"
    (source / "tok").mkdir(parents=True)
    (source / "model.safetensors").write_bytes(os.urandom(40_000))
    (source / "tok" / "tokenizer.json").write_text("{}")
    push = subprocess.run([*CLI, "push", str(source), fixtures.ref("inspect/pack:v1"), "--plain-http", "--json",
                           "--sign-key", str(private)], capture_output=True, text=True, timeout=60)
    assert push.returncode == 0, push.stderr
    digest = json.loads(push.stdout)["digest"]
    sigstore_bundle_referrer(fixtures, "inspect/pack", digest, key)
    proxy: RegistryProxy = proxy_factory()
    data = inspect_json(f"{proxy.host}/inspect/pack:v1")
    assert data["digest"] == digest and data["layout"] == "modelpack" and data["problem"] == ""
    assert data["artifact_type"] == mt.MODEL_ARTIFACT and data["config_media_type"] == mt.MODEL_CONFIG
    assert sorted((layer["path"], layer["kind"], layer["format"], layer["size"]) for layer in data["layers"]) == [
        ("model.safetensors", "weights", "raw", 40_000), ("tok/tokenizer.json", "config", "raw", 2)]
    assert data["total_bytes"] == sum(layer["size"] for layer in data["layers"])
    assert data["signatures"] == {"cosign": 1, "sigstore_bundles": 1}
    assert data["chunk_index"] is not None and data["chunk_index"]["digest"].startswith("sha256:")
    assert not proxy.stats.blob_gets  # manifests only: not a layer, not the config, not the chunk index
    text = inspect(f"{proxy.host}/inspect/pack:v1").stdout
    assert "layout: modelpack" in text and "cosign 1, sigstore bundles 1" in text and "model.safetensors" in text


def test_modelkits_show_their_kinds_and_paths_from_the_kitfile(fixtures: Fixtures, proxy_factory: Any) -> None:
    proxy: RegistryProxy = proxy_factory()
    fixtures.modelkit("inspect/kit-old:v1", sample(mt.Compression.TAR_GZIP), "kit-0.4")
    data = inspect_json(f"{proxy.host}/inspect/kit-old:v1")
    assert data["layout"] == "modelkit" and data["artifact_type"] == "" and data["config_media_type"] == mt.KIT_CONFIG
    assert [(layer["kind"], layer["format"], layer["path"]) for layer in data["layers"]] == [
        ("weights", "tar+gzip", "models/"), ("weights", "tar+gzip", "models/"), ("code", "tar+gzip", "/"),
        ("datasets", "tar+gzip", "data/"), ("docs", "tar+gzip", "/")]
    assert data["signatures"] == {"cosign": 0, "sigstore_bundles": 0} and data["chunk_index"] is None
    config = fixtures.client.resolve(parse_reference(fixtures.ref("inspect/kit-old:v1"))).manifest.config.digest
    assert proxy.stats.blob_gets == {str(config): 1}  # the Kitfile (config) only: it says where each layer goes

    fixtures.modelkit("inspect/kit-raw:v1", sample(mt.Compression.TAR, mt.Compression.RAW))
    data = inspect_json(f"{proxy.host}/inspect/kit-raw:v1")
    assert data["artifact_type"] == mt.KIT_ARTIFACT
    assert [(layer["kind"], layer["format"], layer["path"]) for layer in data["layers"]][:3] == [
        ("weights", "raw", "models/model.safetensors"), ("weights", "raw", "models/tokenizer.json"),
        ("code", "tar", "/")]
    assert data["layers"][0]["digest"] == str(Digest.of_bytes(sample(mt.Compression.TAR)[0].files[
        "models/model.safetensors"]))


def test_an_unsupported_artifact_is_still_described(fixtures: Fixtures) -> None:
    name = "inspect/untitled:v1"
    fixtures.manifest(name, [fixtures.layer(name, b"data", "application/vnd.example.thing")],
                      config_type=mt.OCI_EMPTY, artifact_type="application/vnd.example")
    out = inspect(fixtures.ref(name))
    assert out.returncode == 0, out.stderr
    assert "layout: unsupported (layer 0" in out.stdout and "application/vnd.example.thing" in out.stdout
    missing = inspect(fixtures.ref("inspect/missing:v1"))
    assert missing.returncode == 3, missing.stderr
