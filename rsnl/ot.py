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
                 max_iter: int = MAX_ITER) -> tuple[torch.Tensor, int, float]:
    """Entropic OT plan Q [N, C] with row sums a and column sums b for `cost`.

    Alternating exact updates of the log-domain potentials f, g; after each g-update the columns hold
    exactly. Every 10 rounds (and at the last) the rows' L1 error is measured, and the loop stops once
    it is below `tol`, or after `max_iter` rounds. Returns (Q, rounds, rows' L1 error): a small eps on
    soft probabilities can need more rounds than allowed, so the caller reports the error.
    """
    cost, a, b = cost.double(), a.double(), b.double()
    log_a, log_b = a.log(), b.log()
    f, g = torch.zeros_like(a), torch.zeros_like(b)
    err, rounds = math.inf, 0
    while rounds < max_iter:
        rounds += 1
        f = eps * (log_a - torch.logsumexp((g[None, :] - cost) / eps, dim=1))
        g = eps * (log_b - torch.logsumexp((f[:, None] - cost) / eps, dim=0))
        if rounds % 10 == 0 or rounds == max_iter:
            err = float(((f[:, None] + g[None, :] - cost) / eps).exp().sum(1).sub(a).abs().sum())
            if err < tol:
                break
    q = ((f[:, None] + g[None, :] - cost) / eps).exp()
    return q, rounds, float((q.sum(1) - a).abs().sum())


def ot_cost(probs: torch.Tensor, kind: str = "neg_log_prob") -> torch.Tensor:
    if kind == "neg_log_prob":
        return -probs.double().clamp_min(1e-300).log()
    if kind == "neg_prob":
        return -probs.double()
    raise ValueError(f"ot_cost {kind!r}: allowed {', '.join(OT_COSTS)}")


def ot_plan(probs: torch.Tensor, eps: float = 0.01, cost: str = "neg_log_prob") -> tuple[torch.Tensor, float]:
    """(Q [N, C], rows' L1 error) for class probabilities [N, C] and uniform marginals."""
    n, c = probs.shape
    a = torch.full((n,), 1.0 / n, dtype=torch.float64, device=probs.device)
    b = torch.full((c,), 1.0 / c, dtype=torch.float64, device=probs.device)
    q, _, err = sinkhorn_log(ot_cost(probs, cost), a, b, eps)
    return q, err


def select_by_ot(probs: torch.Tensor, labels, eps: float = 0.01, cost: str = "neg_log_prob"
                 ) -> tuple[np.ndarray, np.ndarray, float]:
    """(keep, score, residual): keep where argmax_c Q_ic equals the given label; score Q_{i, label_i}
    (ranks samples for the AUROC, as G does for the GMM selector); residual the rows' L1 error."""
    q, err = ot_plan(probs, eps, cost)
    y = torch.as_tensor(np.asarray(labels), device=q.device)
    keep = (q.argmax(1) == y).cpu().numpy()
    score = q.gather(1, y[:, None]).squeeze(1).cpu().numpy()
    return keep, score, err
