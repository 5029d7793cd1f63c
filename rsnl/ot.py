"""PromptOT (NLPrompt, CVPR 2025): clean samples by optimal transport of images to classes.

Before every epoch the prompts as they stand give every training sample class probabilities
p_i = softmax(s * f_i . T). An entropic optimal transport plan Q moves the uniform mass of the N samples
(a_i = 1/N) onto the C classes with uniform capacity (b_c = 1/C) at cost M_ic = -log p_ic; its row
argmax is a pseudo-label that respects the class balance a few-shot sample has. A sample is clean when
its pseudo-label equals its given label. `ot_cost: neg_prob` uses M_ic = -p_ic instead, which is what
NLPrompt's released code computes (it takes log_softmax of probabilities, a per-row shift of -p, and a
per-row shift of the cost does not change the plan).

The Sinkhorn iterations run on the dual potentials in log space, in float64, so that a small epsilon
(NLPrompt's DTD script uses 0.001) does not underflow exp(-M / eps).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from rsnl.config import OT_COSTS

TOL, MAX_ITER = 1e-6, 1000  # NLPrompt's settings (POT's stopThr and numItermax)


def sinkhorn_log(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float, tol: float = TOL,
                 max_iter: int = MAX_ITER) -> tuple[torch.Tensor, int | torch.Tensor, float | torch.Tensor]:
    """Entropic OT plan Q [N, C] with row sums a and column sums b for `cost`.

    Alternating exact updates of the log-domain potentials f, g; after each g-update the columns hold
    exactly. Every 10 rounds (and at the last) the rows' L1 error is measured, and the loop stops once
    it is below `tol`, or after `max_iter` rounds. Returns (Q, rounds, rows' L1 error): a small eps on
    soft probabilities can need more rounds than allowed, so the caller reports the error.

    `cost` [K, N, C] solves K problems at once (members side by side, rsnl/members.py), each stopping
    at its own round as if alone: a problem that has stopped keeps its potentials (rounds and errors
    are then [K] tensors).
    """
    cost, a, b = cost.double(), a.double(), b.double()
    log_a, log_b = a.log(), b.log()
    batch = cost.shape[:-2]
    f, g = torch.zeros_like(cost[..., 0]), torch.zeros_like(cost[..., 0, :])
    active = torch.ones(batch, dtype=torch.bool, device=cost.device)
    rounds = torch.zeros(batch, dtype=torch.long, device=cost.device)
    r, running = 0, True
    while running and r < max_iter:
        r += 1
        f = torch.where(active[..., None], eps * (log_a - torch.logsumexp((g[..., None, :] - cost) / eps, dim=-1)), f)
        g = torch.where(active[..., None], eps * (log_b - torch.logsumexp((f[..., :, None] - cost) / eps, dim=-2)), g)
        if r % 10 == 0 or r == max_iter:
            err = ((f[..., :, None] + g[..., None, :] - cost) / eps).exp().sum(-1).sub(a).abs().sum(-1)
            rounds = torch.where(active, r, rounds)
            active = active & ~(err < tol)
            running = bool(active.any())  # one sync per 10 rounds
    q = ((f[..., :, None] + g[..., None, :] - cost) / eps).exp()
    err = (q.sum(-1) - a).abs().sum(-1)
    return (q, int(rounds), float(err)) if not batch else (q, rounds, err)


def ot_cost(probs: torch.Tensor, kind: str = "neg_log_prob") -> torch.Tensor:
    if kind == "neg_log_prob":
        return -probs.double().clamp_min(1e-300).log()
    if kind == "neg_prob":
        return -probs.double()
    raise ValueError(f"ot_cost {kind!r}: allowed {', '.join(OT_COSTS)}")


def ot_plan(probs: torch.Tensor, eps: float = 0.01, cost: str = "neg_log_prob"
            ) -> tuple[torch.Tensor, float | torch.Tensor]:
    """(Q [N, C], rows' L1 error) for class probabilities [N, C] and uniform marginals; for [K, N, C],
    K plans at once (each as if alone) and K errors."""
    n, c = probs.shape[-2:]
    a = torch.full((n,), 1.0 / n, dtype=torch.float64, device=probs.device)
    b = torch.full((c,), 1.0 / c, dtype=torch.float64, device=probs.device)
    q, _, err = sinkhorn_log(ot_cost(probs, cost), a, b, eps)
    return q, err


def ot_selection(q: torch.Tensor, labels) -> tuple[np.ndarray, np.ndarray]:
    """(keep, score) of a plan: keep where argmax_c Q_ic equals the given label; score Q_{i, label_i}
    (ranks samples for the AUROC, as G does for the GMM selector)."""
    y = torch.as_tensor(np.asarray(labels), device=q.device)
    keep = (q.argmax(1) == y).cpu().numpy()
    score = q.gather(1, y[:, None]).squeeze(1).cpu().numpy()
    return keep, score


def select_by_ot(probs: torch.Tensor, labels, eps: float = 0.01, cost: str = "neg_log_prob"
                 ) -> tuple[np.ndarray, np.ndarray, float]:
    """(keep, score, residual): ot_selection of the plan, and the rows' L1 error of the plan."""
    q, err = ot_plan(probs, eps, cost)
    return (*ot_selection(q, labels), err)
