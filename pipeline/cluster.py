"""Joining a Ray cluster, or starting a local one, without tripping over a dead one.

A bare `ray.init()` joins RAY_ADDRESS, else the cluster whose address the last `ray start` wrote
to `<ray temp dir>/ray_current_cluster`. A `ray start` that was killed (rather than stopped with
`ray stop`) leaves that file behind, and `ray.init()` then spends a minute failing to reach its
GCS before raising. `init_ray` checks that address first and starts a local cluster instead,
saying so; RAY_ADDRESS (what `ray job submit` sets for its driver) is always obeyed.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def recorded_address() -> str | None:
    """The address the last `ray start` on this machine recorded, if any."""
    from ray._common.utils import get_ray_address_file

    path = get_ray_address_file(None)
    try:
        with open(path) as fh:
            return fh.read().strip() or None
    except OSError:
        return None


def reachable(address: str, timeout_s: float = 2.0) -> bool:
    """Whether something accepts TCP connections at host:port."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def init_ray(**kwargs) -> None:
    """`ray.init(**kwargs)` joining RAY_ADDRESS or a live `ray start` cluster, else starting a
    local cluster; a no-op when Ray is already initialised."""
    import ray

    if ray.is_initialized():
        return
    if not os.environ.get("RAY_ADDRESS") and "address" not in kwargs:
        recorded = recorded_address()
        if recorded is not None and not reachable(recorded):
            log.warning("ignoring %s from a Ray cluster that is no longer running; starting a local "
                        "cluster", recorded)
            print(f"[ray] the cluster recorded at {recorded} is not running; starting a local one",
                  flush=True)
            kwargs["address"] = "local"
    ray.init(**kwargs)
