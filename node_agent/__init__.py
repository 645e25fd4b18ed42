"""The ocimodel node agent: prefetch models declared by ModelCache objects, warm page cache, evict."""

GROUP = "ocimodel.csi.dev"
VERSION = "v1alpha1"
PLURAL = "modelcaches"
KIND = "ModelCache"
