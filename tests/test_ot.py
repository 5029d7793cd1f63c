"""rsnl.ot: the log-domain Sinkhorn solver and PromptOT's clean-sample selection (NLPrompt)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rsnl.ot import ot_cost, ot_plan, select_by_ot, sinkhorn_log


def uniform(n, c):
    return (torch.full((n,), 1.0 / n, dtype=torch.float64), torch.full((c,), 1.0 / c, dtype=torch.float64))


@pytest.mark.parametrize("eps", [0.1, 0.01, 0.001])
@pytest.mark.parametrize("kind", ["neg_log_prob", "neg_prob"])
def test_marginals_hold_to_1e6_and_nothing_underflows(eps, kind):
    torch.manual_seed(0)
    probs = torch.distributions.Dirichlet(torch.full((7,), 0.3)).sample((300,))  # skewed, far from balanced
    probs = probs.clamp_min(1e-30) / probs.clamp_min(1e-30).sum(1, keepdim=True)
    a, b = uniform(300, 7)
    q, rounds, err = sinkhorn_log(ot_cost(probs, kind), a, b, eps, max_iter=50_000)
    assert torch.isfinite(q).all() and (q >= 0).all()
    assert 1 < rounds < 50_000 and err < 1e-6
    assert (q.sum(1) - a).abs().sum() < 1e-6  # rows: the stopping rule
    assert (q.sum(0) - b).abs().max() < 1e-12  # columns: exact after the last update


def test_round_cap_is_reported_not_hidden():
    torch.manual_seed(0)
    probs = torch.distributions.Dirichlet(torch.full((7,), 0.3)).sample((300,))
    a, b = uniform(300, 7)
    q, rounds, err = sinkhorn_log(ot_cost(probs, "neg_log_prob"), a, b, 0.001, max_iter=100)
    assert rounds == 100 and err > 1e-6 and err == pytest.approx(float((q.sum(1) - a).abs().sum()))


def test_log_domain_equals_plain_sinkhorn_where_both_work():
    """For a moderate epsilon the textbook scaling iterations (u, v on exp(-M/eps)) give the same plan."""
    torch.manual_seed(1)
    cost = torch.rand(40, 5, dtype=torch.float64)
    a, b = uniform(40, 5)
    eps = 0.1
    q, _, _ = sinkhorn_log(cost, a, b, eps, tol=1e-13, max_iter=5000)
    K = (-cost / eps).exp()
    u, v = torch.ones_like(a), torch.ones_like(b)
    for _ in range(5000):
        u = a / (K @ v)
        v = b / (K.T @ u)
    assert torch.allclose(q, u[:, None] * K * v[None, :], atol=1e-12)


def test_a_row_shift_of_the_cost_leaves_the_plan_unchanged():
    """Why neg_prob reproduces NLPrompt's released code: log_softmax(p) = p - logsumexp(p) per row."""
    torch.manual_seed(2)
    probs = torch.rand(50, 6, dtype=torch.float64).softmax(-1)
    a, b = uniform(50, 6)
    plain = sinkhorn_log(-probs, a, b, 0.01, tol=1e-12, max_iter=5000)[0]
    shifted = sinkhorn_log(-torch.log_softmax(probs, dim=1), a, b, 0.01, tol=1e-12, max_iter=5000)[0]
    assert torch.allclose(plain, shifted, atol=1e-10)


@pytest.mark.parametrize("kind", ["neg_log_prob", "neg_prob"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clean_mask_on_separated_clusters_with_40_percent_flips(kind, seed):
    g = torch.Generator().manual_seed(seed)
    n, c, d = 400, 8, 32
    centers = F.normalize(torch.randn(c, d, generator=g), dim=-1)
    y = torch.randint(c, (n,), generator=g)
    feats = F.normalize(centers[y] + 0.2 * torch.randn(n, d, generator=g), dim=-1)
    probs = (30.0 * feats @ centers.T).softmax(-1)
    rng = np.random.default_rng(seed)
    noisy = y.numpy().copy()
    flip = rng.random(n) < 0.4
    noisy[flip] = (noisy[flip] + rng.integers(1, c, flip.sum())) % c
    keep, score, residual = select_by_ot(probs, noisy, eps=0.01, cost=kind)
    clean = ~flip
    assert (keep & clean).sum() / keep.sum() >= 0.9 and (keep & clean).sum() / clean.sum() >= 0.9
    assert score.shape == (n,) and score[clean].mean() > score[~clean].mean()


def test_plan_is_the_pseudo_label_source():
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]], dtype=torch.float64)
    q, residual = ot_plan(probs, eps=0.1)
    assert residual < 1e-6
    # balanced classes: two samples must go to class 1 although three prefer class 0
    assert q.argmax(1).tolist() == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="ot_cost 'log'"):
        ot_cost(probs, "log")


def test_several_problems_at_once_are_each_solved_as_alone():
    """Members side by side solve their plans in one batch (rsnl/members.py): each problem stops at its own
    round and ends with the plan and error it has alone."""
    torch.manual_seed(2)
    probs = torch.stack([torch.distributions.Dirichlet(torch.full((7,), conc)).sample((120,))
                         for conc in (0.05, 0.3, 3.0)])  # sharp to soft: they need different rounds
    a, b = uniform(120, 7)
    q, rounds, err = sinkhorn_log(ot_cost(probs, "neg_log_prob"), a, b, 0.05, max_iter=3000)
    assert rounds.shape == err.shape == (3,) and len(set(rounds.tolist())) == 3
    for k in range(3):
        qk, rk, ek = sinkhorn_log(ot_cost(probs[k], "neg_log_prob"), a, b, 0.05, max_iter=3000)
        assert rk == int(rounds[k]) and err[k].item() == pytest.approx(ek, rel=1e-9, abs=1e-15)
        torch.testing.assert_close(q[k], qk, rtol=1e-9, atol=1e-15)
    batched, residuals = ot_plan(probs, eps=0.05)
    assert batched.shape == (3, 120, 7) and residuals.shape == (3,)
