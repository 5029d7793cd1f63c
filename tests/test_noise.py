"""rsnl.noise: few-shot sampling with injected label noise."""

import math

import numpy as np
import pytest

from rsnl.noise import NoisySample, noisy_count, sample_noisy_fewshot

C = 6


def split_labels(per_class=40, classes=C, seed=0):
    """A shuffled split with `per_class` images of each class."""
    y = np.repeat(np.arange(classes), per_class)
    return np.random.default_rng(seed).permutation(y)


def assert_consistent(s: NoisySample, y):
    n = len(s)
    for a in (s.indices, s.labels, s.true_labels, s.is_noisy):
        assert a.shape == (n,)
    assert s.indices.dtype == np.int64 and s.labels.dtype == np.int64
    np.testing.assert_array_equal(s.true_labels, y[s.indices])
    np.testing.assert_array_equal(s.is_noisy, s.labels != s.true_labels)
    assert len(np.unique(s.indices)) == n, "an image index is used twice"


def test_noisy_count_rounds_half_up():
    assert noisy_count(0.125, 20) == 3  # 2.5 -> 3 (Python's round() gives 2)
    assert noisy_count(0.125, 4) == 1   # 0.5 -> 1 (round() gives 0)
    assert noisy_count(0.25, 16) == 4
    assert noisy_count(0.5, 16) == 8
    assert noisy_count(0.0, 16) == 0
    assert noisy_count(1.0, 16) == 16


@pytest.mark.parametrize("shots,rate", [(16, 0.125), (16, 0.25), (16, 0.5), (20, 0.125), (4, 0.125), (10, 0.7)])
def test_ptnl_exact_per_class_counts(shots, rate):
    y = split_labels(per_class=40)
    s = sample_noisy_fewshot(y, C, shots, rate, "ptnl", seed=3)
    assert_consistent(s, y)
    expect = int(math.floor(rate * shots + 0.5))
    assert len(s) == C * shots
    for c in range(C):
        mine = s.labels == c
        assert mine.sum() == shots, f"class {c} has {mine.sum()} samples"
        assert s.is_noisy[mine].sum() == expect, f"class {c}: {s.is_noisy[mine].sum()} noisy, expected {expect}"
        # the noisy ones are images of other classes labelled c
        assert np.all(s.true_labels[mine & s.is_noisy] != c)
        assert np.all(s.true_labels[mine & ~s.is_noisy] == c)
    assert s.noise_fraction == pytest.approx(expect / shots)


def test_ptnl_borrowed_images_come_from_all_other_classes():
    """Noisy slots are drawn uniformly from other classes' images: over many seeds every other class
    contributes, in roughly equal shares."""
    y = split_labels(per_class=40)
    counts = np.zeros((C, C))
    for seed in range(40):
        s = sample_noisy_fewshot(y, C, 16, 0.5, "ptnl", seed=seed)
        noisy = s.is_noisy
        np.add.at(counts, (s.labels[noisy], s.true_labels[noisy]), 1)
    assert np.all(np.diag(counts) == 0)
    off = counts[~np.eye(C, dtype=bool)]
    # 40 seeds x 8 noisy slots per class spread over 5 other classes: 64 expected per cell
    assert off.min() >= 40 and off.max() <= 90, off


def test_symmetric_global_count_and_uniform_flips():
    y = split_labels(per_class=300)
    shots, rate = 200, 0.5
    s = sample_noisy_fewshot(y, C, shots, rate, "symmetric", seed=5)
    assert_consistent(s, y)
    n = C * shots
    assert len(s) == n
    # before relabelling every class had exactly `shots` images
    assert np.all(np.bincount(s.true_labels, minlength=C) == shots)
    assert s.is_noisy.sum() == noisy_count(rate, n) == 600
    shift = (s.labels[s.is_noisy] - s.true_labels[s.is_noisy]) % C
    assert shift.min() >= 1  # never relabelled to the true class
    counts = np.bincount(shift, minlength=C)[1:]
    # 600 flips over 5 other classes: 120 expected each, binomial std ~ 9.8
    assert counts.min() >= 85 and counts.max() <= 155, counts


def test_symmetric_rounds_half_up_globally():
    y = split_labels(per_class=10, classes=2)
    s = sample_noisy_fewshot(y, 2, 5, 0.25, "symmetric", seed=1)  # 0.25 * 10 = 2.5 -> 3
    assert s.is_noisy.sum() == 3


def test_pairflip_maps_to_next_class():
    y = split_labels(per_class=40)
    s = sample_noisy_fewshot(y, C, 16, 0.25, "pairflip", seed=2)
    assert_consistent(s, y)
    assert s.is_noisy.sum() == noisy_count(0.25, C * 16) == 24
    np.testing.assert_array_equal(s.labels[s.is_noisy], (s.true_labels[s.is_noisy] + 1) % C)
    np.testing.assert_array_equal(s.labels[~s.is_noisy], s.true_labels[~s.is_noisy])
    # the last class wraps to 0 when it is flipped
    assert np.all(s.labels[s.is_noisy & (s.true_labels == C - 1)] == 0)


@pytest.mark.parametrize("kind", ["ptnl", "symmetric", "pairflip"])
def test_same_seed_same_sample_other_seed_other_sample(kind):
    y = split_labels(per_class=40)
    a = sample_noisy_fewshot(y, C, 16, 0.25, kind, seed=7)
    b = sample_noisy_fewshot(y, C, 16, 0.25, kind, seed=7)
    c = sample_noisy_fewshot(y, C, 16, 0.25, kind, seed=8)
    for f in ("indices", "labels", "true_labels", "is_noisy"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    assert not np.array_equal(a.indices, c.indices)
    assert not (np.array_equal(a.labels, c.labels) and np.array_equal(a.is_noisy, c.is_noisy))


@pytest.mark.parametrize("kind", ["ptnl", "symmetric", "pairflip"])
def test_rate_zero_is_clean(kind):
    y = split_labels(per_class=40)
    s = sample_noisy_fewshot(y, C, 16, 0.0, kind, seed=1)
    assert_consistent(s, y)
    assert not s.is_noisy.any() and s.noise_fraction == 0.0
    np.testing.assert_array_equal(s.labels, s.true_labels)
    assert np.all(np.bincount(s.labels, minlength=C) == 16)


def test_rate_one_ptnl_is_all_noisy():
    y = split_labels(per_class=40)
    s = sample_noisy_fewshot(y, C, 4, 1.0, "ptnl", seed=1)
    assert s.is_noisy.all() and np.all(np.bincount(s.labels, minlength=C) == 4)


@pytest.mark.parametrize("rate", [1.5, -0.1])
def test_bad_rate(rate):
    with pytest.raises(ValueError, match="noise_rate"):
        sample_noisy_fewshot(split_labels(), C, 4, rate, "ptnl")


def test_bad_type():
    with pytest.raises(ValueError, match="noise_type 'uniform'.*ptnl, symmetric, pairflip"):
        sample_noisy_fewshot(split_labels(), C, 4, 0.2, "uniform")


def test_bad_shots():
    with pytest.raises(ValueError, match="shots 0"):
        sample_noisy_fewshot(split_labels(), C, 0, 0.2, "ptnl")


def test_too_few_images_in_a_class():
    y = np.concatenate([split_labels(per_class=20, classes=3), np.full(3, 3)])  # class 3 has 3 images
    with pytest.raises(ValueError, match="class 3 has 3 images, 8 clean shots"):
        sample_noisy_fewshot(y, 4, 8, 0.0, "ptnl")
    # with 50% ptnl noise only 4 clean images of class 3 are needed: still too few
    with pytest.raises(ValueError, match="class 3 has 3 images, 4 clean shots"):
        sample_noisy_fewshot(y, 4, 8, 0.5, "ptnl")


def test_too_few_other_images_for_noisy_slots():
    y = split_labels(per_class=4, classes=2)  # 8 images; 2 x (2 clean + 2 noisy) needs 8 distinct ones
    s = sample_noisy_fewshot(y, 2, 4, 0.5, "ptnl", seed=0)
    assert len(np.unique(s.indices)) == 8
    with pytest.raises(ValueError, match="not enough images of other classes"):
        sample_noisy_fewshot(y, 2, 6, 0.5, "ptnl", seed=0)  # 3 clean each leaves 2 spare, 3 needed


def test_noise_needs_two_classes():
    with pytest.raises(ValueError, match="at least 2 classes"):
        sample_noisy_fewshot(np.zeros(10, dtype=int), 1, 4, 0.25, "symmetric")
