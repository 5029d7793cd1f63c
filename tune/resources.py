"""Starting or joining Ray, and checking that what a study asks for can ever be scheduled.

Tune leaves a trial PENDING forever when no node can hold it; a researcher who asked for GPUs on a
CPU-only machine should hear that in one line at once instead.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from rsnl.errors import ConfigError

# The autoscaler's copy of cluster.yaml on a head node started by `ray up`.
BOOTSTRAP_CONFIG = Path.home() / "ray_bootstrap_config.yaml"


def local_gpu_count() -> int:
    """GPUs this machine would give a local Ray (no Ray start needed to tell)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return 0
    try:
        import torch
        return torch.cuda.device_count()
    except Exception:
        return 0


def check_local_gpus(gpu_per_trial: float) -> None:
    """Before Ray starts, for a study on this machine."""
    if gpu_per_trial > 0 and local_gpu_count() == 0:
        raise ConfigError(f"--gpus-per-trial: {gpu_per_trial:g} GPU per trial was asked for, but this machine has "
                          f"no CUDA GPU; use --gpus-per-trial 0 to run on CPUs, or --address to join a GPU cluster")


def autoscaler_gpu_types(path: Path = BOOTSTRAP_CONFIG) -> list[str]:
    """Node types of the cluster launcher's config that declare GPUs and may be started."""
    if not path.is_file():
        return []
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return []
    return [name for name, t in (cfg.get("available_node_types") or {}).items()
            if (t.get("resources") or {}).get("GPU", 0) > 0 and t.get("max_workers", 0) > 0]


def check_cluster_gpus(gpu_per_trial: float) -> None:
    """After joining a cluster: GPUs present now, or node types the autoscaler can add."""
    import ray
    if gpu_per_trial <= 0:
        return
    have = ray.cluster_resources().get("GPU", 0)
    if have == 0 and not autoscaler_gpu_types():
        raise ConfigError(f"--gpus-per-trial: {gpu_per_trial:g} GPU per trial was asked for, but the Ray cluster has "
                          f"no GPU and no autoscaling GPU node type; use --gpus-per-trial 0 or add GPU workers")
    if 0 < have < gpu_per_trial:
        raise ConfigError(f"--gpus-per-trial: {gpu_per_trial:g} per trial but the largest request the cluster can "
                          f"hold is {have:g} GPU")


def init_ray(address: str | None, **kwargs):
    """Join `address`, or start a local Ray without its dashboard (no HTTP port for a local study).

    Ray 2.60's own gRPC servers (GCS, raylet, object manager) listen on all interfaces whatever the
    node IP (Ray resolves 127.0.0.1 to the machine's address); keep them behind a firewall, as
    cluster.yaml's security group does.
    """
    import ray
    if ray.is_initialized():
        return None
    if address:
        return ray.init(address=address, **kwargs)
    return ray.init(include_dashboard=False, **kwargs)
