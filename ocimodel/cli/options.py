"""Options every ``ocimodel`` subcommand shares, the Settings they produce, and output helpers."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from modelcache.errors import Kind, ModelCacheError
from modelcache.registry.credentials import Credentials, CredentialStore
from modelcache.registry.mediatypes import LAYER_KINDS
from modelcache.registry.reference import parse_reference
from modelcache.settings import Settings
from modelcache.trust.signatures import SignaturePolicy

EXIT_CODES = {Kind.INVALID_ARGUMENT: 2, Kind.NOT_FOUND: 3, Kind.UNAUTHENTICATED: 4, Kind.PERMISSION_DENIED: 4,
              Kind.UNAVAILABLE: 5, Kind.INTEGRITY: 6, Kind.UNSAFE_CONTENT: 6, Kind.RESOURCE_EXHAUSTED: 7,
              Kind.UNSUPPORTED: 8, Kind.REFUSED: 9, Kind.INTERNAL: 1}
EXIT_INTEGRITY = EXIT_CODES[Kind.INTEGRITY]


def add_node_options(parser: argparse.ArgumentParser, *, registry: bool = True) -> None:
    """``--root`` and ``--config``; with ``registry``, also ``--plain-http`` and ``--docker-config``."""
    parser.add_argument("--root", help="cache root (default: the settings' root, else /var/lib/ocimodel)")
    parser.add_argument("--config", metavar="FILE", help="node settings file, YAML or JSON: registries and mirrors, "
                        "allowedRegistries, watermarks, signaturePolicy (default: none, built-in defaults)")
    if registry:
        parser.add_argument("--plain-http", action="store_true", help="talk HTTP, not HTTPS, to registries")
        parser.add_argument("--docker-config", help="Docker config.json with registry credentials (default: the "
                            "settings' dockerConfig, else $DOCKER_CONFIG/config.json or ~/.docker/config.json)")


def add_common(parser: argparse.ArgumentParser, *, registry: bool = True) -> None:
    """The node options plus ``--json`` and, with ``registry``, explicit credentials."""
    add_node_options(parser, registry=registry)
    parser.add_argument("--json", action="store_true", help="print JSON")
    if registry:
        parser.add_argument("--username", help="registry user, for this command only (password from --password-stdin "
                            "or $OCIMODEL_PASSWORD; default: the Docker config and credential helpers)")
        parser.add_argument("--password-stdin", action="store_true", help="read the password from standard input")


def add_selection_options(parser: argparse.ArgumentParser, *, path_help: str) -> None:
    """``--include``, ``--exclude``, ``--path`` and ``--layers``: which part of a model a pull or a mount shows
    (the include/exclude/path/layers volume attributes)."""
    parser.add_argument("--include", action="append", metavar="GLOB",
                        help="keep only files matching this glob (repeatable; default: every file)")
    parser.add_argument("--exclude", action="append", metavar="GLOB",
                        help="drop files matching this glob (repeatable; default: none)")
    parser.add_argument("--path", help=f"{path_help} (default: its root; container images: /models)")
    parser.add_argument("--layers", metavar="KINDS", help=f"only these layer kinds, a comma list of "
                        f"{', '.join(LAYER_KINDS)} (ModelPack and ModelKit); the others are never downloaded "
                        f"(default: every kind)")


def add_policy_options(parser: argparse.ArgumentParser) -> None:
    """``--verify-key`` (repeatable) and ``--policy``: a signature policy for this command."""
    parser.add_argument("--verify-key", action="append", metavar="PATH",
                        help="require a cosign signature by this PEM public key or certificate (repeatable; "
                             "default: the --policy or --config file's signaturePolicy)")
    parser.add_argument("--policy", metavar="FILE", help="signature policy file (YAML: a signaturePolicy list of "
                        "rules, or {default: signed|none, rules: [...]}; default: the --config file's "
                        "signaturePolicy)")


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The settings file named by ``--config`` with the command-line overrides applied."""
    settings = Settings.load(Path(args.config) if args.config else None)
    if getattr(args, "verify_key", None):
        settings.signature_policy = SignaturePolicy.requiring([Path(k) for k in args.verify_key])
    elif getattr(args, "policy", None):
        path = Path(args.policy)
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ModelCacheError(f"policy {path}: {exc}", kind=Kind.INVALID_ARGUMENT) from None
        # a node settings file (its signaturePolicy), or the policy itself: a list of rules or {default, rules}
        policy = data["signaturePolicy"] if isinstance(data, dict) and "signaturePolicy" in data else data
        settings.signature_policy = SignaturePolicy.from_mapping(policy, str(path), path.parent)
    if getattr(args, "root", None):
        settings.root = Path(args.root)
    if getattr(args, "plain_http", False):
        settings.hosts.plain_http = True
    if getattr(args, "docker_config", None):
        settings.docker_config = Path(args.docker_config)
    return settings


def explicit_credentials(args: argparse.Namespace, reference: str) -> CredentialStore | None:
    """Credentials from ``--username`` and the password on stdin or in ``$OCIMODEL_PASSWORD``, if given."""
    username = getattr(args, "username", None)
    if not username:
        return None
    if getattr(args, "password_stdin", False):
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = os.environ.get("OCIMODEL_PASSWORD", "")
    store = CredentialStore()
    store.add(parse_reference(reference).endpoint_host, Credentials(username, password))
    return store


def emit(args: argparse.Namespace, data: Any, text: str) -> None:
    """Print ``data`` as JSON with ``--json``, else ``text``."""
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print(text)


def exit_now(code: int) -> None:
    """End a service process at once, after flushing logs and output, without joining worker threads: a
    pull thread blocked in a socket read would hold interpreter exit for its whole read time-out, and
    what it leaves (a partial download) resumes on the next start."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
