"""Sidecar handler modules: every module here is imported by the sidecar's warm-up
(nanotune.sidecar.runtime), and registers its handlers with
nanotune.sidecar.dispatch.method."""
