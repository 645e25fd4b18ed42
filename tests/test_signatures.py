"""Signed models only: cosign key-based signatures made here with the cryptography package (independently
of ocimodel's own signer), checked by ``ocimodel pull``/``mount``, the CSI plugin (bind and lazy) and the
agent, against a real registry."""

from __future__ import annotations

import base64
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from csi_driver.proto import csi_pb2
from modelcache.digest import Digest
from modelcache.registry import mediatypes as mt
from modelcache.registry.reference import parse_reference
from tests.conftest import needs_root
from tests.helpers.csi import CsiProcess, code_of, publish_request
from tests.helpers.fakekube import write_kubeconfig
from tests.helpers.namespaces import PLUGIN_NAMESPACE, PodView, share, unmount_tree
from tests.helpers.oci import Fixtures
from tests.helpers.proxy import ProxyBehaviour

CLI = [sys.executable, "-m", "ocimodel.cli"]
KEY_MAKERS: dict[str, Callable[[], object]] = {
    "ecdsa-p256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "ecdsa-p384": lambda: ec.generate_private_key(ec.SECP384R1()),
    "ed25519": ed25519.Ed25519PrivateKey.generate,
    "rsa": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
}


def write_keys(directory: Path, name: str, kind: str = "ecdsa-p256") -> tuple[object, Path, Path]:
    """A key pair as PEM files: (private key object, private path, public path)."""
    key = KEY_MAKERS[kind]()
    private, public = directory / f"{name}.key", directory / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,  # type: ignore[attr-defined]
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,  # type: ignore[attr-defined]
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return key, private, public


def cosign_signature(fixtures: Fixtures, repository: str, digest: str, key: object, *, signed_digest: str = "",
                     identity: str = "") -> None:
    """What ``cosign sign --key`` leaves in a registry (tag scheme), built by hand."""
    payload = json.dumps({"critical": {
        "identity": {"docker-reference": identity or f"{fixtures.host}/{repository}"},
        "image": {"docker-manifest-digest": signed_digest or digest},
        "type": "cosign container image signature"}, "optional": None}).encode()
    if isinstance(key, ed25519.Ed25519PrivateKey):
        signature = key.sign(payload)
    elif isinstance(key, rsa.RSAPrivateKey):
        signature = key.sign(payload, padding.PKCS1v15(), hashes.SHA256())
    else:
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        signature = key.sign(payload, ec.ECDSA(hashes.SHA256()))
    tag = f"{repository}:{digest.replace(':', '-')}.sig"
    layer = fixtures.layer(tag, payload, "application/vnd.dev.cosign.simplesigning.v1+json",
                           {"dev.cosignproject.cosign/signature": base64.b64encode(signature).decode()})
    fixtures.manifest(tag, [layer], config=b'{"architecture":"","os":""}', config_type=mt.OCI_IMAGE_CONFIG,
                      artifact_type=None)


def prod_policy(fixtures: Fixtures, tmp_path: Path, public: Path) -> Path:
    """Node settings whose policy 'prod' requires models under prod/ to be signed by ``public``."""
    config = tmp_path / "node.yaml"
    config.write_text(json.dumps({"signaturePolicy": [
        {"name": "prod", "match": [f"{fixtures.host}/prod/*"], "keys": [str(public)]}]}))
    return config


def model(fixtures: Fixtures, name: str) -> str:
    return fixtures.raw_model(name, {"weights.bin": os.urandom(20_000) + name.encode()})


def pull(ref: str, root: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "pull", ref, "--root", str(root), "--plain-http", "--json", *extra],
                          capture_output=True, text=True, timeout=60)


def nothing_cached(root: Path) -> bool:
    trees = root / "trees"
    return not trees.exists() or not [p for p in trees.iterdir() if not p.name.startswith(".")]


@pytest.mark.parametrize("kind", sorted(KEY_MAKERS))
def test_each_key_type_verifies(fixtures: Fixtures, tmp_path: Path, kind: str) -> None:
    key, _, public = write_keys(tmp_path, "release", kind)
    digest = model(fixtures, f"sig/{kind}:v1")
    cosign_signature(fixtures, f"sig/{kind}", digest, key)
    out = pull(fixtures.ref(f"sig/{kind}:v1"), tmp_path / "root", "--verify-key", str(public))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["digest"] == digest


def test_refusals_name_the_policy_and_leave_nothing(fixtures: Fixtures, tmp_path: Path) -> None:
    key, _, public = write_keys(tmp_path, "release")
    other, _, _ = write_keys(tmp_path, "other")
    root = tmp_path / "root"
    cases = {}
    cases["unsigned"] = model(fixtures, "sig/unsigned:v1")
    cases["other-key"] = model(fixtures, "sig/other-key:v1")
    cosign_signature(fixtures, "sig/other-key", cases["other-key"], other)
    cases["other-digest"] = model(fixtures, "sig/other-digest:v1")
    cosign_signature(fixtures, "sig/other-digest", cases["other-digest"], key,
                     signed_digest=str(Digest.of_bytes(b"some other manifest")))
    cases["other-repository"] = model(fixtures, "sig/other-repository:v1")
    cosign_signature(fixtures, "sig/other-repository", cases["other-repository"], key,
                     identity=f"{fixtures.host}/sig/elsewhere")
    for case, digest in cases.items():
        out = pull(fixtures.ref(f"sig/{case}:v1"), root, "--verify-key", str(public))
        assert out.returncode == 9, (case, out.stderr)
        assert "signature required by policy '--verify-key': no signature by key release.pub for " \
               f"{digest}" in out.stderr, out.stderr
        assert nothing_cached(root), case


def test_a_policy_applies_only_where_it_matches(fixtures: Fixtures, tmp_path: Path) -> None:
    key, _, public = write_keys(tmp_path, "release")
    model(fixtures, "dev/free:v1")
    model(fixtures, "prod/locked:v1")
    policy = tmp_path / "policy.yaml"
    policy.write_text(json.dumps({"signaturePolicy": [
        {"name": "prod", "match": [f"{fixtures.host}/prod/*"], "keys": [public.name]}]}))
    root = tmp_path / "root"
    assert pull(fixtures.ref("dev/free:v1"), root, "--policy", str(policy)).returncode == 0
    refused = pull(fixtures.ref("prod/locked:v1"), root, "--policy", str(policy))
    assert refused.returncode == 9 and "policy 'prod'" in refused.stderr


def test_tampered_layer_under_a_valid_signature_fails(fixtures: Fixtures, tmp_path: Path, proxy_factory) -> None:  # type: ignore[no-untyped-def]
    key, _, public = write_keys(tmp_path, "release")
    digest = model(fixtures, "sig/tampered:v1")
    cosign_signature(fixtures, "sig/tampered", digest, key)
    proxy = proxy_factory(ProxyBehaviour(corrupt_blobs=True))
    out = pull(f"{proxy.host}/sig/tampered@{digest}", tmp_path / "root", "--verify-key", str(public))
    assert out.returncode in (6, 9), out.stderr  # the payload blob or the layer fails its digest
    assert nothing_cached(tmp_path / "root")


def test_an_unreachable_signature_store_is_never_a_pass(fixtures: Fixtures, tmp_path: Path, proxy_factory) -> None:  # type: ignore[no-untyped-def]
    _, _, public = write_keys(tmp_path, "release")
    digest = model(fixtures, "sig/unreachable:v1")
    proxy = proxy_factory(ProxyBehaviour(fail_status=503, fail_times=1000))
    out = pull(f"{proxy.host}/sig/unreachable@{digest}", tmp_path / "root", "--verify-key", str(public))
    assert out.returncode == 5, out.stderr  # UNAVAILABLE
    assert nothing_cached(tmp_path / "root")


def test_ocimodel_signs_what_it_pushes(registry, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, first_key, first_pub = write_keys(tmp_path, "first", "ed25519")
    _, second_key, second_pub = write_keys(tmp_path, "second", "ecdsa-p384")
    source = tmp_path / "model"
    source.mkdir()
    (source / "w.bin").write_bytes(os.urandom(10_000))
    ref = f"{registry.host}/sig/pushed:v1"
    push = subprocess.run([*CLI, "push", str(source), ref, "--plain-http", "--sign-key", str(first_key)],
                          capture_output=True, text=True, timeout=60)
    assert push.returncode == 0, push.stderr
    sign = subprocess.run([*CLI, "sign", ref, "--key", str(second_key), "--plain-http"], capture_output=True,
                          text=True, timeout=60)
    assert sign.returncode == 0, sign.stderr
    for public in (first_pub, second_pub):  # both signatures are kept
        out = pull(ref, tmp_path / f"root-{public.stem}", "--verify-key", str(public))
        assert out.returncode == 0, out.stderr


@needs_root
def test_csi_publish_and_agent_enforce_the_node_policy(fixtures: Fixtures, tmp_path: Path) -> None:
    from tests.helpers.fakekube import Cluster, modelcache
    key, _, public = write_keys(tmp_path, "release")
    signed = model(fixtures, "prod/signed:v1")
    cosign_signature(fixtures, "prod/signed", signed, key)
    model(fixtures, "prod/unsigned:v1")
    config = prod_policy(fixtures, tmp_path, public)
    csi = CsiProcess(tmp_path / "driver", "--config", str(config))
    try:
        target = tmp_path / "pods" / "a" / "mnt"
        assert code_of(csi.node.NodePublishVolume, publish_request("s", target, fixtures.ref("prod/signed:v1"))) == \
            grpc.StatusCode.OK
        csi.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id="s", target_path=str(target)))
        for mount in ("bind", "lazy"):
            with pytest.raises(grpc.RpcError) as info:
                csi.node.NodePublishVolume(publish_request(f"u-{mount}", tmp_path / "pods" / mount / "mnt",
                                                           fixtures.ref("prod/unsigned:v1"), mount=mount), timeout=60)
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "signature required by policy 'prod'" in (info.value.details() or "")
            assert not (tmp_path / "pods" / mount / "mnt").exists()
        trees = [p.name for p in (csi.root / "trees").iterdir()]
        assert trees == [f"sha256-{signed.split(':')[1]}"]  # the refused model left nothing
    finally:
        csi.stop()
    cluster = Cluster([modelcache("unsigned", fixtures.ref("prod/unsigned:v1"))], {})
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", cluster.api.url)
    agent = subprocess.Popen([*CLI, "agent", "--node-name", "node-a", "--kubeconfig", str(kubeconfig), "--root",
                              str(tmp_path / "agent-root"), "--config", str(config), "--plain-http",
                              "--metrics-address", "127.0.0.1:0"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        failed = cluster.wait_for(lambda: [s for s in cluster.status_patches("unsigned")
                                           if s.get("phase") == "Failed"])
        assert "signature required by policy 'prod'" in failed[0]["message"]
        assert nothing_cached(tmp_path / "agent-root")
    finally:
        agent.terminate()
        agent.wait(20)
        cluster.api.close()


def sigstore_bundle_referrer(fixtures: Fixtures, repository: str, digest: str, key: object, *,
                             subject_digest: str = "") -> None:
    """A Sigstore bundle (v0.3, DSSE + in-toto statement) stored as a referrer of the model, listed only
    under the referrers tag schema (the test registry has no referrers API)."""
    statement = json.dumps({"_type": "https://in-toto.io/Statement/v1",
                            "subject": [{"name": f"{fixtures.host}/{repository}",
                                         "digest": {"sha256": (subject_digest or digest).split(":")[1]}}],
                            "predicateType": "https://sigstore.dev/cosign/sign/v1", "predicate": {}}).encode()
    payload_type = b"application/vnd.in-toto+json"
    pae = b"DSSEv1 %d %s %d %s" % (len(payload_type), payload_type, len(statement), statement)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    bundle = json.dumps({"mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json",
                         "verificationMaterial": {"publicKey": {"hint": "release"}, "tlogEntries": []},
                         "dsseEnvelope": {"payload": base64.b64encode(statement).decode(),
                                          "payloadType": payload_type.decode(),
                                          "signatures": [{"sig": base64.b64encode(
                                              key.sign(pae, ec.ECDSA(hashes.SHA256()))).decode(), "keyid": ""}]}}
                        ).encode()
    attach_bundle(fixtures, repository, digest, bundle)


def attach_bundle(fixtures: Fixtures, repository: str, digest: str, bundle: bytes) -> None:
    """Store ``bundle`` as a referrer of ``digest``, listed under the referrers tag schema."""
    bundle_type = "application/vnd.dev.sigstore.bundle.v0.3+json"
    layer = fixtures.layer(f"{repository}:x", bundle, bundle_type)
    empty = {"mediaType": mt.OCI_EMPTY, **fixtures.blob(f"{repository}:x", b"{}")}
    manifest_raw = fixtures.client.resolve(parse_reference(f"{fixtures.host}/{repository}@{digest}")).manifest.raw
    referrer = json.dumps({"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST, "artifactType": bundle_type,
                           "config": empty, "layers": [layer],
                           "subject": {"mediaType": mt.OCI_MANIFEST, "digest": digest, "size": len(manifest_raw)}}
                          ).encode()
    repo_ref = parse_reference(f"{fixtures.host}/{repository}")
    referrer_digest = fixtures.client.put_manifest(repo_ref.by_digest(Digest.of_bytes(referrer)), referrer,
                                                   mt.OCI_MANIFEST)
    index = json.dumps({"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": [
        {"mediaType": mt.OCI_MANIFEST, "digest": str(referrer_digest), "size": len(referrer),
         "artifactType": bundle_type}]}).encode()
    fixtures.client.put_manifest(repo_ref.with_tag(digest.replace(":", "-")), index, mt.OCI_INDEX)


def test_sigstore_bundle_found_through_the_referrers_tag_schema(fixtures: Fixtures, tmp_path: Path) -> None:
    key, _, public = write_keys(tmp_path, "release")
    good = model(fixtures, "bundle/good:v1")
    sigstore_bundle_referrer(fixtures, "bundle/good", good, key)
    out = pull(fixtures.ref("bundle/good:v1"), tmp_path / "root", "--verify-key", str(public))
    assert out.returncode == 0, out.stderr
    wrong = model(fixtures, "bundle/wrong:v1")
    sigstore_bundle_referrer(fixtures, "bundle/wrong", wrong, key, subject_digest=str(Digest.of_bytes(b"other")))
    refused = pull(fixtures.ref("bundle/wrong:v1"), tmp_path / "root2", "--verify-key", str(public))
    assert refused.returncode == 9 and "no signature by key release.pub" in refused.stderr


def oms_model(fixtures: Fixtures, tmp_path: Path, name: str, private: Path, *, in_model: bool = True,
              tamper: bool = False) -> str:
    """A model signed with the OpenSSF ``model-signing`` library (``model.sig`` at its root, pushed in the
    model or attached as a referrer); ``tamper`` pushes weights other than the ones signed."""
    import model_signing
    directory = tmp_path / "oms" / name.replace("/", "-").replace(":", "-")
    directory.mkdir(parents=True)
    files = {"weights.safetensors": os.urandom(300_000), "config.json": b'{"oms": true}'}
    for relpath, data in files.items():
        (directory / relpath).write_bytes(data)
    model_signing.signing.Config().use_elliptic_key_signer(private_key=private).sign(directory, directory / "model.sig")
    signature = (directory / "model.sig").read_bytes()
    if tamper:
        files["weights.safetensors"] = files["weights.safetensors"][:-1] + b"!"
    digest = fixtures.raw_model(name, {**files, **({"model.sig": signature} if in_model else {})})
    if not in_model:
        attach_bundle(fixtures, name.split(":")[0], digest, signature)
    return digest


@pytest.mark.parametrize("in_model", [True, False], ids=["model.sig-in-the-model", "as-a-referrer"])
def test_openssf_model_signatures_are_checked_on_the_files(fixtures: Fixtures, tmp_path: Path, in_model: bool) -> None:
    _, private, public = write_keys(tmp_path, "release")
    _, _, other = write_keys(tmp_path, "other")
    tag = "in" if in_model else "ref"
    oms_model(fixtures, tmp_path, f"oms/{tag}-good:v1", private, in_model=in_model)
    out = pull(fixtures.ref(f"oms/{tag}-good:v1"), tmp_path / "root", "--verify-key", str(public), "--list-files")
    assert out.returncode == 0, out.stderr
    assert {"weights.safetensors", "config.json"} <= set(json.loads(out.stdout)["file_list"])

    refused = pull(fixtures.ref(f"oms/{tag}-good:v1"), tmp_path / "other-root", "--verify-key", str(other))
    assert refused.returncode == 9, refused.stderr
    assert "policy '--verify-key': the OpenSSF model signature of sha256:" in refused.stderr, refused.stderr
    assert nothing_cached(tmp_path / "other-root")

    oms_model(fixtures, tmp_path, f"oms/{tag}-tampered:v1", private, in_model=in_model, tamper=True)
    tampered = pull(fixtures.ref(f"oms/{tag}-tampered:v1"), tmp_path / "tampered-root", "--verify-key", str(public))
    assert tampered.returncode == 9 and "does not verify" in tampered.stderr, tampered.stderr
    assert nothing_cached(tmp_path / "tampered-root")



@pytest.mark.parametrize("hidden", ["model.sig/payload.py", ".github/workflows/x.py"])
def test_unsigned_files_under_a_path_the_signature_ignores_are_refused(fixtures: Fixtures, tmp_path: Path,
                                                                       hidden: str) -> None:
    """model-signing skips all under ``model.sig`` (and, as signed by default, ``.git``/``.github``): the
    signed files plus unsigned ones there, with the genuine bundle attached as a referrer, are refused."""
    import model_signing
    _, private, public = write_keys(tmp_path, "release")
    directory = tmp_path / "signed"
    directory.mkdir()
    files = {"weights.safetensors": os.urandom(1000), "config.json": b"{}"}
    for relpath, data in files.items():
        (directory / relpath).write_bytes(data)
    model_signing.signing.Config().use_elliptic_key_signer(private_key=private).set_hashing_config(
        model_signing.hashing.Config().set_ignored_paths(paths=["model.sig"])).sign(directory, tmp_path / "bundle")
    name = f"oms/hidden-{hidden.partition('/')[0].strip('.')}:v1"
    digest = fixtures.raw_model(name, {**files, hidden: b"import os  # unsigned"})
    attach_bundle(fixtures, name.split(":")[0], digest, (tmp_path / "bundle").read_bytes())
    refused = pull(fixtures.ref(name), tmp_path / "root", "--verify-key", str(public))
    assert refused.returncode == 9 and "leave what is under that path unchecked" in refused.stderr, refused.stderr
    assert nothing_cached(tmp_path / "root")

@needs_root
@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="/dev/fuse is missing")
def test_a_lazy_volume_signed_over_its_files_is_verified_whole_before_it_is_mounted(fixtures: Fixtures,
                                                                                   tmp_path: Path) -> None:
    """As kubelet publishes an inline lazy volume to the plugin in its own mount namespace; the pod's
    namespace sees a read-only bind of the verified tree, never a FUSE view."""
    from tests.test_as_deployed import inline_request
    _, private, public = write_keys(tmp_path, "release")
    _, other_private, _ = write_keys(tmp_path, "other")
    oms_model(fixtures, tmp_path, "prod/oms:v1", private)
    oms_model(fixtures, tmp_path, "prod/oms-other:v1", other_private)
    config = prod_policy(fixtures, tmp_path, public)
    node = Path(tempfile.mkdtemp(prefix="ocimodel-node-"))
    share(node)
    csi = CsiProcess(node / "plugin", "--config", str(config), mode="node", root=node / "cache",
                     prefix=PLUGIN_NAMESPACE)
    try:
        target = node / "pods" / "a" / "mnt"
        csi.node.NodePublishVolume(inline_request("oms", target, fixtures.ref("prod/oms:v1"), mount="lazy"),
                                   timeout=60)
        pod = PodView(target)
        try:
            assert {"ro", "nosuid", "nodev"} <= pod.options() and pod.create("planted") == "ERR EROFS"
            assert sorted(pod.listing()) == ["config.json", "model.sig", "weights.safetensors"]
        finally:
            pod.close()
        fstypes = [line.split(" - ")[1].split()[0] for line in Path("/proc/self/mountinfo").read_text().splitlines()
                   if line.split()[4] == str(target)]
        assert fstypes and not any(t.startswith("fuse") for t in fstypes)  # a bind of the verified tree
        with pytest.raises(grpc.RpcError) as info:
            csi.node.NodePublishVolume(inline_request("other", node / "pods" / "b" / "mnt",
                                                      fixtures.ref("prod/oms-other:v1"), mount="lazy"), timeout=60)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "the OpenSSF model signature of" in (info.value.details() or "")
        assert not (node / "pods" / "b" / "mnt").exists()
        assert len([p for p in (node / "cache" / "trees").iterdir() if not p.name.startswith(".")]) == 1
    finally:
        csi.stop()
        unmount_tree(node)
        shutil.rmtree(node, ignore_errors=True)


def certificate_chain(directory: Path, name: str) -> tuple[Path, Path, Path]:
    """A CA and a code-signing leaf it issued: (CA certificate, leaf certificate, leaf private key) as PEM."""
    now = datetime.datetime.now(datetime.UTC)

    def builder(subject: str, issuer: str, key: ec.EllipticCurvePrivateKey, serial: int) -> x509.CertificateBuilder:
        return (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                .public_key(key.public_key()).serial_number(serial)
                .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30)))

    def usage(ca: bool) -> x509.KeyUsage:
        return x509.KeyUsage(digital_signature=True, key_cert_sign=ca, crl_sign=ca, content_commitment=False,
                             key_encipherment=False, data_encipherment=False, key_agreement=False,
                             encipher_only=False, decipher_only=False)

    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (builder(f"{name} CA", f"{name} CA", ca_key, 1)
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(usage(True), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    leaf = (builder(f"{name} signer", f"{name} CA", leaf_key, 2)
            .add_extension(usage(False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = directory / f"{name}-ca.crt", directory / f"{name}-leaf.crt", directory / f"{name}-leaf.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(leaf_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
    return paths


def test_openssf_model_signature_by_certificate(fixtures: Fixtures, tmp_path: Path) -> None:
    import model_signing
    ca, leaf, leaf_key = certificate_chain(tmp_path, "ci")
    other_ca, _, _ = certificate_chain(tmp_path, "elsewhere")
    directory = tmp_path / "model"
    directory.mkdir()
    (directory / "weights.safetensors").write_bytes(os.urandom(100_000))
    model_signing.signing.Config().use_certificate_signer(
        private_key=leaf_key, signing_certificate=leaf, certificate_chain=[ca]).sign(directory, directory / "model.sig")
    fixtures.raw_model("ci/cert:v1", {p.name: p.read_bytes() for p in directory.iterdir()})
    policy = tmp_path / "policy.yaml"
    for certificate, expected in ((ca, 0), (other_ca, 9)):
        policy.write_text(json.dumps({"signaturePolicy": [
            {"name": "ci", "match": [f"{fixtures.host}/ci/*"], "certificates": [str(certificate)]}]}))
        out = pull(fixtures.ref("ci/cert:v1"), tmp_path / f"root-{expected}", "--policy", str(policy))
        assert out.returncode == expected, out.stderr
    assert "policy 'ci': the OpenSSF model signature of" in out.stderr
    assert nothing_cached(tmp_path / "root-9")


def test_verdicts_survive_a_restart_and_a_changed_policy_checks_again(fixtures: Fixtures, tmp_path: Path,
                                                                       proxy_factory) -> None:  # type: ignore[no-untyped-def]
    key, _, public = write_keys(tmp_path, "release")
    _, _, other = write_keys(tmp_path, "other")
    digest = model(fixtures, "sig/persist:v1")
    proxy = proxy_factory()
    cosign_signature(fixtures, "sig/persist", digest, key, identity=f"{proxy.host}/sig/persist")
    ref, root = f"{proxy.host}/sig/persist@{digest}", tmp_path / "root"
    assert pull(ref, root, "--verify-key", str(public)).returncode == 0
    assert [json.loads(p.read_text())["signer"] for p in (root / "verdicts").iterdir()] == ["release.pub"]
    proxy.close()  # the registry is gone; a new process uses the cached model it verified before
    again = pull(ref, root, "--verify-key", str(public))
    assert again.returncode == 0, again.stderr
    changed = pull(ref, root, "--verify-key", str(other))  # another policy must ask the registry: never a pass
    assert changed.returncode == 5 and "unavailable" in changed.stderr, (changed.returncode, changed.stderr)


def ci_and_prod_policy(fixtures: Fixtures, tmp_path: Path) -> tuple[object, object, Path]:
    """Keys 'ci' and 'release' and a policy file: prod/ needs the release key, ci/ the ci key."""
    ci_key, _, ci_public = write_keys(tmp_path, "ci")
    release_key, _, release_public = write_keys(tmp_path, "release")
    policy = tmp_path / "policy.yaml"
    policy.write_text(json.dumps({"signaturePolicy": [
        {"name": "prod", "match": [f"{fixtures.host}/prod/*"], "keys": [str(release_public)]},
        {"name": "ci", "match": [f"{fixtures.host}/ci/*"], "keys": [str(ci_public)]}]}))
    return ci_key, release_key, policy


def same_model_in(fixtures: Fixtures, *repositories: str) -> str:
    """One model (one digest) pushed to each of ``repositories`` (tag v1)."""
    files = {"weights.bin": os.urandom(20_000)}
    digests = {fixtures.raw_model(f"{repository}:v1", files) for repository in repositories}
    assert len(digests) == 1
    return digests.pop()


def test_a_verdict_is_for_one_rule_and_repository(fixtures: Fixtures, tmp_path: Path) -> None:
    """A model verified under the ci rule (ci key) is not thereby accepted under prod (release key) when it
    is named under prod/ with the same digest: the cached tree is served there only after prod's check."""
    ci_key, release_key, policy = ci_and_prod_policy(fixtures, tmp_path)
    digest = same_model_in(fixtures, "ci/shared", "prod/shared")
    cosign_signature(fixtures, "ci/shared", digest, ci_key)
    cosign_signature(fixtures, "prod/shared", digest, ci_key)  # the ci key naming prod/: not prod's key
    root = tmp_path / "root"
    assert pull(fixtures.ref("ci/shared:v1"), root, "--policy", str(policy)).returncode == 0
    for ref in (fixtures.ref(f"prod/shared@{digest}"), fixtures.ref("prod/shared:v1")):
        refused = pull(ref, root, "--policy", str(policy))
        assert refused.returncode == 9, (ref, refused.returncode, refused.stderr)
        assert f"policy 'prod': no signature by key release.pub for {digest}" in refused.stderr
    cosign_signature(fixtures, "prod/shared", digest, release_key)
    accepted = pull(fixtures.ref(f"prod/shared@{digest}"), root, "--policy", str(policy))
    assert accepted.returncode == 0, accepted.stderr
    assert json.loads(accepted.stdout)["cached"] is True  # the tree pulled as ci/shared, now checked for prod
    verdicts = [json.loads(p.read_text()) for p in (root / "verdicts").iterdir()]
    assert sorted((v["rule"], v["repository"]) for v in verdicts) == [("ci", "ci/shared"), ("prod", "prod/shared")]


def test_the_pull_flights_serve_a_cached_tree_only_under_its_rule(fixtures: Fixtures, tmp_path: Path) -> None:
    """The path of CSI publishes (bind and lazy) and agent prefetches: a digest reference under prod/ that
    hits a tree pulled as ci/ is checked under prod's rule, in memory and after a restart."""
    from modelcache.assemble.options import PullOptions
    from modelcache.registry.hosts import HostsConfig
    from modelcache.settings import Settings
    from modelcache.singleflight import PullFlights
    from modelcache.trust.signatures import SignatureRefused

    ci_key, release_key, policy = ci_and_prod_policy(fixtures, tmp_path)
    digest = same_model_in(fixtures, "ci/flight", "prod/flight")
    cosign_signature(fixtures, "ci/flight", digest, ci_key)

    def flights() -> PullFlights:
        settings = Settings.from_mapping({"root": str(tmp_path / "root"), "plainHTTP": True,
                                          "signaturePolicy": json.loads(policy.read_text())["signaturePolicy"]})
        assert isinstance(settings.hosts, HostsConfig) and settings.hosts.plain_http
        return PullFlights(settings, max_parallel=2)

    ci = parse_reference(fixtures.ref(f"ci/flight@{digest}"))
    prod = parse_reference(fixtures.ref(f"prod/flight@{digest}"))
    first = flights()
    try:
        assert first.start(ci, PullOptions(), None, "").future.result(timeout=60).record.digest == digest
        assert first.cached(ci, PullOptions()) is not None
        assert first.cached(prod, PullOptions()) is None  # in the cache, but not verified for prod/
        assert isinstance(first.start(prod, PullOptions(), None, "").future.exception(timeout=60), SignatureRefused)
        assert isinstance(_raises(lambda: first.authorize(prod, None)), SignatureRefused)  # the lazy-mount path
    finally:
        first.shutdown()
    again = flights()  # a restart: the verdicts on disk are for ci/flight only
    try:
        assert again.cached(ci, PullOptions()) is not None
        assert isinstance(again.start(prod, PullOptions(), None, "").future.exception(timeout=60), SignatureRefused)
        cosign_signature(fixtures, "prod/flight", digest, release_key)
        served = again.start(prod, PullOptions(), None, "").future.result(timeout=60)
        assert served.cached and again.cached(prod, PullOptions()) is not None
    finally:
        again.shutdown()


@needs_root
@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="/dev/fuse is missing")
def test_a_lazy_volume_is_restored_only_under_the_policy_in_force(fixtures: Fixtures, tmp_path: Path) -> None:
    """A lazy volume whose helper is gone after a restart is given its cached tree (or a new helper) only
    when the policy of the restarted plugin accepts it."""
    import signal
    import time

    from tests.helpers.csi import helper_pid
    from tests.helpers.procs import alive
    key, _, public = write_keys(tmp_path, "release")
    _, _, other = write_keys(tmp_path, "other")
    digest = same_model_in(fixtures, "prod/restored")
    cosign_signature(fixtures, "prod/restored", digest, key)
    config = prod_policy(fixtures, tmp_path, public)
    csi = CsiProcess(tmp_path / "driver", "--config", str(config))
    target = tmp_path / "pods" / "a" / "mnt"
    try:
        csi.node.NodePublishVolume(publish_request("r", target, fixtures.ref("prod/restored:v1"), mount="lazy"),
                                   timeout=60)
        helper = helper_pid(csi, target)
        csi.stop(signal.SIGKILL)
        os.kill(helper, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while alive(helper):  # reaped between two looks is ended too
            assert time.monotonic() < deadline, "the helper did not end"
            time.sleep(0.05)
        prod_policy(fixtures, tmp_path, other)  # the admin now trusts another key for prod/
        csi.start()
        deadline = time.monotonic() + 60
        while "ModelVolume" not in csi.log_text():
            assert time.monotonic() < deadline, csi.log_text()[-3000:]
            time.sleep(0.1)
        assert "ModelVolumeLost" in csi.log_text() and "ModelVolumeRestored" not in csi.log_text()
        assert "signature required by policy 'prod': no signature by key other.pub" in csi.log_text()
        assert not target.exists()
        csi.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id="r", target_path=str(target)))
    finally:
        csi.stop()
        unmount_tree(target)


def _raises(call: Callable[[], object]) -> BaseException | None:
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - returned for the caller to check
        return exc
    return None


def test_a_registry_spelling_does_not_dodge_a_rule(fixtures: Fixtures, tmp_path: Path) -> None:
    """Host names are case-insensitive, and an IP address has many spellings: rules see one."""
    key, _, public = write_keys(tmp_path, "release")
    port = fixtures.host.rsplit(":", 1)[1]
    unsigned = same_model_in(fixtures, "prod/unsigned")
    signed = same_model_in(fixtures, "prod/signed")
    cosign_signature(fixtures, "prod/signed", signed, key, identity=f"LocalHost:{port}/prod/signed:v1")
    policy = tmp_path / "policy.yaml"
    for pattern, spellings in (("localhost:{port}/prod/*", ["localhost", "LOCALHOST", "LocalHost"]),
                               ("LOCALHOST:{port}/PROD/*", ["localhost"]),
                               ("127.0.0.1:{port}/prod/*", ["127.0.0.1", "127.1", "2130706433", "0x7f.0.0.1"])):
        policy.write_text(json.dumps({"signaturePolicy": [
            {"name": "prod", "match": [pattern.format(port=port)], "keys": [str(public)]}]}))
        for host in spellings:
            root = tmp_path / f"root-{host}"
            refused = pull(f"{host}:{port}/prod/unsigned:v1", root, "--policy", str(policy))
            assert refused.returncode == 9, (pattern, host, refused.returncode, refused.stderr)
            assert f"policy 'prod': no signature by key release.pub for {unsigned}" in refused.stderr
            assert nothing_cached(root)
    other_name = pull(f"127.1:{port}/prod/signed:v1", tmp_path / "root-other-name", "--policy", str(policy))
    assert other_name.returncode == 9, other_name.stderr  # the rule names 127.0.0.1, the signature localhost
    rules = [{"name": "prod", "match": [f"localhost:{port}/prod/*"], "keys": [str(public)]}]
    policy.write_text(json.dumps({"signaturePolicy": rules}))
    accepted = pull(f"LOCALHOST:{port}/prod/signed:v1", tmp_path / "root-signed", "--policy", str(policy))
    assert accepted.returncode == 0, accepted.stderr  # the signature's spelling of the name is normalised too
    # names are compared, not addresses: another name of the same server is another registry, unchecked
    # unless the policy's default refuses what no rule names
    assert pull(f"127.0.0.1:{port}/prod/unsigned:v1", tmp_path / "root-by-address", "--policy",
                str(policy)).returncode == 0
    policy.write_text(json.dumps({"signaturePolicy": {"default": "signed", "rules": rules}}))
    assert pull(f"127.0.0.1:{port}/prod/unsigned:v1", tmp_path / "root-default", "--policy",
                str(policy)).returncode == 9


def test_rule_patterns_are_normalised_when_the_policy_is_loaded(tmp_path: Path) -> None:
    from modelcache.errors import ModelCacheError
    from modelcache.trust.signatures import SignaturePolicy
    _, _, public = write_keys(tmp_path, "release")

    def rule_for(pattern: str, reference: str) -> str | None:
        policy = SignaturePolicy.from_mapping([{"name": "r", "match": [pattern], "keys": [str(public)]}], "test")
        rule = policy.rule_for(parse_reference(reference))
        return rule.name if rule else None

    assert rule_for("Registry.Example.com:443/prod/*", "registry.example.com/prod/m") == "r"
    assert rule_for("registry.example.com/prod/*", "REGISTRY.example.com:443/prod/m") == "r"
    assert rule_for("index.docker.io/library/*", "ubuntu") == "r"
    assert rule_for("registry-1.docker.io/library/*", "docker.io/ubuntu") == "r"
    assert rule_for("[0:0::1]:5000/prod/*", "[::1]:5000/prod/m") == "r"  # brackets are not a glob class
    assert rule_for("[::1]:5000/prod/*", "[0::1]:5000/prod/m") == "r"
    assert rule_for("[::1]:5000/prod/*", "[::1]:5000/dev/m") is None
    assert rule_for("*.Example.com/prod/*", "eu.example.com/prod/m") == "r"  # a glob host: lower-cased
    assert rule_for("*", "anything.example/x") == "r"
    for bad in ("localhost.:5000/prod/*", "r.io:0/prod/*", "[zz]:5000/*"):
        with pytest.raises(ModelCacheError, match="pattern"):
            rule_for(bad, "r.io/m")


def test_default_signed_refuses_what_no_rule_names(fixtures: Fixtures, tmp_path: Path) -> None:
    key, _, public = write_keys(tmp_path, "release")
    signed = same_model_in(fixtures, "prod/named")
    cosign_signature(fixtures, "prod/named", signed, key)
    other = same_model_in(fixtures, "elsewhere/unnamed")
    same_model_in(fixtures, "scratch/free")
    rules = [{"name": "prod", "match": [f"{fixtures.host}/prod/*"], "keys": [str(public)]},
             {"name": "scratch", "match": [f"{fixtures.host}/scratch/*"], "require": "none"}]
    policy, settings = tmp_path / "policy.yaml", tmp_path / "node.yaml"
    policy.write_text(json.dumps({"default": "signed", "rules": rules}))  # a policy file: the mapping itself
    settings.write_text(json.dumps({"signaturePolicy": {"default": "signed", "rules": rules}}))
    for option in (["--policy", str(policy)], ["--config", str(settings)]):
        root = tmp_path / f"root{option[0]}"
        refused = pull(fixtures.ref("elsewhere/unnamed:v1"), root, *option)
        assert refused.returncode == 9, (option, refused.returncode, refused.stderr)
        assert f"signature required by the policy's default: no rule names {fixtures.host}/elsewhere/unnamed" \
               in refused.stderr, refused.stderr
        assert nothing_cached(root)
        assert pull(fixtures.ref("prod/named:v1"), root, *option).returncode == 0
        assert pull(fixtures.ref("scratch/free:v1"), root, *option).returncode == 0
    assert other != signed
    policy.write_text(json.dumps({"default": "none", "rules": rules}))  # explicitly the old behaviour
    assert pull(fixtures.ref("elsewhere/unnamed:v1"), tmp_path / "root-none", "--policy", str(policy)).returncode == 0


@pytest.mark.parametrize("policy,message", [
    ({"default": "sometimes", "rules": []}, "default must be signed or none"),
    ({"default": "signed", "rules": [], "extra": 1}, "unknown keys ['extra']"),
    ({"default": "signed", "rules": {"name": "x"}}, "rules must be a list"),
    ({"rules": [{"name": "x", "match": "r.io/*", "require": "signed"}]}, "require must be none or keys"),
    ("signed", "must be a list of rules or a mapping"),
])
def test_a_malformed_policy_is_refused_when_loaded(tmp_path: Path, policy: object, message: str) -> None:
    from modelcache.errors import Kind, ModelCacheError
    from modelcache.trust.signatures import SignaturePolicy
    with pytest.raises(ModelCacheError) as info:
        SignaturePolicy.from_mapping(policy, "node.yaml")
    assert info.value.kind is Kind.INVALID_ARGUMENT and message in str(info.value), str(info.value)


def dsse_bundle(key: object, subjects: list[dict[str, object]]) -> tuple[bytes, dict[str, Any]]:
    """A Sigstore bundle (v0.3) over an in-toto statement with ``subjects``, signed with ``key``."""
    statement = json.dumps({"_type": "https://in-toto.io/Statement/v1", "subject": subjects,
                            "predicateType": "https://sigstore.dev/cosign/sign/v1", "predicate": {}}).encode()
    payload_type = b"application/vnd.in-toto+json"
    pae = b"DSSEv1 %d %s %d %s" % (len(payload_type), payload_type, len(statement), statement)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    signature = base64.b64encode(key.sign(pae, ec.ECDSA(hashes.SHA256()))).decode()
    bundle: dict[str, Any] = {"mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json",
                              "verificationMaterial": {"publicKey": {"hint": "release"}, "tlogEntries": []},
                              "dsseEnvelope": {"payload": base64.b64encode(statement).decode(),
                                               "payloadType": payload_type.decode(),
                                               "signatures": [{"sig": signature, "keyid": ""}]}}
    return json.dumps(bundle).encode(), bundle


def test_a_bundle_subject_must_name_the_repository(tmp_path: Path) -> None:
    """An in-toto subject without a name, or naming another repository (or another digest), matches nothing;
    the name may be spelled with a tag, the digest itself, or another spelling of the registry."""
    from modelcache.trust.bundles import verify_bundles
    from modelcache.trust.sigkeys import load_public_key
    key, _, public = write_keys(tmp_path, "release")
    trusted = [load_public_key(public)]
    digest = Digest.of_bytes(b"the model's manifest")
    ref = parse_reference(f"localhost:5000/prod/m@{digest}")
    sha = {"sha256": digest.hex}
    cases: dict[str, tuple[list[dict[str, object]], bool]] = {
        "named": ([{"name": "localhost:5000/prod/m", "digest": sha}], True),
        "named with a tag": ([{"name": "localhost:5000/prod/m:v1", "digest": sha}], True),
        "named with the digest": ([{"name": f"localhost:5000/prod/m@{digest}", "digest": sha}], True),
        "another spelling": ([{"name": "LOCALHOST:5000/prod/m", "digest": sha}], True),
        "no name": ([{"digest": sha}], False),
        "an empty name": ([{"name": "", "digest": sha}], False),
        "another repository": ([{"name": "localhost:5000/ci/m", "digest": sha}], False),
        "another registry": ([{"name": "elsewhere:5000/prod/m", "digest": sha}], False),
        "a name that is no reference": ([{"name": "prod/m is fine", "digest": sha}], False),
        "the name with another digest": ([{"name": f"localhost:5000/prod/m@{Digest.of_bytes(b'x')}",
                                           "digest": sha}], False),
        "name and digest in different subjects": ([{"name": "localhost:5000/prod/m", "digest": {"sha256": "0" * 64}},
                                                   {"digest": sha}], False),
    }
    for case, (subjects, accepted) in cases.items():
        found = verify_bundles([dsse_bundle(key, subjects)], ref, trusted)
        assert (found == "release.pub") is accepted, case


def test_a_cosign_payload_must_name_the_repository_and_digest(fixtures: Fixtures, tmp_path: Path) -> None:
    from modelcache.trust.cosign import verify_cosign
    from modelcache.trust.sigkeys import load_public_key
    key, _, public = write_keys(tmp_path, "release")
    trusted = [load_public_key(public)]
    port = fixtures.host.rsplit(":", 1)[1]
    cases = {"": True, f"LOCALHOST:{port}/cosign/case-1:v1": True, f"localhost:{port}/cosign/case-2@{{digest}}": True,
             f"localhost:{port}/cosign/other": False, f"localhost:{port}/cosign/case-4@{Digest.of_bytes(b'x')}": False,
             "not a reference!": False}
    for i, (identity, accepted) in enumerate(cases.items()):
        digest = same_model_in(fixtures, f"cosign/case-{i}")
        cosign_signature(fixtures, f"cosign/case-{i}", digest, key, identity=identity.format(digest=digest) or
                         f"localhost:{port}/cosign/case-{i}")
        ref = parse_reference(f"localhost:{port}/cosign/case-{i}@{digest}")
        assert (verify_cosign(fixtures.client, ref, trusted) == "release.pub") is accepted, identity
