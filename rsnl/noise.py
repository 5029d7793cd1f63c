"""Few-shot sampling with injected label noise (the noise types are defined in docs/method.md).

Every sampler is a pure function of (labels, shots, rate, type, seed): the same seed always gives the
same images and the same wrong labels, so seeds are comparable across methods and studies.
The true labels travel with the sample for metrics only; training sees `labels`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from rsnl.config import NOISE_TYPES


@dataclass(frozen=True)
class NoisySample:
    indices: np.ndarray      # positions in the split, int64 [N]
    labels: np.ndarray       # noisy labels seen by training, int64 [N]
    true_labels: np.ndarray  # int64 [N], for metrics only
    is_noisy: np.ndarray     # bool [N], labels != true_labels

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def noise_fraction(self) -> float:
        return float(self.is_noisy.mean()) if len(self) else 0.0


def noisy_count(rate: float, n: int) -> int:
    """round(rate * n), halves rounded up (Python's round() would send 0.5 to 0)."""
    return int(math.floor(rate * n + 0.5))


def sample_noisy_fewshot(true_labels, num_classes: int, shots: int, noise_rate: float,
                         noise_type: str = "ptnl", seed: int = 1) -> NoisySample:
    """Draw `shots` samples per class from a split and corrupt labels as `noise_type` says.

    ptnl:      in each class, noisy_count(rate, shots) of its slots hold images of other classes
               (uniform over those images, no image used twice) labelled as that class; every class
               keeps exactly `shots` samples and a noisy label is never the true one.
    symmetric: a global noisy_count(rate, N) of the few-shot set is relabelled uniformly to another class.
    pairflip:  the same global fraction is relabelled y -> (y + 1) mod C.
    """
    y = np.asarray(true_labels, dtype=np.int64)
    if noise_type not in NOISE_TYPES:
        raise ValueError(f"noise_type {noise_type!r} is not one of {', '.join(NOISE_TYPES)}")
    if not 0.0 <= noise_rate <= 1.0:
        raise ValueError(f"noise_rate {noise_rate} is outside [0, 1]")
    if shots < 1:
        raise ValueError(f"shots {shots} must be >= 1")
    if noise_rate > 0 and num_classes < 2:
        raise ValueError("label noise needs at least 2 classes")
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(y == c) for c in range(num_classes)]

    n_flip = noisy_count(noise_rate, shots) if noise_type == "ptnl" else 0
    n_clean = shots - n_flip
    for c, members in enumerate(by_class):
        if len(members) < n_clean:
            raise ValueError(f"class {c} has {len(members)} images, {n_clean} clean shots are needed")

    # Clean slots first, so that a borrowed (noisy) image is never also a clean sample.
    chosen = [rng.choice(members, size=n_clean, replace=False) for members in by_class]
    used = np.zeros(len(y), dtype=bool)
    for idx in chosen:
        used[idx] = True

    indices, labels = [], []
    for c in range(num_classes):
        borrowed = np.empty(0, dtype=np.int64)
        if n_flip:
            pool = np.flatnonzero(~used & (y != c))
            if len(pool) < n_flip:
                raise ValueError(f"not enough images of other classes to fill {n_flip} noisy slots of class {c}")
            borrowed = rng.choice(pool, size=n_flip, replace=False)
            used[borrowed] = True
        slots = np.concatenate([chosen[c], borrowed])
        indices.append(slots)
        labels.append(np.full(len(slots), c, dtype=np.int64))
    indices = np.concatenate(indices).astype(np.int64)
    labels = np.concatenate(labels)

    if noise_type in ("symmetric", "pairflip"):
        flip = rng.choice(len(indices), size=noisy_count(noise_rate, len(indices)), replace=False)
        if noise_type == "pairflip":
            labels[flip] = (labels[flip] + 1) % num_classes
        else:
            # A uniform draw from the C - 1 other classes: shift by 1..C-1.
            labels[flip] = (labels[flip] + rng.integers(1, num_classes, size=len(flip))) % num_classes

    order = rng.permutation(len(indices))
    indices, labels = indices[order], labels[order]
    true = y[indices]
    return NoisySample(indices=indices, labels=labels, true_labels=true, is_noisy=labels != true)
