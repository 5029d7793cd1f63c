"""rsnl.members: members trained side by side take, step by step and over a run, what their solo runs take;
a member whose batches are done is not touched; resume, chunks and groups. Digits + rsnl-tiny."""

import math

import pytest
import torch

from rsnl.members import (chunked, plan_groups, side_by_side_groups, splitting_keys, stacked_text_features,
                          run_side_by_side, step_bytes, step_together, train_side_by_side)
from rsnl.models import ensemble_logits
from rsnl.trainer import build_trainer

pytestmark = pytest.mark.usefixtures("torch_one_thread")

# A group whose kept counts differ (the ratio selector fixes them: 20, 40 and 80 of the 80 samples,
# 2, 3 and 5 batches of 16; the GMM and OT members keep what they keep), with different selectors, losses
# (ce+mae has two phases), seeds, noise rates and block counts; two PromptOT members share one Sinkhorn.
MEMBERS = {
    "gmm": {},
    "ratio-25": dict(seed=2, selector="ratio", select_ratio=0.25),
    "ratio-50-m1": dict(seed=3, selector="ratio", select_ratio=0.5, blocks=1),
    "coop-gce": dict(seed=4, noise_rate=0.25, selector="none", loss="gce"),
    "nlprompt": dict(selector="ot", loss="ce+mae", blocks=1),
    "nlprompt-2": dict(seed=2, noise_rate=0.25, selector="ot", loss="ce+mae", blocks=1),  # one Sinkhorn for both
}


def members(inputs, names=MEMBERS, **changes) -> dict:
    cfg, clip, bank = inputs
    return {n: build_trainer(cfg.replace(**MEMBERS[n], **changes), clip, bank) for n in names}


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def same_history(a: list[dict], b: list[dict]):
    """Equal within float tolerance, but for epoch_seconds (a side-by-side member's is its share of the group's)."""
    assert len(a) == len(b)
    for ma, mb in zip(a, b):
        assert set(ma) == set(mb)
        for k in ma:
            if k != "epoch_seconds" and not (math.isnan(ma[k]) and math.isnan(mb[k])):
                assert ma[k] == pytest.approx(mb[k], rel=1e-6, abs=1e-9), k


def optimizer_state(t) -> list[torch.Tensor]:
    return [v.clone() for s in t.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]


def test_each_step_equals_the_solo_step_and_a_member_without_batches_is_untouched(digits_inputs):
    """Step by step through a whole epoch: every active member's text features, logits, loss, gradient
    and update equal its solo run's; a member whose batches are done keeps its context, gradient and
    momentum bit for bit."""
    group, solo = members(digits_inputs), members(digits_inputs)
    with torch.no_grad():
        texts = stacked_text_features([t.prompts for t in group.values()])
    runs = {n: t.begin_epoch(x) for (n, t), x in zip(group.items(), texts)}
    solo_runs = {n: t.begin_epoch() for n, t in solo.items()}
    counts = {n: len(r.batches) for n, r in runs.items()}
    assert counts == {n: len(r.batches) for n, r in solo_runs.items()}
    assert counts["ratio-25"] == 2 and counts["ratio-50-m1"] == 3 and counts["coop-gce"] == 5
    for s in range(max(counts.values())):
        active = [n for n in group if s < counts[n]]
        idle = {n: (group[n].prompts.ctx.detach().clone(), group[n].prompts.ctx.grad.clone(),
                    optimizer_state(group[n])) for n in group if n not in active}
        with torch.no_grad():  # what the step's pass computes, for the logits
            texts = dict(zip(active, stacked_text_features([group[n].prompts for n in active])))
        losses = dict(zip(active, step_together([(group[n], runs[n], runs[n].batches[s]) for n in active])))
        for n in active:
            batch = solo_runs[n].batches[s]
            assert torch.equal(batch.rows, runs[n].batches[s].rows)  # the member's own batch order
            with torch.no_grad():
                solo_text = solo[n].prompts.text_features()
            close(texts[n], solo_text)
            f = solo[n].train_f[batch.rows] if batch.views is None else solo[n].views[batch.views, batch.rows]
            close(ensemble_logits(f, texts[n], group[n].logit_scale), ensemble_logits(f, solo_text, solo[n].logit_scale))
            close(losses[n].detach(), solo[n].train_step(solo_runs[n], batch).detach())
            close(group[n].prompts.ctx.grad, solo[n].prompts.ctx.grad)
            close(group[n].prompts.ctx.detach(), solo[n].prompts.ctx.detach())
        for n, (ctx, grad, state) in idle.items():
            assert torch.equal(group[n].prompts.ctx, ctx) and torch.equal(group[n].prompts.ctx.grad, grad)
            after = optimizer_state(group[n])
            assert len(after) == len(state) and all(torch.equal(a, b) for a, b in zip(after, state))
        assert len(idle) == len(group) - len(active)
    assert any(counts[n] < max(counts.values()) for n in group), "some member sat out steps"


def test_a_run_side_by_side_ends_as_the_solo_runs(digits_inputs):
    """Three epochs: every member's metrics and context as in its solo run (float reduction order could
    make them drift; measured: bit-identical on the CPU, docs/performance.md)."""
    group, solo = members(digits_inputs), members(digits_inputs)
    for _ in range(3):
        train_side_by_side(list(group.values()))
    for n in group:
        same_history(group[n].history, solo[n].run())
        close(group[n].prompts.ctx, solo[n].prompts.ctx)
    # the group's wall time is shared: every member reports the same share
    assert len({t.history[-1]["epoch_seconds"] for t in group.values()}) == 1


def test_text_tower_runs_once_per_step_for_the_whole_group(digits_inputs):
    batches = max(len(t.begin_epoch().batches) for t in members(digits_inputs).values())  # the same draws
    group = members(digits_inputs)
    tower = next(iter(group.values())).prompts.tower
    calls = []
    hook = tower.ln_final.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        train_side_by_side(list(group.values()))
    finally:
        hook.remove()
    assert len(calls) == batches + 2  # plus the selection and the evaluation, for all members at once


def test_resume_side_by_side_continues_exactly_and_across_modes(digits_inputs):
    """A member resumed from its checkpoint continues as it would have: exactly when the group resumes
    side by side; within float tolerance from a checkpoint made one member at a time."""
    names = ["gmm", "ratio-25", "nlprompt"]
    full = members(digits_inputs, names, epochs=4)
    for _ in range(4):
        train_side_by_side(list(full.values()))

    part = members(digits_inputs, names, epochs=4)
    for _ in range(2):
        train_side_by_side(list(part.values()))
    resumed = members(digits_inputs, names, epochs=4)
    for n, t in resumed.items():
        t.load_state_dict(part[n].state_dict())
    run_side_by_side(list(resumed.values()))
    for n in names:
        assert torch.equal(resumed[n].prompts.ctx, full[n].prompts.ctx)
        without_time = lambda h: [{k: v for k, v in m.items() if k != "epoch_seconds"} for m in h]  # noqa: E731
        assert repr(without_time(resumed[n].history)) == repr(without_time(full[n].history))

    # made one at a time (batch_members false), continued side by side: batch_members is where, not what
    alone = members(digits_inputs, names, epochs=4, batch_members=False)
    for t in alone.values():
        t.train_epoch()
    crossed = members(digits_inputs, names, epochs=4)
    for n, t in crossed.items():
        t.load_state_dict(alone[n].state_dict())
    run_side_by_side(list(crossed.values()))
    for n in names:
        same_history(crossed[n].history, full[n].history)
        close(crossed[n].prompts.ctx, full[n].prompts.ctx)


def test_a_tight_memory_budget_trains_the_group_in_chunks_with_the_same_results(digits_inputs):
    group = members(digits_inputs)
    per_member = step_bytes(next(iter(group.values())))
    assert per_member > 0
    plan = plan_groups(group, budget=2 * per_member)  # two members of the most blocks fit
    assert plan.groups == [["gmm", "ratio-25"], ["ratio-50-m1", "coop-gce"], ["nlprompt", "nlprompt-2"]]
    assert len(plan.notes) == 1 and plan.notes[0].endswith("trained in 3 chunks of 2, 2, 2"), plan.notes
    assert plan_groups(group, budget=None).groups == [list(MEMBERS)]
    assert plan_groups(group, budget=100 * per_member).notes == []

    from rsnl.members import train_epoch
    whole = members(digits_inputs)
    for _ in range(2):
        chunked_metrics = train_epoch(group, plan.groups)
        whole_metrics = train_epoch(whole, [list(MEMBERS)])
        assert list(chunked_metrics) == list(MEMBERS) == list(whole_metrics)
    for n in MEMBERS:
        same_history(group[n].history, whole[n].history)
        close(group[n].prompts.ctx, whole[n].prompts.ctx)


def test_chunks_are_consecutive_near_equal_and_fit():
    names = [f"m{i}" for i in range(12)]
    assert chunked(names, 10, None) == [names]
    assert chunked(names, 10, 120) == [names]
    assert [len(c) for c in chunked(names, 10, 119)] == [6, 6]
    assert [len(c) for c in chunked(names, 10, 50)] == [4, 4, 4]
    assert [len(c) for c in chunked(names, 10, 5)] == [1] * 12  # one member alone always runs
    assert sum(chunked(names, 10, 35), []) == names


def test_step_memory_grows_with_the_blocks(digits_inputs):
    two = step_bytes(members(digits_inputs, ["gmm"])["gmm"])
    four = step_bytes(members(digits_inputs, ["gmm"], blocks=4)["gmm"])
    assert 1.6 < four / two < 2.2  # the activations scale with the blocks; the frozen weights are not counted


def test_which_members_train_together(digits_inputs):
    cfg = digits_inputs[0]
    configs = [("a", cfg), ("b", cfg.replace(seed=2, blocks=4, selector="none")), ("c", cfg.replace(n_ctx=8)),
               ("d", cfg.replace(noise_rate=0.25)), ("e", cfg.replace(seed=5, batch_members=False))]
    assert side_by_side_groups(configs) == [["a", "b", "d"], ["c"], ["e"]]
    assert splitting_keys(configs) == ["n_ctx"]
    assert splitting_keys(configs[:2]) == [] and side_by_side_groups(configs[:2]) == [["a", "b"]]
    alone = [(n, c.replace(batch_members=False)) for n, c in configs[:3]]
    assert side_by_side_groups(alone) == [["a"], ["b"], ["c"]] and splitting_keys(alone) == []

    trainers = {n: build_trainer(c.replace(epochs=1), *digits_inputs[1:]) for n, c in configs}
    plan = plan_groups(trainers)
    assert plan.groups == [["a", "b", "d"], ["c"], ["e"]]
    assert plan.notes == ["members differ in n_ctx: trained in 3 side-by-side groups"]
    with pytest.raises(ValueError, match="need the same text tower, classes and context shape"):
        stacked_text_features([trainers["a"].prompts, trainers["c"].prompts])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh)")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_side_by_side_under_autocast_on_cuda(digits_inputs, precision):
    """Autocast and, under fp16, one gradient scaler per member: a run side by side as its solo runs."""
    names = ["gmm", "ratio-25", "nlprompt"]
    group = members(digits_inputs, names, device="cuda", precision=precision)
    solo = members(digits_inputs, names, device="cuda", precision=precision)
    for _ in range(3):
        train_side_by_side(list(group.values()))
    for n in names:
        solo[n].run()
        torch.testing.assert_close(group[n].prompts.ctx, solo[n].prompts.ctx, rtol=1e-3, atol=1e-4)
        assert group[n].history[-1]["kept_frac"] == pytest.approx(solo[n].history[-1]["kept_frac"], abs=0.05)
