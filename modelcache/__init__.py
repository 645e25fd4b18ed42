"""Core of ocimodel: references, OCI client, content store and model trees.

This package imports neither grpc, kubernetes nor pyfuse3; the CSI driver and the
node agent build on it.
"""

__version__ = "0.1.0"
