"""Members trained side by side: one text-tower pass per step for a whole group.

A study trial trains several members (its group: noise rates x seeds, ...) that share the backbone and
the prompts' shape. Their context vectors stack along the block dimension, so that one call of the
frozen text tower encodes every member's prompts (`PromptMatrix.encode` on the stack). Everything
else stays the member's own, run by its `rsnl.trainer.Trainer` piece by piece: its sample, selection,
batches and batch order (its own generator), loss, optimiser, gradient scaler, metrics and checkpoint.
Members keep different numbers of samples, so their batch counts differ: a member with no batch left
in the epoch takes no step at all (no momentum, no weight decay). `Trainer.train_epoch` is the same
epoch for one member alone, and the reference (`batch_members: false`). docs/performance.md says how
exact the side-by-side run is and what it gains.

A group's step memory grows with its members; `plan_groups` splits a group into chunks that fit the
trial's share of its device, and says so.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from rsnl.config import TrialConfig
from rsnl.models import PromptMatrix
from rsnl.ot import ot_plan
from rsnl.trainer import Batch, EpochRun, Trainer

# Members agree on these to share the text tower's passes: the same tower and class prompts (backbone,
# weights, classes), the same shape of a block's context, one device and autocast. Any other key may
# differ, the number of blocks too (the stack is one of blocks).
SHARED_KEYS = ("backbone", "pretrained", "cache_dir", "dataset", "data_root", "n_ctx", "ctx_init", "csc",
               "class_token_position", "device", "precision")


def side_by_side_key(cfg: TrialConfig) -> tuple | None:
    """Members with equal keys can train side by side; None: this member trains alone."""
    return tuple(getattr(cfg, k) for k in SHARED_KEYS) if cfg.batch_members else None


def side_by_side_groups(configs: list[tuple[str, TrialConfig]]) -> list[list[str]]:
    """The members (by name) that train together, in the members' order; a member that must train
    alone (batch_members false) is a group of its own."""
    groups: dict = {}
    for i, (name, cfg) in enumerate(configs):
        key = side_by_side_key(cfg)
        groups.setdefault(("alone", i) if key is None else key, []).append(name)
    return list(groups.values())


def splitting_keys(configs: list[tuple[str, TrialConfig]]) -> list[str]:
    """The shared keys on which members that ask to train side by side differ (why they form several
    groups); empty when they form one."""
    batched = [cfg for _, cfg in configs if cfg.batch_members]
    return [k for k in SHARED_KEYS if len({repr(getattr(c, k)) for c in batched}) > 1]


# --- one text-tower pass for several members -----------------------------------------------------

def stacked_text_features(matrices: list[PromptMatrix]) -> list[torch.Tensor]:
    """Every matrix's text features [blocks, C, D] from one call of the text tower on their stacked
    context (with the gradients to each matrix's own context)."""
    first = matrices[0]
    if len(matrices) == 1:
        return [first.text_features()]
    for p in matrices[1:]:
        if not (p.tower is first.tower and p.ctx.shape[1:] == first.ctx.shape[1:] and p.fast == first.fast
                and p.position == first.position and torch.equal(p.tokens, first.tokens)):
            raise ValueError("members side by side need the same text tower, classes and context shape "
                             f"({p.extra_repr()} vs {first.extra_repr()})")
    feats = first.encode(torch.cat([p.ctx for p in matrices])).split([p.ctx.shape[0] for p in matrices])
    # normalised member by member: the backward then meets each member's gradient in the layout its solo
    # run gives it, and returns the solo run's bits (normalising the stack makes them contiguous first)
    return [F.normalize(f, dim=-1) for f in feats]


def step_together(step: list[tuple[Trainer, EpochRun, Batch]]) -> list[torch.Tensor]:
    """One training step of the members in `step` (each with its epoch and its batch), with one
    text-tower pass for all: Trainer.train_step of each, side by side. Returns their losses."""
    trainers = [t for t, _, _ in step]
    with trainers[0]._autocast():  # members share device and precision (SHARED_KEYS)
        texts = stacked_text_features([t.prompts for t in trainers])
        losses = [t.batch_loss(run, batch, text) for (t, run, batch), text in zip(step, texts)]
    values = torch.stack([loss.detach() for loss in losses]).tolist()  # one sync for all members
    for (t, run, batch), value in zip(step, values):
        t.count_loss(run, batch, value)  # a non-finite loss stops the trial before any member's update
    for t in trainers:
        t.optimizer.zero_grad(set_to_none=True)
    # each loss reaches only its own member's context: the sum's backward is each member's own
    sum(t.scaler.scale(loss) for t, loss in zip(trainers, losses)).backward()
    for t in trainers:
        t.optimizer_step()
    return losses


def ot_plans_together(trainers: list[Trainer], texts: list[torch.Tensor]) -> dict[int, tuple]:
    """PromptOT's plans (Q, residual) of the members that select by it, by their index: one Sinkhorn for
    all members that share its settings and sample size, each stopping at its own round (rsnl.ot)."""
    together: dict[tuple, list[int]] = {}
    for i, t in enumerate(trainers):
        if t.cfg.selector == "ot":
            together.setdefault((t.cfg.ot_eps, t.cfg.ot_cost, len(t.data.sample)), []).append(i)
    plans = {}
    for (eps, cost, _), members in together.items():
        if len(members) > 1:
            q, residual = ot_plan(torch.stack([trainers[i].ot_probs(texts[i]) for i in members]), eps, cost)
            plans.update({i: (q[j], float(residual[j])) for j, i in enumerate(members)})
    return plans


def train_side_by_side(trainers: list[Trainer]) -> list[dict]:
    """One epoch of every member, side by side: their metrics, in order. Selection, every training step
    and the evaluation each take one text-tower pass for all members that need it (and PromptOT one
    Sinkhorn); a member whose batches are done sits out the remaining steps untouched."""
    if len(trainers) == 1:
        return [trainers[0].train_epoch()]
    start = time.perf_counter()
    with torch.no_grad():
        texts = stacked_text_features([t.prompts for t in trainers])
    plans = ot_plans_together(trainers, texts)
    runs = [t.begin_epoch(text, plans.get(i)) for i, (t, text) in enumerate(zip(trainers, texts))]
    for s in range(max(len(r.batches) for r in runs)):
        step_together([(t, r, r.batches[s]) for t, r in zip(trainers, runs) if s < len(r.batches)])
    with torch.no_grad(), trainers[0]._autocast():
        texts = stacked_text_features([t.prompts for t in trainers])
    metrics = [t.finish_epoch(r, text) for t, r, text in zip(trainers, runs, texts)]
    # the group's wall time, shared equally (known once every member's metrics are in): summed over
    # members, epoch_seconds stays the compute the trial spent
    share = (time.perf_counter() - start) / len(trainers)
    for m in metrics:
        m["epoch_seconds"] = share  # the same dict as in the member's history
    return metrics


def run_side_by_side(trainers: list[Trainer]) -> list[list[dict]]:
    """Trainer.run for a group: every member to its last epoch, side by side; their histories."""
    while not all(t.done for t in trainers):
        train_side_by_side([t for t in trainers if not t.done])
    return [t.history for t in trainers]


# --- memory: chunks that fit the trial's share of its device -------------------------------------

BACKWARD_FACTOR = 2  # the backward's temporaries, on top of the activations it keeps (measured: bench_members)


def step_bytes(trainer: Trainer) -> int:
    """What one member adds to a side-by-side training step's peak memory: the activations the text
    tower keeps for the backward (measured on one pass of this member's prompts, under its autocast;
    the frozen weights are shared and not counted), times BACKWARD_FACTOR."""
    frozen = {t.untyped_storage().data_ptr() for t in (*trainer.prompts.tower.parameters(),
                                                       *trainer.prompts.tower.buffers(), *trainer.prompts.buffers())}
    kept: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in frozen:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), trainer._autocast():
        text = trainer.prompts.text_features()
    return BACKWARD_FACTOR * (sum(kept.values()) + text.numel() * text.element_size())


def memory_budget(device: torch.device, share: float) -> int:
    """Bytes a trial's side-by-side steps may take: on CUDA `share` of the GPU's memory less what this
    process holds there already; on the CPU `share` of physical memory less this process's resident set."""
    share = min(max(share, 0.0), 1.0)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return int(share * total) - torch.cuda.memory_allocated(device)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(share * total) - _resident_bytes()


def _resident_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


@dataclass
class GroupPlan:
    """Which members train together, and why some that could do not (lines to say once)."""
    groups: list[list[str]]
    notes: list[str] = field(default_factory=list)


def chunked(names: list[str], per_member: int, budget: int | None) -> list[list[str]]:
    """`names` in consecutive chunks of near-equal size whose step memory (per_member each) fits the
    budget; one chunk when it all fits or there is no budget; single members when even two do not fit."""
    if budget is None or per_member * len(names) <= budget:
        return [list(names)]
    size = max(1, budget // per_member)
    n = math.ceil(len(names) / size)
    bounds = [round(i * len(names) / n) for i in range(n + 1)]
    return [list(names[a:b]) for a, b in zip(bounds, bounds[1:])]


def plan_groups(trainers: dict[str, Trainer], budget: int | None = None) -> GroupPlan:
    """Side-by-side groups of a trial's members (dict in the members' order), each split into chunks
    that fit `budget` bytes of step memory (None: no limit)."""
    configs = [(name, t.cfg) for name, t in trainers.items()]
    plan = GroupPlan([])
    keys = splitting_keys(configs)
    for group in side_by_side_groups(configs):
        if len(group) == 1:
            plan.groups.append(group)
            continue
        per_member = step_bytes(max((trainers[n] for n in group), key=lambda t: t.prompts.blocks))  # the largest
        chunks = chunked(group, per_member, budget)
        if len(chunks) > 1:
            plan.notes.append(f"{len(group)} members side by side need about {per_member * len(group) / 2**20:.0f} "
                              f"MiB per step, the trial's share of {trainers[group[0]].device} leaves "
                              f"{budget / 2**20:.0f} MiB: trained in {len(chunks)} chunks of "
                              f"{', '.join(str(len(c)) for c in chunks)}")
        plan.groups += chunks
    if keys:
        plan.notes.insert(0, f"members differ in {', '.join(keys)}: trained in {len(plan.groups)} side-by-side groups")
    return plan


def train_epoch(trainers: dict[str, Trainer], groups: list[list[str]]) -> dict[str, dict]:
    """One epoch of every member, group by group: {name: metrics} in the members' order."""
    results = {}
    for group in groups:
        results.update(zip(group, train_side_by_side([trainers[n] for n in group])))
    return {name: results[name] for name in trainers}
