"""Starting or joining Ray, and checking that what a study asks for can ever be scheduled.

Tune leaves a trial PENDING forever when no node can hold it; a researcher who asked for GPUs on a
CPU-only machine should hear that in one line at once instead.
"""

from __future__ import annotations

import logging
import os
import sys
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


RAY_LOGGERS = ("ray", "ray.data", "ray.tune", "ray.train")


class RayLog:
    """Ray's and Tune's Python logs go to a file, not the console: started before Ray (its start-up
    warnings too), moved into the experiment folder once that exists."""

    def __init__(self, path):
        import ray  # noqa: F401  (importing Ray sets up its loggers; reroute them after that)
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handler = self._handler()
        for name in RAY_LOGGERS:  # their console handlers; the records reach "ray", and the file
            logger = logging.getLogger(name)
            for h in list(logger.handlers):
                if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) in (sys.stderr, sys.stdout):
                    logger.removeHandler(h)
        self.attach()

    def attach(self) -> None:
        """(Again) after ray.init, which clears the "ray" logger's handlers. Ray's own start-up lines come
        from ray._private while "ray" has none, so that one gets the file too; rsnl's driver lines
        ("rsnl" loggers) go there as well."""
        for name in ("ray", "ray._private", "rsnl"):
            logger = logging.getLogger(name)
            if self.handler not in logger.handlers:
                logger.addHandler(self.handler)
            if name != "ray":
                logger.propagate = False
        logging.getLogger("rsnl").setLevel(logging.INFO)

    def _handler(self) -> logging.Handler:
        h = logging.FileHandler(self.path, mode="a", encoding="utf-8")
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        return h

    def move_to(self, path) -> None:
        path = Path(path)
        if path == self.path:
            return
        self._detach()
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab") as out:
            out.write(self.path.read_bytes())
        self.path.unlink()
        self.path = path
        self.handler = self._handler()
        self.attach()

    def close(self) -> None:
        self._detach()

    def _detach(self) -> None:
        for name in ("ray", "ray._private", "rsnl"):
            logging.getLogger(name).removeHandler(self.handler)
        self.handler.close()


def init_ray(address: str | None, **kwargs):
    """Join `address`, or start a local Ray without its dashboard (no HTTP port for a local study).

    Ray 2.60's own gRPC servers (GCS, raylet, object manager) listen on all interfaces whatever the
    node IP (Ray resolves 127.0.0.1 to the machine's address); keep them behind a firewall, as
    cluster.yaml's security group does.
    """
    import ray
    if ray.is_initialized():
        return None
    kwargs.setdefault("log_to_driver", False)  # trials' output stays in Ray's session logs and error.txt
    if address:
        return ray.init(address=address, **kwargs)
    return ray.init(include_dashboard=False, **kwargs)
