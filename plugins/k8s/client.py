"""The official Kubernetes client, imported when a command needs it (it takes seconds), or
our one-line error naming the ``k8s`` extra."""

from __future__ import annotations

from types import ModuleType

from cedana_ray.extras import load, needs

REQUIRED = needs("k8s", "cedana-ray k8s")


def manifests() -> ModuleType:
    """:mod:`.manifests`, which builds the objects with the client's models."""
    return load(f"{__package__}.manifests", REQUIRED)


def applier() -> ModuleType:
    """:mod:`.apply`, which talks to the API server."""
    return load(f"{__package__}.apply", REQUIRED)


def api_pods() -> ModuleType:
    """:mod:`.api_pods`, which lists the pods the API server knows."""
    return load(f"{__package__}.api_pods", REQUIRED)
