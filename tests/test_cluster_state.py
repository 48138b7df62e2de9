"""What `up` records for later commands (cedana_ray.cluster_state): read as it was written,
a later version's fields ignored, a damaged file refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cedana_ray.cluster_state import ClusterState, address, gateway_of, load_state, save_state, state_file
from cedana_ray.errors import StateError

STATE = ClusterState(address="10.0.0.1:6379", storage="file:///c", base="/b", gateway="http://10.0.0.1:7000")


def test_the_state_up_saved_is_read_back_with_a_later_version_s_fields_ignored(home: Path) -> None:
    assert load_state() is None and address() is None
    save_state(STATE)
    assert state_file().stat().st_mode & 0o777 == 0o600, "private whatever the umask"
    assert load_state() == STATE and address() == STATE.address
    state_file().write_text(json.dumps({**json.loads(state_file().read_text()), "added_later": 1}))
    assert load_state() == STATE


@pytest.mark.parametrize("text", ["{", "[]", '{"address": "a"}'], ids=["not json", "not an object", "missing fields"])
def test_a_damaged_state_is_refused(home: Path, text: str) -> None:
    home.mkdir(parents=True)
    state_file().write_text(text)
    with pytest.raises(StateError, match=r"cluster.json is damaged"):
        load_state()


def test_a_gateway_is_used_only_for_its_own_cluster_and_without_a_ray_token(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_state(STATE)
    assert gateway_of(STATE.address) == STATE
    assert gateway_of("10.0.0.2:6379") is None, "another cluster's"
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # a Ray job's: it connects with its own token
    assert gateway_of(STATE.address) is None
