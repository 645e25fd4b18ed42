"""``ocimodel pull``, ``push``, ``sign`` and ``inspect``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from modelcache.assemble.options import PullOptions, parse_layer_kinds
from modelcache.describe import describe
from modelcache.progress import Progress
from modelcache.push import PACK_AUTO_FILES, PACK_BELOW, push_directory
from modelcache.registry.client import RegistryClient
from modelcache.registry.mediatypes import Compression
from modelcache.registry.reference import parse_reference
from modelcache.trust.cosign import sign_cosign
from modelcache.trust.sigkeys import load_private_key
from ocimodel.cli.options import (
    add_common,
    add_policy_options,
    add_selection_options,
    emit,
    explicit_credentials,
    settings_from_args,
)
from ocimodel.progress import ProgressLine


def cmd_pull(args: argparse.Namespace) -> int:
    """Pull a reference into the cache and print where it is."""
    settings = settings_from_args(args)
    cache = settings.cache(explicit_credentials(args, args.reference))
    options = PullOptions(tuple(args.include or ()), tuple(args.exclude or ()), args.path,
                          parse_layer_kinds(args.layers or ""))
    ref = parse_reference(args.reference)
    files_signed = None
    settings.signature_policy.persist_in(cache.store.root / "verdicts")
    if settings.signature_policy.requires_signature(ref):  # verified before anything is cached
        ref = ref if ref.digest else ref.with_digest(cache.client.head_digest(ref))
        files_signed = settings.signature_policy.check(cache.client, ref)
    progress = Progress()
    with ProgressLine(progress, args.reference):
        result = cache.pull(ref, options, progress, check_tree=files_signed.verify_tree if files_signed else None)
    data = result.to_json()
    if args.list_files:
        data["file_list"] = sorted(str(p.relative_to(result.path)) for p in result.path.rglob("*") if p.is_file())
    text = "\n".join(f"{k}: {v}" for k, v in data.items() if k != "file_list")
    emit(args, data, text)
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    """Pack a directory as a ModelPack artifact and push it."""
    settings = settings_from_args(args)
    ref = parse_reference(args.reference)
    client = RegistryClient(settings.transport(explicit_credentials(args, args.reference)))
    key = load_private_key(Path(args.sign_key), _key_password()) if args.sign_key else None
    digest = push_directory(client, Path(args.directory), ref, compression=Compression(args.layer_format),
                            chunk_index=not args.no_chunk_index,
                            pack_small={"auto": None, "always": True, "never": False}[args.pack_small],
                            progress=(lambda m: print(m, file=sys.stderr)) if sys.stderr.isatty() else None)
    if key is not None:
        signature = sign_cosign(client, ref.by_digest(digest), key)
        print(f"signed {ref.repository}@{digest} (signature manifest {signature})", file=sys.stderr)
    emit(args, {"reference": str(ref), "digest": str(digest)}, f"pushed {ref}@{digest}")
    return 0


def _key_password() -> bytes | None:
    password = os.environ.get("OCIMODEL_KEY_PASSWORD")
    return password.encode() if password else None


def cmd_sign(args: argparse.Namespace) -> int:
    """Sign what REF names (cosign's key-based tag scheme)."""
    settings = settings_from_args(args)
    ref = parse_reference(args.reference)
    client = RegistryClient(settings.transport(explicit_credentials(args, args.reference)))
    key = load_private_key(Path(args.key), _key_password())
    digest = ref.digest or client.head_digest(ref)
    signature = sign_cosign(client, ref.by_digest(digest), key)
    emit(args, {"reference": str(ref), "digest": str(digest), "signature_manifest": str(signature)},
         f"signed {ref.registry}/{ref.repository}@{digest}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """Describe REF from its manifest (and a ModelKit's config) without downloading a layer."""
    settings = settings_from_args(args)
    client = RegistryClient(settings.transport(explicit_credentials(args, args.reference)))
    data = describe(client, parse_reference(args.reference))
    emit(args, data, _inspect_text(data))
    return 0


def _inspect_text(data: dict[str, Any]) -> str:
    artifact = f" (artifactType {data['artifact_type']})" if data["artifact_type"] else ""
    lines = [f"reference: {data['reference']}", f"digest: {data['digest']}",
             f"manifest: {data['manifest_digest']} {data['media_type']}{artifact}",
             f"config: {data['config_media_type']}",
             f"layout: {data['layout']}" + (f" ({data['problem']})" if data["problem"] else ""),
             f"layers ({len(data['layers'])}, {data['total_bytes']} bytes):"]
    for i, layer in enumerate(data["layers"]):
        lines.append(f"  {i:>3} {layer['kind'] or '-':<8} {layer['format'] or '-':<8} {layer['size']:>14} "
                     f"{layer['path'] or '-'}  {layer['media_type']}")
    signatures = data["signatures"]
    lines.append(f"signatures: cosign {signatures['cosign']}, sigstore bundles {signatures['sigstore_bundles']} "
                 f"(present, not verified)")
    index = data["chunk_index"]
    lines.append(f"chunk index: {index['digest'] if index else 'none'}")
    return "\n".join(lines)


def register(sub: Any) -> None:
    """Add ``pull``, ``push``, ``sign`` and ``inspect``."""
    pull = sub.add_parser("pull", help="pull a model into the node cache")
    pull.add_argument("reference", help="the model: registry/repository[:tag][@digest]")
    add_selection_options(pull, path_help="sub-directory of the model to expose")
    pull.add_argument("--list-files", action="store_true", help="include the file list")
    add_common(pull)
    add_policy_options(pull)
    pull.set_defaults(handler=cmd_pull)

    push = sub.add_parser("push", help="push a directory as a ModelPack artifact")
    push.add_argument("directory", help="the model's directory; each file becomes one layer (see --pack-small)")
    push.add_argument("reference", help="where to push: registry/repository:tag")
    push.add_argument("--layer-format", choices=[c.value for c in Compression], default="raw",
                      help="how each file is stored (model-spec recommends raw; default: %(default)s)")
    push.add_argument("--pack-small", choices=["auto", "always", "never"], default="auto",
                      help=f"pack the files under {PACK_BELOW >> 20} MiB together, one tar layer per kind "
                           f"(uncompressed unless --layer-format names a compression), so that pulls and lazy mounts "
                           f"fetch a few layers rather than one per file; auto: when there are more than "
                           f"{PACK_AUTO_FILES} of them (default: %(default)s)")
    push.add_argument("--no-chunk-index", action="store_true",
                      help="do not record the chunk index that lets lazy mounts verify each chunk before serving it")
    push.add_argument("--sign-key", metavar="PATH",
                      help="sign the pushed model with this PEM private key (password from $OCIMODEL_KEY_PASSWORD; "
                           "default: not signed)")
    add_common(push)
    push.set_defaults(handler=cmd_push)

    sign = sub.add_parser("sign", help="sign a model in the registry (cosign's key-based tag scheme)")
    sign.add_argument("reference", help="the model to sign: registry/repository[:tag][@digest]")
    sign.add_argument("--key", required=True, metavar="PATH",
                      help="PEM private key: ECDSA P-256/P-384, Ed25519 or RSA (password from $OCIMODEL_KEY_PASSWORD)")
    add_common(sign)
    sign.set_defaults(handler=cmd_sign)

    inspect = sub.add_parser("inspect", help="describe a model (layers, kinds, paths, signatures) without "
                                             "downloading it")
    inspect.add_argument("reference", help="the model: registry/repository[:tag][@digest]")
    add_common(inspect)
    inspect.set_defaults(handler=cmd_inspect)
