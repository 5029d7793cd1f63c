"""rsnl.similarity: alpha schedule, z-scores, prompt / feature / robust similarity, selection, metrics."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rsnl.similarity import (alpha_schedule, feature_similarity, prompt_similarity, robust_similarity,
                             select_clean, selection_metrics, zscore_within)

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def clustered(seed, C=5, n=16, D=32, spread=0.8, flip=0.3):
    """C unit-norm clusters of n points each; round(flip * n) points per true class get another
    (uniform) noisy label. Returns (L2-normalised features, true labels, noisy labels)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(C, D))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    y = np.repeat(np.arange(C), n)
    f = centers[y] + spread * rng.normal(size=(C * n, D)) / np.sqrt(D)
    f = F.normalize(torch.tensor(f, dtype=torch.float32), dim=-1)
    noisy = y.copy()
    k = int(round(flip * n))
    for c in range(C):
        pick = rng.choice(np.flatnonzero(y == c), k, replace=False)
        noisy[pick] = (c + rng.integers(1, C, size=k)) % C
    return f, y, noisy


# ---- alpha ---------------------------------------------------------------------------------------


def test_alpha_schedule_formula():
    assert alpha_schedule(0) == pytest.approx(0.2, abs=0, rel=1e-15)  # defaults: base 0.2, rate 35
    assert alpha_schedule(0, base=0.37, rate=10) == 0.37
    assert alpha_schedule(35) == pytest.approx(0.2 * math.e, rel=1e-12)
    assert alpha_schedule(10, base=0.1, rate=20) == pytest.approx(0.1 * math.exp(0.5), rel=1e-12)
    assert alpha_schedule(7, base=0.5, rate=35) == pytest.approx(0.5 * math.exp(0.2), rel=1e-12)


def test_alpha_reaches_one_and_is_capped():
    base, rate = 0.2, 35.0
    e1 = rate * math.log(1 / base)  # ~56.3: where base * exp(e / rate) = 1
    assert alpha_schedule(e1, base, rate) == pytest.approx(1.0, abs=1e-12)
    assert alpha_schedule(math.ceil(e1), base, rate) == 1.0
    assert alpha_schedule(1000, base, rate) == 1.0
    assert alpha_schedule(math.floor(e1), base, rate) < 1.0
    assert alpha_schedule(0, base=1.0) == 1.0
    assert alpha_schedule(100, base=0.0) == 0.0


def test_alpha_is_monotone():
    values = [alpha_schedule(e, 0.2, 35) for e in range(200)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert all(0.2 <= v <= 1.0 for v in values)
    assert values[-1] == 1.0


# ---- z-scores ------------------------------------------------------------------------------------


def test_zscore_within_groups():
    rng = np.random.default_rng(0)
    labels = np.array([0] * 7 + [1] * 5 + [2] * 4 + [3])
    values = rng.normal(3.0, 5.0, size=len(labels))
    values[labels == 2] = 4.2  # std 0
    z = zscore_within(values, labels)
    for c in (0, 1):
        assert z[labels == c].mean() == pytest.approx(0.0, abs=1e-12)
        assert z[labels == c].std() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_array_equal(z[labels == 2], 0.0)  # a class with std 0 gives 0
    assert z[labels == 3] == 0.0                           # a singleton too
    # within a class the order is kept and the map is affine
    v0, z0 = values[labels == 0], z[labels == 0]
    np.testing.assert_allclose(z0, (v0 - v0.mean()) / v0.std(), atol=1e-12)


# ---- feature similarity --------------------------------------------------------------------------


def test_feature_similarity_hand_example():
    # class 0: points 0, 1, 3 on a line; class 1: a single point
    f = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0], [7.0, 7.0]])
    labels = [0, 0, 0, 1]
    g = -np.array([(1 + 3) / 2, (1 + 2) / 2, (3 + 2) / 2])  # mean distance to the others, negated
    expect = (g - g.mean()) / g.std()
    z = feature_similarity(f, labels)
    np.testing.assert_allclose(z[:3], expect, atol=1e-6)
    assert z[3] == 0.0
    assert np.argmax(z[:3]) == 1  # the point in the middle is the most typical


def test_feature_similarity_puts_outliers_lowest():
    f, y, noisy = clustered(seed=1, C=4, n=12, spread=0.5, flip=0.25)
    z = feature_similarity(f, noisy)
    for c in range(4):
        idx = np.flatnonzero(noisy == c)
        out = set(idx[y[idx] != c])
        assert out, "every class has outliers in this setting"
        lowest = set(idx[np.argsort(z[idx])[: len(out)]])
        assert lowest == out, f"class {c}: the lowest scores are not the mislabelled samples"


# ---- prompt and robust similarity ----------------------------------------------------------------


def test_prompt_similarity_hand_computation():
    rng = np.random.default_rng(2)
    B, C, N, D = 3, 4, 10, 8
    text = F.normalize(torch.tensor(rng.normal(size=(B, C, D)), dtype=torch.float32), dim=-1)
    img = F.normalize(torch.tensor(rng.normal(size=(N, D)), dtype=torch.float32), dim=-1)
    labels = np.array([0, 1, 2, 3, 0, 1, 2, 3, 0, 0])
    t, f = text.double().numpy(), img.double().numpy()
    p = np.array([np.mean([f[i] @ t[b, labels[i]] for b in range(B)]) for i in range(N)])
    expect = np.zeros(N)
    for c in range(C):
        m = labels == c
        expect[m] = (p[m] - p[m].mean()) / p[m].std()
    np.testing.assert_allclose(prompt_similarity(img, text, labels), expect, atol=1e-5)


def test_robust_similarity_blend():
    p = np.array([1.0, -1.0, 0.5])
    g = np.array([-2.0, 2.0, 0.0])
    np.testing.assert_allclose(robust_similarity(p, g, 0.25), [0.25 - 1.5, -0.25 + 1.5, 0.125])
    np.testing.assert_array_equal(robust_similarity(p, g, 1.0), p)
    np.testing.assert_array_equal(robust_similarity(p, g, 0.0), g)


# ---- selection -----------------------------------------------------------------------------------

# Measured on clustered(seed, C=5, n=16, spread=0.8, flip=0.3) (25 of 80 noisy), feature similarity
# only (alpha 0), GMM selection, seeds 0..4: precision 1.0, 1.0, 0.982, 0.982, 0.982; recall 1.0,
# 1.0, 1.0, 1.0, 0.982; AUROC 1.0 each.
@pytest.mark.parametrize("seed", range(5))
def test_gmm_selection_on_clustered_features(seed):
    f, y, noisy = clustered(seed)
    is_noisy = noisy != y
    assert is_noisy.sum() == 25
    g = robust_similarity(np.zeros(len(y)), feature_similarity(f, noisy), alpha=0.0)
    keep = select_clean(g, noisy, "gmm")
    m = selection_metrics(keep, is_noisy, g)
    assert m["select_precision"] >= 0.95, m
    assert m["select_recall"] >= 0.95, m
    assert m["noise_auroc"] >= 0.98, m
    assert m["kept_frac"] == pytest.approx(keep.mean())


def test_gmm_selection_is_deterministic_and_uses_threshold():
    f, y, noisy = clustered(3)
    g = feature_similarity(f, noisy)
    a = select_clean(g, noisy, "gmm", seed=0)
    np.testing.assert_array_equal(a, select_clean(g, noisy, "gmm", seed=0))
    # a stricter posterior threshold keeps a subset
    strict = select_clean(g, noisy, "gmm", threshold=0.999)
    assert strict.sum() <= a.sum() and not np.any(strict & ~a)


@pytest.mark.parametrize("ratio", [0.5, 0.3, 0.75, 1.0])
def test_ratio_keeps_top_ceil_per_class(ratio):
    rng = np.random.default_rng(4)
    labels = np.array([0] * 7 + [1] * 10 + [2] * 3 + [3])
    scores = rng.normal(size=len(labels))
    keep = select_clean(scores, labels, "ratio", ratio=ratio)
    for c in range(4):
        idx = np.flatnonzero(labels == c)
        k = math.ceil(ratio * len(idx))
        assert keep[idx].sum() == k
        # the kept ones are the k highest scores
        assert set(idx[keep[idx]]) == set(idx[np.argsort(-scores[idx])[:k]])


def test_none_keeps_all():
    keep = select_clean(np.arange(10.0), [0] * 5 + [1] * 5, "none")
    assert keep.dtype == bool and keep.all()


def test_gmm_iterations_and_tolerance_reach_the_mixture():
    """gmm_max_iter / gmm_tol are sklearn's max_iter / tol: one EM step does not converge (the original
    code's 10 / 1e-2 is a config away), the default 100 / 1e-3 does."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.normal(0, 1, 40), rng.normal(4, 1, 40)])
    labels = np.zeros(80, dtype=int)
    with pytest.warns(ConvergenceWarning):
        select_clean(scores, labels, max_iter=1, tol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        keep = select_clean(scores, labels)
    assert keep[40:].mean() > 0.9 and keep[:40].mean() < 0.1


def test_gmm_small_or_flat_classes_keep_all():
    f, y, noisy = clustered(0, C=2, n=16)
    g = feature_similarity(f, noisy)
    labels = np.concatenate([noisy, [2, 2, 2], [3] * 6])
    scores = np.concatenate([g, [5.0, -5.0, 0.0], [1.5] * 6])  # class 2: 3 samples; class 3: all equal
    keep = select_clean(scores, labels, "gmm")
    assert keep[labels == 2].all() and keep[labels == 3].all()
    assert not keep[labels < 2].all()  # the real classes do drop their outliers


def test_unknown_selector():
    with pytest.raises(ValueError, match="selector 'ot'"):
        select_clean([1.0, 2.0], [0, 0], "ot")


# ---- metrics -------------------------------------------------------------------------------------


def test_selection_metrics_hand_example():
    keep = [True, True, False, False, True]
    is_noisy = [False, True, False, True, False]
    scores = [0.9, 0.8, 0.1, 0.3, 0.6]
    m = selection_metrics(keep, is_noisy, scores)
    assert m["kept_frac"] == pytest.approx(3 / 5)
    assert m["select_precision"] == pytest.approx(2 / 3)  # kept: 0 (clean), 1 (noisy), 4 (clean)
    assert m["select_recall"] == pytest.approx(2 / 3)     # clean: 0, 2, 4; kept 0 and 4
    # AUROC of scores for clean (positive) vs noisy: pairs (clean, noisy) with clean scored higher:
    # clean {0.9, 0.1, 0.6} vs noisy {0.8, 0.3}: 0.9>both (2), 0.1>none (0), 0.6>0.3 (1) -> 3/6
    assert m["noise_auroc"] == pytest.approx(0.5)
    m2 = selection_metrics(keep, is_noisy, [0.9, 0.2, 0.8, 0.1, 0.7])
    assert m2["noise_auroc"] == pytest.approx(1.0)


def test_selection_metrics_without_noise_or_without_keep():
    m = selection_metrics([True, False, True], [False, False, False], [1.0, 2.0, 3.0])
    assert math.isnan(m["noise_auroc"])
    assert m["select_precision"] == 1.0 and m["select_recall"] == pytest.approx(2 / 3)
    m = selection_metrics([False, False], [False, True], [1.0, 0.0])
    assert math.isnan(m["select_precision"]) and m["kept_frac"] == 0.0 and m["select_recall"] == 0.0
    m = selection_metrics([True, True], [True, True])
    assert math.isnan(m["select_recall"]) and math.isnan(m["noise_auroc"]) and m["select_precision"] == 0.0


# --- diagnostics: each side of G alone, and how far the blocks differ -------------------------------

def test_block_cosine_is_one_for_identical_blocks_zero_for_orthogonal_and_nan_for_one():
    from rsnl.similarity import block_cosine
    t = torch.nn.functional.normalize(torch.randn(1, 5, 8), dim=-1)
    assert math.isnan(block_cosine(t))
    assert block_cosine(t.expand(3, 5, 8)) == pytest.approx(1.0)
    eye = torch.eye(8)
    orth = torch.stack([eye[:5], eye[[5, 6, 7, 0, 1]]])  # [2, 5, 8]: each class's two features orthogonal
    assert block_cosine(orth) == pytest.approx(0.0)
    flipped = torch.stack([t[0], -t[0]])
    assert block_cosine(flipped) == pytest.approx(-1.0)


def test_class_cosine_is_one_when_the_classes_share_a_feature_and_zero_when_orthogonal():
    from rsnl.similarity import class_cosine
    eye = torch.eye(8)
    assert class_cosine(eye[:5].unsqueeze(0)) == pytest.approx(0.0)
    assert class_cosine(eye[:1].expand(2, 5, 8)) == pytest.approx(1.0)
    t = torch.nn.functional.normalize(torch.randn(3, 5, 8), dim=-1)
    per_block = [((t[b] @ t[b].T).sum() - 5) / 20 for b in range(3)]  # off-diagonal mean of each block
    assert class_cosine(t) == pytest.approx(float(sum(per_block) / 3), abs=1e-6)
    assert class_cosine(torch.stack([eye[:5], eye[:1].expand(5, 8)])) == pytest.approx(0.5)  # blocks averaged


def test_clean_auroc_ranks_clean_above_noisy_and_is_nan_without_both():
    from rsnl.similarity import clean_auroc
    noisy = np.array([False, False, True, True])
    assert clean_auroc([3.0, 2.0, 1.0, 0.0], noisy) == 1.0
    assert clean_auroc([0.0, 1.0, 2.0, 3.0], noisy) == 0.0
    assert clean_auroc([1.0, 0.0, 1.0, 0.0], noisy) == 0.5
    assert math.isnan(clean_auroc([1.0, 2.0], np.array([False, False])))


@pytest.mark.parametrize("seed", range(5))
def test_clean_auroc_equals_sklearn_with_ties(seed):
    from sklearn.metrics import roc_auc_score
    from rsnl.similarity import clean_auroc
    rng = np.random.default_rng(seed)
    noisy = rng.random(160) < 0.5
    scores = np.round(rng.standard_normal(160) + (~noisy), 1)  # rounded: many ties
    assert clean_auroc(scores, noisy) == pytest.approx(roc_auc_score(~noisy, scores), abs=1e-12)
