"""Command-line options every ``ocimodel`` subcommand shares, and the Settings they produce."""

from __future__ import annotations

import argparse
from pathlib import Path

from modelcache.settings import Settings


def add_node_options(parser: argparse.ArgumentParser, *, registry: bool = True) -> None:
    """``--root`` and ``--config``; with ``registry``, also ``--plain-http`` and ``--docker-config``."""
    parser.add_argument("--root", help="cache root (default /var/lib/ocimodel, or the config's root)")
    parser.add_argument("--config", help="node settings file (YAML or JSON)")
    if registry:
        parser.add_argument("--plain-http", action="store_true", help="talk HTTP, not HTTPS, to registries")
        parser.add_argument("--docker-config", help="Docker config.json with registry credentials")


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The settings file named by ``--config`` with the command-line overrides applied."""
    settings = Settings.load(Path(args.config) if args.config else None)
    if getattr(args, "root", None):
        settings.root = Path(args.root)
    if getattr(args, "plain_http", False):
        settings.hosts.plain_http = True
    if getattr(args, "docker_config", None):
        settings.docker_config = Path(args.docker_config)
    return settings
