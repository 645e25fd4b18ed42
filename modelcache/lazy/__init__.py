"""Lazy reads for lazy mounts: a model readable before its download has finished
(:class:`~modelcache.lazy.model.LazyModel`: its tree, built from the manifest and the tar headers of its layers
(``lazytree``), its background pull and the dispatch of each read), what its readers share (``state``: the verdict
that marks it broken, the record of bytes served before verification, committed blobs), reads served from the
running download (``live``) and reads fetched by range into chunk caches (``fetch``, ``chunkcache``), each
verified against the chunk index."""
