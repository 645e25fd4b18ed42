"""The registry client and its transport: references, OCI media types and manifests, registry hosts and mirrors
(``hosts.toml``), egress policy, mirror health, credentials and who may read a private model (``access``), the
HTTP transport (auth, retries, mirrors) and :class:`~modelcache.registry.client.RegistryClient`. It knows nothing
of the content store: it streams bytes to whoever asks."""
