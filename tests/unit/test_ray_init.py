"""jobs.ray_init: a dead cluster's address file must not make a driver hang (no Ray started here)."""

from __future__ import annotations

import socket

import pytest

from jobs import ray_init


def _write(tmp_path, address: str):
    (tmp_path / "ray_current_cluster").write_text(address)


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture(autouse=True)
def _no_env_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def test_dead_recorded_cluster_gives_a_local_instance_with_a_warning(tmp_path):
    dead = f"127.0.0.1:{_closed_port()}"
    _write(tmp_path, dead)
    assert ray_init.recorded_address(str(tmp_path)) == dead
    with pytest.warns(UserWarning, match=dead.replace(".", r"\.")):
        assert ray_init.resolve_address(None, str(tmp_path)) == "local"


def test_live_recorded_cluster_missing_file_and_explicit_addresses_are_left_to_ray(tmp_path, monkeypatch, recwarn):
    with socket.socket() as live:
        live.bind(("127.0.0.1", 0))
        live.listen()
        _write(tmp_path, f"127.0.0.1:{live.getsockname()[1]}")
        assert ray_init.resolve_address(None, str(tmp_path)) is None  # ray.init connects to it
    assert ray_init.resolve_address(None, str(tmp_path / "nowhere")) is None  # no file: Ray starts one
    _write(tmp_path, f"127.0.0.1:{_closed_port()}")
    assert ray_init.resolve_address("10.0.0.1:6379", str(tmp_path)) == "10.0.0.1:6379"
    monkeypatch.setenv("RAY_ADDRESS", "local")
    assert ray_init.resolve_address(None, str(tmp_path)) is None  # Ray reads RAY_ADDRESS itself
    assert not [w for w in recwarn if "address file" in str(w.message)]
