"""What ``up`` started, kept in ``CEDANA_RAY_HOME/cluster.json``: how later commands reach the
cluster, and what ``down`` stops.

Every command that may reach a cluster reads it first, so it is a plain dataclass read with
:mod:`json`: importing pydantic alone would cost ``ps`` more than its whole budget. Only
``up`` writes it, private (0600).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .config import RAY_AUTH_MODE, paths
from .errors import StateError

STATE_FILE = "cluster.json"


@dataclass(frozen=True)
class ClusterState:
    address: str
    storage: str
    base: str
    head_temp_dir: str | None = None  # set when `up` started the Ray head itself
    dashboard: str | None = None
    auth_token_file: str | None = None  # the Ray auth token's file; None: Ray runs without auth
    encrypted: bool = False  # every checkpoint encrypted with the cluster's key (`up --encrypt`)
    gateway: str | None = None  # the coordinator's gateway (cedana_ray.gateway); its token is in BASE


def state_file(home: Path | None = None) -> Path:
    return (home or paths().home) / STATE_FILE


def load_state(home: Path | None = None) -> ClusterState | None:
    """What ``up`` recorded in ``home`` (default: this state dir), if it got that far."""
    path = state_file(home)
    known = {f.name for f in dataclasses.fields(ClusterState)}
    try:
        doc = json.loads(path.read_text())
        return ClusterState(**{k: v for k, v in doc.items() if k in known})  # a later version's fields ignored
    except FileNotFoundError:
        return None
    except (ValueError, TypeError, AttributeError) as exc:
        raise StateError(f"{path} is damaged: {exc}", hint="`cedana-ray up` writes it again") from None


def save_state(state: ClusterState) -> None:
    """Private (0600) whatever the caller's umask, replaced whole."""
    from .crypto import write_private  # here: only `up` writes it, and crypto imports the models

    path = state_file()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)  # an interrupted `up`'s
    write_private(tmp, json.dumps(dataclasses.asdict(state), indent=2).encode())
    tmp.replace(path)


def address() -> str | None:
    """The cluster to use: ``CEDANA_RAY_ADDRESS``, ``RAY_ADDRESS`` (set in Ray jobs) or the one `up` joined."""
    found = os.environ.get("CEDANA_RAY_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if found:
        return found
    state = load_state()
    return state.address if state else None


def gateway_of(addr: str) -> ClusterState | None:
    """What ``up`` recorded here for the cluster at ``addr`` where it has a gateway that commands
    may use: not where the environment names a Ray token of its own (a Ray job's, a user's:
    ``RAY_AUTH_MODE=token``), which must be what this process connects with."""
    state = load_state()
    if state is None or state.address != addr or not state.gateway or os.environ.get(RAY_AUTH_MODE) == "token":
        return None
    return state
