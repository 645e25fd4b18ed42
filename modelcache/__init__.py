"""Core of ocimodel: references, OCI client, content store and model trees.

This package imports neither grpc, kubernetes nor pyfuse3; the CSI driver and the
node agent build on it. Its subsystems are sub-packages: ``registry`` (the registry client and its
transport), ``store`` (the content store), ``assemble`` (manifests into trees), ``trust`` (signatures and
the chunk index), ``lazy`` (reads for lazy mounts) and ``upkeep`` (gc, eviction, pins, verification); the
modules at this level glue them (``cache``, ``singleflight``, ``settings``, ``records``) or are shared by all.
"""

__version__ = "0.1.0"
