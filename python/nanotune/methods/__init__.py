"""Sidecar method modules: every module here is imported when the sidecar starts
(see nanotune.sidecar.registry)."""
