"""The ocimodel CSI plugin: Identity, Node and Controller services over grpcio, on the modelcache core."""

DRIVER_NAME = "ocimodel.csi.dev"
