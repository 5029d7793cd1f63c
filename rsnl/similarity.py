"""Robust similarity and clean-sample selection (docs/method.md states the rule and where it differs from
the original code).

G_i = alpha * z(p)_i + (1 - alpha) * z(g)_i, z-scored within each noisy class, where
p_i = mean_b cos(f_i, t_{b, y~_i}) is the prompt similarity and g_i = -mean_j ||f_i - f_j|| over the
samples j sharing i's noisy label is the feature similarity. A GMM per class on G keeps the samples of
the higher-mean component.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

from rsnl.config import SELECTORS


def alpha_schedule(epoch: int, base: float = 0.2, rate: float = 35.0) -> float:
    """alpha(epoch) = min(1, base * exp(epoch / rate)), epoch 0-indexed: early on G trusts the
    feature structure, later the learned prompts."""
    return min(1.0, base * math.exp(epoch / rate))


def zscore_within(values, labels) -> np.ndarray:
    """Mean 0, std 1 within each label group; a group with std 0 gives 0."""
    v = np.asarray(values, dtype=np.float64)
    labels = np.asarray(labels)
    out = np.zeros_like(v)
    for c in np.unique(labels):
        idx = labels == c
        std = v[idx].std()
        out[idx] = (v[idx] - v[idx].mean()) / std if std > 1e-12 else 0.0
    return out


def prompt_similarity(image_features: torch.Tensor, text_features: torch.Tensor, labels) -> np.ndarray:
    """z(p): p_i = mean over blocks of cos(f_i, t_{b, y~_i}).

    image_features [N, D], text_features [blocks, C, D] (both L2-normalised), labels the noisy ones.
    """
    y = torch.as_tensor(np.asarray(labels), device=text_features.device)
    t = text_features[:, y].float()                                   # [blocks, N, D]
    p = (t * image_features.float().unsqueeze(0)).sum(-1).mean(0)       # [N]
    return zscore_within(p.detach().cpu().numpy(), labels)


def feature_similarity(features: torch.Tensor, labels) -> np.ndarray:
    """z(g): g_i = -mean_{j != i} ||f_i - f_j|| among samples with i's noisy label; higher = more typical."""
    labels = np.asarray(labels)
    f = features.float()
    g = np.zeros(len(labels))
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < 2:
            continue
        d = torch.cdist(f[idx], f[idx])
        g[idx] = -(d.sum(1) / (len(idx) - 1)).cpu().numpy()
    return zscore_within(g, labels)


def robust_similarity(prompt_sim, feature_sim, alpha: float) -> np.ndarray:
    """G = alpha * z(p) + (1 - alpha) * z(g)."""
    return alpha * np.asarray(prompt_sim) + (1.0 - alpha) * np.asarray(feature_sim)


def select_clean(scores, labels, method: str = "gmm", threshold: float = 0.5, ratio: float = 0.5,
                 reg_covar: float = 5e-4, max_iter: int = 100, tol: float = 1e-3, seed: int = 0) -> np.ndarray:
    """Boolean keep-mask over samples, decided within each noisy class.

    gmm:   2-component Gaussian mixture on the scores; keep posterior(higher-mean component) >= threshold.
           Classes with fewer than 4 samples or a single distinct score keep all.
    ratio: keep the top ceil(ratio * n) scores of each class.
    none:  keep all.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if method not in SELECTORS or method == "ot":  # ot selects from class probabilities (rsnl/ot.py)
        raise ValueError(f"selector {method!r}: allowed {', '.join(m for m in SELECTORS if m != 'ot')}")
    _check_finite(scores, "selection scores")
    keep = np.ones(len(scores), dtype=bool)
    if method == "none":
        return keep
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        s = scores[idx]
        if method == "ratio":
            k = int(math.ceil(ratio * len(idx)))
            keep[idx] = False
            keep[idx[np.argsort(-s, kind="stable")[:k]]] = True
        elif len(idx) >= 4 and np.ptp(s) > 1e-12:
            keep[idx] = _gmm_keep(s, threshold, reg_covar, max_iter, tol, seed)
    return keep


def _gmm_keep(s: np.ndarray, threshold: float, reg_covar: float, max_iter: int, tol: float,
              seed: int) -> np.ndarray:
    from sklearn.mixture import GaussianMixture
    gmm = GaussianMixture(n_components=2, reg_covar=reg_covar, max_iter=max_iter, tol=tol, random_state=seed)
    x = s.reshape(-1, 1)
    with sklearn_unchecked():
        gmm.fit(x)
        means = gmm.means_.ravel()
        if abs(means[0] - means[1]) < 1e-9:  # collapsed to one component
            return np.ones(len(s), dtype=bool)
        return gmm.predict_proba(x)[:, int(np.argmax(means))] >= threshold


@contextlib.contextmanager
def sklearn_unchecked():
    """scikit-learn without its per-call input and parameter validation, the same computation: its checks
    cost as much as a 2-component fit on a class's few scores (docs/performance.md). The inputs are
    checked once by the callers here (_check_finite; parameters by rsnl.config)."""
    import sklearn
    with sklearn.config_context(assume_finite=True, skip_parameter_validation=True):
        yield


def _check_finite(values: np.ndarray, what: str) -> None:
    """The one check scikit-learn would make that matters here, as its ValueError."""
    if not np.isfinite(values).all():
        raise ValueError(f"{what} contain NaN or infinity")


def selection_metrics(keep, is_noisy, scores=None) -> dict[str, float]:
    """kept_frac, select_precision (clean share of kept), select_recall (kept share of clean),
    noise_auroc (AUROC of the scores for clean vs noisy; NaN when only one kind is present)."""
    keep = np.asarray(keep, dtype=bool)
    clean = ~np.asarray(is_noisy, dtype=bool)
    kept_clean = float((keep & clean).sum())
    out = {
        "kept_frac": float(keep.mean()) if len(keep) else float("nan"),
        "select_precision": kept_clean / keep.sum() if keep.any() else float("nan"),
        "select_recall": kept_clean / clean.sum() if clean.any() else float("nan"),
        "noise_auroc": float("nan"),
    }
    if scores is not None:
        out["noise_auroc"] = clean_auroc(scores, is_noisy)
    return out


def clean_auroc(scores, is_noisy) -> float:
    """AUROC of `scores` for telling clean samples (positive) from noisy ones; NaN without both kinds."""
    clean = ~np.asarray(is_noisy, dtype=bool)
    if not (clean.any() and (~clean).any()):
        return float("nan")
    from scipy.stats import rankdata
    scores = np.asarray(scores, dtype=np.float64)
    _check_finite(scores, "AUROC scores")
    # Mann-Whitney U over average ranks (ties count half): sklearn's roc_auc_score exactly, without its
    # ~9 ms of per-call overhead, which was a tenth of a robust run (two calls per epoch)
    n_clean, n_noisy = int(clean.sum()), int((~clean).sum())
    u = rankdata(scores)[clean].sum() - n_clean * (n_clean + 1) / 2
    return float(u / (n_clean * n_noisy))


def class_cosine(text_features: torch.Tensor) -> float:
    """Mean cosine between two different classes' features of the same block (text_features [blocks, C, D],
    L2-normalised), averaged over blocks: 1 when every class has one feature and the prompts can no longer
    tell the classes apart (how CoOp fails on some seeds under heavy noise on the test-bed)."""
    t = text_features.float()
    C = t.shape[1]
    gram = torch.einsum("bcd,bed->ce", t, t) / t.shape[0]  # [C, C] block-averaged cosines
    return float((gram.sum() - gram.diagonal().sum()) / (C * (C - 1)))


def block_cosine(text_features: torch.Tensor) -> float:
    """Mean cosine between two different blocks' features of the same class (text_features [blocks, C, D],
    L2-normalised): 1 when the blocks have collapsed to one prompt; NaN for a single block."""
    m = text_features.shape[0]
    if m < 2:
        return float("nan")
    t = text_features.float()
    gram = torch.einsum("bcd,ecd->be", t, t) / t.shape[1]  # [m, m] class-averaged cosines
    return float((gram.sum() - gram.diagonal().sum()) / (m * (m - 1)))
