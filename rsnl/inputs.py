"""A trial's inputs: the checks that need no model, the model and the study-shareable image features,
and the trial's own noisy few-shot sample as feature tensors.

The Tune layer calls `preflight` in the driver (before Ray starts) and `load_inputs` in one feature task
per study; `trial_data` runs in every trial.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from rsnl.config import TrialConfig
from rsnl.data import check_shots, load_dataset
from rsnl.device import precision_name, resolve_device
from rsnl.errors import ConfigError
from rsnl.features import FeatureBank, build_feature_bank
from rsnl.files import default_cache_dir, probe_writable
from rsnl.manifest import manifest_text, read_manifest
from rsnl.models import LoadedClip, check_backbone, check_weights, load_clip
from rsnl.noise import NoisySample, sample_noisy_fewshot


def preflight(cfg: TrialConfig):
    """Every check that needs no model: backbone and weights (their names, and that they are here or can be
    downloaded), data layout, shots, the noise manifest. Returns the dataset."""
    check_backbone(cfg.backbone, cfg.pretrained)
    check_cache_dir(cfg)
    dataset = load_dataset(cfg.dataset, cfg.data_root or os.environ.get("RSNL_DATA"), cfg.download)
    check_shots(dataset.train.labels, dataset.classnames, cfg.shots, dataset.train.name)
    check_shots(dataset.val.labels, dataset.classnames, cfg.val_shots or cfg.shots, dataset.val.name)
    check_weights(cfg.backbone, cfg.pretrained)  # after the data: it may ask the network
    check_noise_file(cfg, dataset)
    return dataset


def check_noise_file(cfg: TrialConfig, dataset) -> None:
    """The trial's noise manifest, if any, fits the dataset and the trial (before any model starts)."""
    if cfg.noise_file is not None:
        replay(cfg, {"train": dataset.train.ids, "val": dataset.val.ids},
               {"train": dataset.train.labels, "val": dataset.val.labels}, dataset.classnames)


def check_cache_dir(cfg: TrialConfig) -> None:
    """The cache folder (features, stand-in, downloads) can be created and written: said here, naming the
    key that set it, rather than as a traceback from the feature cache or the stand-in's build."""
    if cfg.cache_dir:
        key, hint = "cache_dir", "set cache_dir to a writable folder"
    elif os.environ.get("RSNL_CACHE"):
        key, hint = "$RSNL_CACHE", "set $RSNL_CACHE (or cache_dir) to a writable folder"
    else:
        key, hint = "cache folder", "set cache_dir or $RSNL_CACHE to a writable folder"
    folder = cfg.cache_dir or default_cache_dir()
    try:
        probe_writable(folder)
    except OSError as err:
        raise ConfigError(f"{key}: {folder} cannot be created or written ({type(err).__name__}: "
                          f"{err.strerror or err}); {hint}") from None


def prepare_weights(cfg: TrialConfig) -> None:
    """Build rsnl's stand-in VLM now if the trial uses it and it is not cached yet (progress shown here,
    not later inside a worker)."""
    from rsnl.pretrain import ensure_standin, is_standin
    if is_standin(cfg.backbone, cfg.pretrained):
        ensure_standin(cfg.backbone, cfg.pretrained, cfg.cache_dir)


def load_inputs(cfg: TrialConfig, stats: dict | None = None) -> tuple[LoadedClip, FeatureBank]:
    """The model and the study-shareable image features of the trial's backbone and dataset."""
    dataset = preflight(cfg)
    device = resolve_device(cfg.device)
    clip = load_clip(cfg.backbone, cfg.pretrained, device, cfg.cache_dir)
    bank = build_feature_bank(dataset, clip.model, clip.preprocess, clip.identity, aug_views=cfg.aug_views,
                              cache_dir=cfg.cache_dir, device=device,
                              precision=precision_name(cfg.precision, device), batch_size=cfg.feature_batch_size,
                              num_workers=cfg.num_workers, stats=stats, tokenizer=clip.tokenizer,
                              aug_scale=cfg.aug_scale)
    return clip, bank


@dataclass
class TrialData:
    """The trial's few-shot sample with its noise, as feature tensors."""
    train: torch.Tensor               # [N, D] un-augmented view
    train_views: torch.Tensor | None  # [V, N, D]
    sample: NoisySample
    val: torch.Tensor
    val_sample: NoisySample
    test: torch.Tensor
    test_labels: np.ndarray
    zeroshot_text: torch.Tensor | None = None  # [C, D] the plain prompt's text features
    manifest: str | None = None  # the draw as a noise manifest (rsnl/manifest.py); None without image ids


NOISE_RATE_TOLERANCE = 0.05  # a replayed manifest's noisy share must match the trial's noise_rate this closely


def draw_samples(cfg: TrialConfig, bank: FeatureBank) -> tuple[NoisySample, NoisySample]:
    """The train and val samples: drawn by the seed, or read from cfg.noise_file."""
    if cfg.noise_file is None:
        C = len(bank.classnames)
        s = sample_noisy_fewshot(bank.train_labels, C, cfg.shots, cfg.noise_rate, cfg.noise_type, cfg.seed)
        v = sample_noisy_fewshot(bank.val_labels, C, cfg.val_shots or cfg.shots, cfg.noise_rate, cfg.noise_type,
                                 cfg.seed)
        return s, v
    if bank.train_ids is None or bank.val_ids is None:
        raise ConfigError("noise_file: this feature bank has no image ids to match a manifest against")
    drawn = replay(cfg, {"train": bank.train_ids, "val": bank.val_ids},
                   {"train": bank.train_labels, "val": bank.val_labels}, bank.classnames)
    return drawn["train"], drawn["val"]


def replay(cfg: TrialConfig, ids: dict, labels: dict, classnames) -> dict[str, NoisySample]:
    """The samples cfg.noise_file names (rsnl.manifest.read_manifest), which must be the trial's draw in
    all it records: its noise rate, and its shots. A draw keeps `shots` per class by the label it trains
    with (ptnl) or by the true label (symmetric, pairflip, which relabel afterwards); the manifest's shots
    are the most of any class, so that one from elsewhere may lack a class."""
    drawn = read_manifest(cfg.noise_file, ids, labels, classnames)
    share = drawn["train"].noise_fraction
    if abs(share - cfg.noise_rate) > NOISE_RATE_TOLERANCE:
        raise ConfigError(f"noise_file: {cfg.noise_file} has {share:.1%} noisy training labels but the trial says "
                          f"noise_rate {cfg.noise_rate:g}; set noise_rate to the manifest's rate (reports group by it)")
    for split, key, shots in (("train", "shots", cfg.shots), ("val", "val_shots", cfg.val_shots or cfg.shots)):
        kept = drawn[split].labels if cfg.noise_type == "ptnl" else drawn[split].true_labels
        most = int(np.bincount(kept, minlength=len(classnames)).max())
        if most != shots:
            raise ConfigError(f"noise_file: {cfg.noise_file} has {most} {split} images per class but the trial says "
                              f"{key} {shots}; set {key} to the manifest's (reports group by it)")
    return drawn


def trial_data(cfg: TrialConfig, bank: FeatureBank) -> TrialData:
    s, v = draw_samples(cfg, bank)
    manifest = None
    if bank.train_ids is not None and bank.val_ids is not None:
        manifest = manifest_text({"train": s, "val": v}, {"train": bank.train_ids, "val": bank.val_ids},
                                 bank.classnames)
    idx = torch.as_tensor(s.indices)
    # A bank may hold more views than this trial uses; view v is the same whatever their number.
    views = bank.train_views[: cfg.aug_views, idx] if bank.train_views is not None and cfg.aug_views > 0 else None
    if views is not None and views.shape[0] < cfg.aug_views:
        raise ValueError(f"feature bank has {views.shape[0]} augmented views, the trial asks for {cfg.aug_views}")
    return TrialData(train=bank.train[idx], train_views=views, sample=s, val=bank.val[torch.as_tensor(v.indices)],
                     val_sample=v, test=bank.test, test_labels=np.asarray(bank.test_labels),
                     zeroshot_text=bank.zeroshot_text, manifest=manifest)
