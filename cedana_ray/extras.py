"""The optional parts of cedana-ray, installed as extras of the distribution.

The base install (``pip install cedana-ray``) runs processes and containers and keeps
checkpoints on local disk or in the cluster's own store. What needs more is an extra:

- ``s3``: ``s3://`` checkpoint storage (s3fs);
- ``gcs``: ``gs://`` checkpoint storage (gcsfs);
- ``gpu``: NVIDIA GPUs through NVML (nvidia-ml-py);
- ``cri``: the ``crio`` plugin's CRI client (grpcio, and the protobuf runtime its messages need);
- ``k8s``: the official Kubernetes client;
- ``all``: every one of them.

Where one is missing, the feature that needs it says so in one line, naming the extra
(:func:`needs`), e.g. ``s3:// needs the s3 extra: pip install 'cedana-ray[s3]'``.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from .errors import PrerequisiteError

DISTRIBUTION = "cedana-ray"


# the top-level module of what each extra brings, by which a failed import names the extra
MODULES = {"s3fs": "s3", "gcsfs": "gcs", "pynvml": "gpu", "grpc": "cri", "kubernetes": "k8s"}


class MissingExtra(PrerequisiteError, ImportError):
    """An extra that is not installed. An :class:`ImportError` too, raised where an import
    fails, so that whatever imports a module of an extra (fsspec, a plugin loader) can tell."""


def needs(extra: str, what: str) -> str:
    """``WHAT needs the EXTRA extra: pip install 'cedana-ray[EXTRA]'``."""
    return f"{what} needs the {extra} extra: pip install '{DISTRIBUTION}[{extra}]'"


def load(module: str, required: str) -> ModuleType:
    """``module``, imported where a command needs it; where its extra is missing, the
    :class:`MissingExtra` that says ``required`` (see :func:`needs`)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtra(required) from exc


def installed(module: str) -> bool:
    """Whether ``module`` can be imported here (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that is missing
        return False


def missing_in(exc: BaseException | None) -> MissingExtra | None:
    """The :class:`MissingExtra` that ``exc`` is, or that caused it (fsspec raises its own
    ImportError from the one a filesystem's module raised)."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, MissingExtra):
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def explain(exc: BaseException, what: str) -> MissingExtra | None:
    """The missing extra behind an import error of ``what`` (a plugin): one raised as a
    :class:`MissingExtra`, or a module an extra brings that is not installed."""
    if found := missing_in(exc):
        return found
    if isinstance(exc, ModuleNotFoundError) and exc.name and (extra := MODULES.get(exc.name.split(".")[0])):
        return MissingExtra(needs(extra, what))
    return None
