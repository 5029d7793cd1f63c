"""The Tune trainable: one trial = one rsnl Trainer per group member, stepped an epoch at a time.

Members that share the backbone and the prompts' shape train side by side (rsnl/members.py: one
text-tower pass per step for all of them), unless the trial says `batch_members: false`. Each epoch
reports the group mean of every metric (the objective), each member's own metrics under
`group/<member>/...`, and a checkpoint holding every member's state, so that a retried or resumed
trial continues exactly where it stopped. Image features arrive ready-made (FeatureBank via the
object store); a trial never runs the image tower.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from rsnl.device import resolve_device
from rsnl.files import atomic_write
from rsnl.manifest import write_manifest
from rsnl.members import memory_budget, plan_groups, side_by_side_groups, splitting_keys
from rsnl.members import train_epoch as members_epoch
from rsnl.models import load_clip
from rsnl.study import TRIAL_FILE, manifest_name, trial_record
from rsnl.trainer import build_trainer

STATE_FILE = "state.pt"

_clips: dict[tuple, object] = {}  # per worker process: reused by trials of a reused actor


def bank_key(cfg) -> tuple:
    """Trials whose configs agree on this share one FeatureBank."""
    return (cfg.dataset, cfg.data_root or os.environ.get("RSNL_DATA"), cfg.backbone, cfg.pretrained,
            cfg.aug_views, cfg.aug_scale, cfg.precision, cfg.device)


def _clip(cfg, device):
    key = (cfg.backbone, cfg.pretrained, str(device), cfg.cache_dir)
    if key not in _clips:
        _clips[key] = load_clip(cfg.backbone, cfg.pretrained, device, cfg.cache_dir)
    return _clips[key]


def aggregate(members: dict[str, dict]) -> dict:
    """Mean over members of every numeric metric (NaN-aware), plus the members themselves."""
    first = next(iter(members.values()))
    out = {}
    for k, v in first.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            vals = [m[k] for m in members.values() if not (isinstance(m[k], float) and math.isnan(m[k]))]
            out[k] = float(np.mean(vals)) if vals else float("nan")
    out["epoch"] = int(first["epoch"])
    if len(members) > 1:
        out["group"] = members
    return out


def train_trial(config: dict, study=None, banks=None) -> None:
    """Function trainable; `study` and `banks` come through tune.with_parameters."""
    import ray
    from ray import tune

    members = study.trial_configs(config)
    device = resolve_device(members[0][1].device)
    trainers = {}
    for name, cfg in members:
        bank = banks[bank_key(cfg)]
        if not hasattr(bank, "train"):  # an ObjectRef from the feature task
            bank = banks[bank_key(cfg)] = ray.get(bank)
        clip = _clip(cfg, device)
        if clip.identity != bank.identity:
            raise RuntimeError(f"feature bank of {bank.identity} does not match the trial's model {clip.identity}")
        trainers[name] = build_trainer(cfg, clip, bank)

    # which members train side by side, in chunks that fit the trial's share of its device
    context = tune.get_context()
    plan = plan_groups(trainers, memory_budget(device, trial_share(study, device)))
    for note in plan.notes:  # said once per trial, in the worker's log and in the trial's record
        logging.getLogger("rsnl.members").warning(f"trial {context.get_trial_id()}: {note}")

    # every member's resolved config and draw beside its results (the same content again on a retry or
    # resume): the analysis reads these files and never rebuilds a config with later code
    folder = context.get_trial_dir()
    if folder:
        record = trial_record(context.get_trial_id(), config, members, side_by_side=plan.groups, notes=plan.notes)
        atomic_write(Path(folder) / TRIAL_FILE, json.dumps(record, indent=1, sort_keys=True))
    for name, trainer in trainers.items():
        if trainer.data.manifest is not None and folder:
            write_manifest(folder, trainer.data.manifest, manifest_name(name, len(trainers)))

    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
        for name, trainer in trainers.items():
            trainer.load_state_dict(state["members"][name])

    node = ray.get_runtime_context().get_node_id()[:12]  # which node ran it (several may share one IP)
    while not all(t.done for t in trainers.values()):
        results = {name: {**m, "noise_manifest_sha256": trainers[name].manifest_sha256}
                   for name, m in members_epoch(trainers, plan.groups).items()}
        metrics = {**aggregate(results), "node_id": node}
        if len(results) == 1:
            metrics["noise_manifest_sha256"] = next(iter(results.values()))["noise_manifest_sha256"]
        with tempfile.TemporaryDirectory() as d:
            torch.save({"members": {n: t.state_dict() for n, t in trainers.items()}}, Path(d) / STATE_FILE)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))


def trial_share(study, device) -> float:
    """The trial's share of its device: its GPU fraction, or its CPUs out of the node's."""
    if device.type == "cuda":
        return min(study.gpu, 1.0) or 1.0
    return min(study.cpu / (os.cpu_count() or 1), 1.0)


def log_side_by_side(study) -> None:
    """The driver's one line when a trial's members cannot all train side by side (they differ in the
    backbone or the prompts' shape): they fall back to several groups, each trained side by side."""
    for overrides in study.corner_overrides():
        configs = study.trial_configs(overrides)
        keys = splitting_keys(configs)
        if keys:
            groups = side_by_side_groups(configs)
            logging.getLogger("rsnl.members").warning(
                f"members differ in {', '.join(keys)}: a trial trains them in {len(groups)} side-by-side groups "
                f"(one text-tower pass per group and step) instead of one")
            return


def compute_bank(cfg_dict: dict):
    """Build (or read from the disk cache) one FeatureBank; runs as a Ray task, once per study."""
    from rsnl.config import TrialConfig
    from rsnl.inputs import load_inputs
    stats = {}
    _, bank = load_inputs(TrialConfig.from_dict(cfg_dict), stats=stats)
    return bank, stats
