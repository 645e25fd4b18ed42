"""The ocimodel CSI plugin: Identity, Node and Controller services over grpcio, on the modelcache core.

The names here are what the command line needs before the services are imported (grpc loads slowly)."""

DRIVER_NAME = "ocimodel.csi.dev"
MODES = ("node", "controller", "all")
DEFAULT_PUBLISH_WAIT = 100.0  # seconds NodePublishVolume waits for a pull before answering ABORTED
