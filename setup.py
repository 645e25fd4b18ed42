"""Generates the CSI stubs from protos/ before setuptools looks for packages (metadata is in pyproject.toml)."""

import runpy
from pathlib import Path

from setuptools import setup

runpy.run_path(str(Path(__file__).parent / "protos" / "generate.py"))["generate"]()
setup()
