"""Keeping the cache within its bounds and whole: garbage collection of unreferenced blobs and trees (``gc``),
eviction under a size budget (``eviction``), pins that keep models from eviction (``pins``) and re-verification
of stored blobs (``verify``). Builds on :class:`~modelcache.cache.ModelCache`."""
