"""Starting or joining Ray so that a local run never listens beyond loopback."""

from __future__ import annotations

import os
from typing import Any

LOOPBACK_ENV = {
    # Ray 2.60 binds the external interface unless this is 0; local runs stay on 127.0.0.1.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    # No usage reporting, no hub look-ups from a machine that may be offline.
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
}


def apply_local_defaults() -> None:
    """Set the loopback/offline environment unless the user chose otherwise."""
    for key, value in LOOPBACK_ENV.items():
        os.environ.setdefault(key, value)


def init_ray(ray_config: dict[str, Any] | None = None, address: str | None = None) -> None:
    """Join the cluster named by address / RAY_ADDRESS / config, else start an embedded one."""
    import ray

    if ray.is_initialized():
        return
    apply_local_defaults()
    ray_config = ray_config or {}
    address = address or os.environ.get("RAY_ADDRESS") or ray_config.get("address")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    kwargs: dict[str, Any] = {
        "address": "local",
        "include_dashboard": bool(ray_config.get("include_dashboard", False)),
        "log_to_driver": True,
        "configure_logging": True,
        "logging_level": "WARNING",
    }
    if ray_config.get("num_cpus"):
        kwargs["num_cpus"] = ray_config["num_cpus"]
    if ray_config.get("object_store_memory"):
        kwargs["object_store_memory"] = int(ray_config["object_store_memory"])
    _keep_local_cluster_on_loopback()
    ray.init(**kwargs)


def _keep_local_cluster_on_loopback() -> None:
    """Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, when it is first imported; a program
    that imported ray before rdcd would still bind the external interface, so re-apply it."""
    if os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0":
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
