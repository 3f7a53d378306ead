"""``ray.init`` for the drivers, without hanging on a dead cluster's address file.

With no address (and no ``RAY_ADDRESS``), ``ray.init()`` connects to the cluster recorded in
Ray's ``ray_current_cluster`` file (the last ``ray start`` on the machine). When that cluster is
gone without ``ray stop`` (its head killed, the machine's processes stopped), the file stays and
``ray.init()`` retries the dead GCS for minutes, printing only connection warnings. A driver here
checks the recorded address first and starts a local instance when nothing listens there.
"""

from __future__ import annotations

import os
import socket
import warnings


def recorded_address(temp_dir: str | None = None) -> str | None:
    """The address in Ray's ``ray_current_cluster`` file (None: no file or an unknown Ray layout)."""
    try:
        from ray._common.utils import get_ray_address_file
    except ImportError:  # Ray moved it: fall back to Ray's own behaviour
        return None
    path = get_ray_address_file(temp_dir)
    try:
        with open(path) as f:
            return f.read().strip() or None
    except OSError:
        return None


def _listening(address: str, timeout: float = 2.0) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def resolve_address(address: str | None, temp_dir: str | None = None) -> str | None:
    """The address to pass to ``ray.init``: ``address`` unchanged, except that with no address and
    no ``RAY_ADDRESS`` a recorded cluster that does not answer gives ``"local"`` (with a warning
    naming it) instead of a long hang."""
    if address is not None or os.environ.get("RAY_ADDRESS"):
        return address
    rec = recorded_address(temp_dir)
    if rec is None or _listening(rec):
        return None
    warnings.warn(f"Ray's address file names {rec}, where no cluster answers (stopped without `ray stop`?); "
                  "starting a local Ray instance instead. Set RAY_ADDRESS or --address to use a cluster.",
                  stacklevel=2)
    return "local"


def init_ray(address: str | None = None, **kwargs):
    """``ray.init(address=resolve_address(address), **kwargs)`` unless Ray is already initialised.

    Returns:
        the ``ray`` module.
    """
    import ray

    if not ray.is_initialized():
        ray.init(address=resolve_address(address), **kwargs)
    return ray
