"""The content store: content-addressed blobs under the cache root (:class:`~modelcache.store.content.ContentStore`),
ingest with its locks, leases and connection slots, ranged ingest (lead stream, pieces, resumable state, the view
lazy mounts read) and served-ranges records. It knows nothing of registries: it is handed a fetch function."""
