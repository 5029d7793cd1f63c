"""Frozen image features, computed once and cached on disk by content (docs/performance.md).

The image tower never gets gradients, so its outputs for the test view of every image and for a fixed
set of augmented training views are computed once and reused by every epoch of every trial. A cache
entry is keyed by the exact weights (their file's digest), the images (the digest of their bytes), the
split, the transform and the view; it is written atomically under a lock, with a checksum, so that racing
or killed processes never leave a half-written entry that someone reads, and the lock and any temp file
of a killed writer are removed.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision import transforms as T

from rsnl.data import Dataset, ImageSet
from rsnl.errors import DataError
from rsnl.files import atomic_write, default_cache_dir, locked, remove_stale_temps

FORMAT = 1  # bump when the stored content changes meaning


@dataclass
class FeatureBank:
    """Everything a trial reads from the image side: L2-normalised features and labels per split."""
    identity: str
    dataset: str
    classnames: list[str]
    train: torch.Tensor             # [N_train, D] test view (used for selection and similarity)
    train_views: torch.Tensor | None  # [V, N_train, D] augmented views (None when aug_views = 0)
    val: torch.Tensor
    test: torch.Tensor
    train_labels: np.ndarray
    val_labels: np.ndarray
    test_labels: np.ndarray
    zeroshot_text: torch.Tensor | None = None  # [C, D] the plain prompt's text features (rsnl.zeroshot)
    train_ids: list | None = None  # image identifiers (ImageSet.ids): what noise manifests name
    val_ids: list | None = None

    @property
    def dim(self) -> int:
        return self.train.shape[1]

    def nbytes(self) -> int:
        ts = [self.train, self.val, self.test] + ([self.train_views] if self.train_views is not None else [])
        return sum(t.numel() * t.element_size() for t in ts)


def train_transform(preprocess, scale: float = 0.08) -> T.Compose:
    """CoOp's training augmentation (random resized crop of at least `scale` of the area, + flip) at the
    model's input size and stats."""
    size, norm, interp = 224, None, T.InterpolationMode.BICUBIC
    for t in getattr(preprocess, "transforms", []):
        if isinstance(t, (T.CenterCrop,)):
            s = t.size
            size = s[0] if isinstance(s, (tuple, list)) else s
        elif isinstance(t, T.Normalize):
            norm = t
        elif isinstance(t, T.Resize):
            interp = t.interpolation
    if norm is None:
        raise ValueError("the model's preprocess has no Normalize step; cannot build the training transform")
    return T.Compose([
        T.RandomResizedCrop(size, scale=(scale, 1.0), interpolation=interp),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(norm.mean, norm.std),
    ])


class _Views(torch.utils.data.Dataset):
    """One view of every image of a set; augmented views are seeded per (view, image) so that the
    cached content does not depend on batch size, workers or process."""

    def __init__(self, images: ImageSet, transform, view: int):
        self.images, self.transform, self.view = images, transform, view

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        image = self.images.load(i)
        if self.view == 0:
            return self.transform(image)
        with torch.random.fork_rng(devices=[]):
            # CPU generator only: the transforms draw from it, and torch.manual_seed would also queue a
            # seed for every accelerator (formatting a stack trace each time, ~2 ms per image on CPU)
            # whose state fork_rng(devices=[]) does not restore.
            torch.default_generator.manual_seed(1_000_003 * self.view + i)
            return self.transform(image)


@torch.no_grad()
def encode_images(model, images: ImageSet, transform, view: int = 0, batch_size: int = 64,
                  device="cpu", num_workers: int = 0, precision: str = "fp32", desc: str = "") -> torch.Tensor:
    """L2-normalised image features [N, D] (float32, on the CPU) of one view of an image set."""
    from tqdm.auto import tqdm
    loader = torch.utils.data.DataLoader(_Views(images, transform, view), batch_size=batch_size,
                                         num_workers=num_workers, shuffle=False)
    device = torch.device(device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    out = []
    try:
        for batch in tqdm(loader, desc=desc or images.name, unit="batch", leave=False, mininterval=2.0):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                f = model.encode_image(batch.to(device, non_blocking=True))
            out.append(F.normalize(f.float(), dim=-1).cpu())
    except DataError as e:
        # A DataLoader worker re-raises with its traceback in the message; keep the one line that names the file.
        lines = [x for x in str(e).split("DataError: ") if x.strip()]
        raise DataError(lines[-1] if lines else str(e)) from None
    return torch.cat(out) if out else torch.empty(0)


def cache_key(identity: str, images: ImageSet, transform, view: int, precision: str) -> str:
    spec = {"format": FORMAT, "weights": identity, "images": images.fingerprint(), "split": images.name,
            "transform": re.sub(r" at 0x[0-9a-f]+", "", repr(transform)), "view": view, "precision": precision}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _checksum(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def _read_entry(path: Path) -> torch.Tensor | None:
    """The cached tensor, or None when absent or damaged (truncated, corrupted, wrong checksum)."""
    if not path.is_file():
        return None
    try:
        entry = torch.load(path, map_location="cpu", weights_only=True)
        feats = entry["features"]
        if entry.get("sha256") == _checksum(feats):
            return feats
    except Exception:  # any unreadable file is a cache miss, rebuilt below
        pass
    return None


def _write_entry(path: Path, feats: torch.Tensor, meta: dict) -> None:
    atomic_write(path, lambda f: torch.save({"features": feats, "sha256": _checksum(feats), "meta": meta}, f))


def cached_features(model, identity: str, images: ImageSet, transform, view: int, cache_dir,
                    precision: str = "fp32", stats: dict | None = None, **encode_kw) -> torch.Tensor:
    """Features of one view of one image set, computed at most once per cache entry."""
    key = cache_key(identity, images, transform, view, precision)
    path = Path(cache_dir) / key[:2] / f"{key}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    feats = _read_entry(path)
    if feats is None:
        with locked(path):
            feats = _read_entry(path)  # another process may have finished it while we waited
            if feats is None:
                remove_stale_temps(path)  # a killed writer's; no live writer without the lock
                desc = f"{images.name} view {view}"
                feats = encode_images(model, images, transform, view=view, precision=precision, desc=desc,
                                      **encode_kw)
                _write_entry(path, feats, {"identity": identity, "split": images.name, "view": view})
                if stats is not None:
                    stats["computed"] = stats.get("computed", 0) + 1
                return feats
    if stats is not None:
        stats["hits"] = stats.get("hits", 0) + 1
    return feats


def build_feature_bank(dataset: Dataset, model, preprocess, identity: str, aug_views: int = 0,
                       cache_dir=None, device="cpu", precision: str = "fp32", batch_size: int = 64,
                       num_workers: int = 0, stats: dict | None = None, tokenizer=None,
                       aug_scale: float = 0.08) -> FeatureBank:
    """Test-view features of train/val/test and `aug_views` augmented views of train; with a
    tokenizer also the zero-shot prompt's text features (a few prompts: not worth a cache entry)."""
    from rsnl.zeroshot import zeroshot_text
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    kw = dict(device=device, batch_size=batch_size, num_workers=num_workers, stats=stats)
    model = model.to(device)
    get = lambda images, tf, view: cached_features(model, identity, images, tf, view, cache_dir, precision, **kw)

    aug = train_transform(preprocess, aug_scale)
    views = [get(dataset.train, aug, v) for v in range(1, aug_views + 1)]
    return FeatureBank(
        identity=identity, dataset=dataset.name, classnames=list(dataset.classnames),
        train=get(dataset.train, preprocess, 0),
        train_views=torch.stack(views) if views else None,
        val=get(dataset.val, preprocess, 0),
        test=get(dataset.test, preprocess, 0),
        train_labels=np.asarray(dataset.train.labels), val_labels=np.asarray(dataset.val.labels),
        test_labels=np.asarray(dataset.test.labels),
        zeroshot_text=None if tokenizer is None else zeroshot_text(model, tokenizer, dataset.classnames, device),
        train_ids=list(dataset.train.ids), val_ids=list(dataset.val.ids),
    )
