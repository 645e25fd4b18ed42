"""Trust in what is pulled: the signature policy and its verifiers (``signatures``: cosign key-based tags,
Sigstore bundles stored as referrers, OpenSSF model signatures), trusted keys (``sigkeys``) and the chunk index
that lets lazy reads verify each chunk (``chunkindex``). Builds on the registry client."""
