"""Lazy reads for lazy mounts: a model's tree built from its layers' tar headers (``lazytree``), and reads served
from the blobs a running pull has written, or fetched by range and verified against the chunk index
(``model``: :class:`~modelcache.lazy.model.LazyModel`; ``chunkcache``)."""
