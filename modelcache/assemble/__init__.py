"""Turning a manifest into a model tree: what a manifest asks for (``layout``, ``kitfile``), the pull's selection
(``options``, ``paths``), tar safety (``safetar``, ``treerules``, ``fdtree``), extraction and tree assembly, and the
pull steps that download blobs from the registry client into the store (``pull``)."""
