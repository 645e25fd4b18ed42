"""The ``ocimodel`` command line: one entry point for the core, the CSI driver and the node agent."""
