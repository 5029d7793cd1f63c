"""The method on the test-bed: real images (Fashion-MNIST) and a real, pretrained stand-in VLM, so that
these tests check what the method does, not only that the plumbing runs.

They guard the effects that fmnist-ablation and fmnist-alpha resolve over ten seeds (docs/testbed.md),
with margins from those measurements (50 % ptnl noise, seeds 1-10, paired by seed):
  regime           zero-shot 53.88 %; 16-shot CoOp at 0 % noise 78.55 % (seeds 1-10), 63.83 % at 50 %
  robust vs CoOp   m=1 minus CoOp +10.71 [+2.76, +18.66] (95 % t-interval); m=6 minus CoOp +13.18
                   [+8.83, +17.52]
  blocks           m=6 minus m=1 +2.47 [-2.80, +7.73], not resolved (over seeds 1-40: +1.52 [-0.52,
                   +3.56]), so not guarded; what is resolved is the spread: m=1 loses 10-20 points on a
                   seed now and then, m=6 does not (std over seeds 7.17 against 1.42; in each ten of
                   seeds 1-40 at least 2.3 times as large)
  alpha            m=1 with alpha_base 1 (the prompt similarity alone) minus the default blend -9.99
                   [-15.27, -4.70]; alpha_base 0 (the feature similarity alone) +0.73 [-4.96, +6.43], not
                   resolved, so not guarded (m=6: -9.03 [-11.28, -6.78] and -0.11 [-0.86, +0.65])
  the two sides    AUROC clean vs noisy of the feature similarity 0.978 at every epoch; of the prompt
                   similarity (m=1) 0.80 at epoch 0, rising to 0.955 at the last epoch, below the feature
                   side throughout; G at epoch 0 selects with precision 0.90 (clean share 0.5)
  NLPrompt         last-epoch selection precision 0.966; its accuracy (+8.04 over CoOp with this file's
                   settings) is guarded by none of these tests
Every run is deterministic on one machine. Another CPU rounds the stand-in's build differently in the
last bits, and single seeds then move by up to 10 points; docs/testbed.md gives the margins' figures on
a second build. The runs of a method train side by side (rsnl/members.py), which gives the same numbers
as one at a time.
"""

import numpy as np
import pytest

from analysis.tables import paired_interval
from rsnl.members import run_side_by_side
from rsnl.trainer import build_trainer

pytestmark = pytest.mark.usefixtures("torch_one_thread")
COOP = dict(blocks=1, selector="none", loss="ce")
M1 = dict(blocks=1, selector="gmm", loss="ce")
M6 = dict(blocks=6, selector="gmm", loss="ce")
NLPROMPT = dict(blocks=1, selector="ot", loss="ce+mae")
SEEDS = tuple(range(1, 11))


def run(inputs, **changes) -> list[dict]:
    cfg, clip, bank = inputs
    return build_trainer(cfg.replace(**changes), clip, bank).run()


def run_seeds(inputs, seeds=SEEDS, **changes) -> list[list[dict]]:
    """One history per seed, the seeds trained side by side."""
    cfg, clip, bank = inputs
    return run_side_by_side([build_trainer(cfg.replace(seed=s, **changes), clip, bank) for s in seeds])


def last(histories, key="test_acc") -> np.ndarray:
    return np.array([h[-1][key] for h in histories])


@pytest.fixture(scope="module")
def noisy_runs(testbed_inputs):
    """Histories at 50 % ptnl noise, seeds 1-10: {method: [history per seed]}."""
    return {name: run_seeds(testbed_inputs, noise_rate=0.5, **m)
            for name, m in {"coop": COOP, "m1": M1, "m6": M6, "m1-prompt": dict(M1, alpha_base=1.0)}.items()}


def test_regime_zero_shot_is_weak_and_coop_learns_well_above_it(testbed_inputs):
    coop = run_seeds(testbed_inputs, seeds=(1, 2), noise_rate=0.0, **COOP)
    zeroshot = coop[0][-1]["zeroshot_acc"]
    assert 40.0 <= zeroshot <= 55.0, "the stand-in left its calibrated regime (zero-shot 40-55 %)"
    assert all(h[-1]["zeroshot_acc"] == zeroshot for h in coop)
    assert np.mean(last(coop)) >= zeroshot + 15.0


def test_regime_figures_are_the_runs_they_summarise(testbed_inputs):
    """What `python -m rsnl.pretrain` prints: CoOp at 0 and 50 % on the same draws, a probe about level
    with CoOp (measured 79.86 / 80.07 on seeds 1, 2), each figure marked against its target."""
    from rsnl.regime import TARGETS, regime_figures, regime_lines
    cfg, clip, bank = testbed_inputs
    r = regime_figures(cfg, clip, bank, seeds=(1, 2))
    noisy = run_seeds(testbed_inputs, seeds=(1, 2), noise_rate=0.5, **COOP)
    assert r.coop_noisy == pytest.approx(list(last(noisy)), abs=1e-9)
    assert r.noisy_class_cosine == pytest.approx(list(last(noisy, "class_cosine")), abs=1e-9)
    assert list(r.coop_loss) == pytest.approx([c - n for c, n in zip(r.coop_clean, r.coop_noisy)])
    assert all(abs(p - 80.0) <= 2.0 for p in r.probe), r.probe
    lines = regime_lines(r)
    assert len(lines) == 2 + len(TARGETS) and "seeds 1, 2" in lines[0]
    assert [line.split()[0] for line in lines[1:-1]] == ["ok" if test(r) else "OFF" for *_, test in TARGETS]
    assert lines[-1].endswith(f"{r.noisy_class_cosine[1]:.3f} (1: one feature for all classes)")
    assert lines[1].split()[0] == "ok" and f"{r.zeroshot:.2f}" in lines[1]


def test_epoch0_robust_similarity_separates_clean_from_noisy(noisy_runs):
    for history in noisy_runs["m1"]:
        first = history[0]
        assert first["alpha"] == pytest.approx(0.2)  # mostly the feature similarity at epoch 0
        assert first["noise_auroc"] >= 0.90
        assert first["select_precision"] >= 0.75  # clean share of the sample: 0.5
        assert first["select_recall"] >= 0.75


def test_robust_filter_beats_coop_under_50_percent_noise(noisy_runs):
    coop = last(noisy_runs["coop"])
    for name, floor in (("m1", 4.0), ("m6", 6.0)):
        mean, low, _ = paired_interval(last(noisy_runs[name]) - coop)
        assert mean >= floor and low > 0, (name, mean, low)  # measured m=1 +10.71 [+2.76], m=6 +13.18 [+8.83]
    # CoOp trains on every sample: its kept share and precision are the sample's
    assert all(h[-1]["kept_frac"] == 1.0 and h[-1]["select_precision"] == 0.5 for h in noisy_runs["coop"])


def test_more_blocks_make_the_filter_steadier_under_heavy_noise(noisy_runs):
    """At 50 % noise one block gives up a class or two on some seeds, six blocks do not: their spread over
    seeds is a fraction of one block's (their mean gain, +2.5 here, is not resolved over 40 seeds)."""
    m1, m6 = last(noisy_runs["m1"]), last(noisy_runs["m6"])
    assert m6.std(ddof=1) <= m1.std(ddof=1) / 2, (m1.std(ddof=1), m6.std(ddof=1))  # measured 7.17 vs 1.42
    assert m6.min() >= m1.min() + 5.0, (m1.min(), m6.min())  # measured 58.7 vs 74.8


def test_the_blend_beats_the_prompt_similarity_alone(noisy_runs):
    mean, _, high = paired_interval(last(noisy_runs["m1-prompt"]) - last(noisy_runs["m1"]))
    assert mean <= -4.0 and high < 0, (mean, high)  # measured -9.99 [-15.27, -4.70]
    assert all(h[0]["alpha"] == 1.0 for h in noisy_runs["m1-prompt"])


def test_feature_side_separates_better_and_the_prompt_side_learns(noisy_runs):
    """Per epoch, mean over seeds: the frozen features' similarity separates clean from noisy better than
    the learned prompts' at every epoch, and the prompts' separation grows with training."""
    feature = np.array([[e["feature_auroc"] for e in h] for h in noisy_runs["m1"]]).mean(0)
    prompt = np.array([[e["prompt_auroc"] for e in h] for h in noisy_runs["m1"]]).mean(0)
    assert feature.min() >= 0.95 and (feature > prompt).all(), (feature.min(), (prompt - feature).max())
    assert prompt[-1] >= 0.92 and prompt[-1] >= prompt[0] + 0.08, (prompt[0], prompt[-1])


def test_promptot_selects_mostly_clean_samples_under_50_percent_noise(testbed_inputs):
    for history in run_seeds(testbed_inputs, seeds=(1, 2, 3), noise_rate=0.5, **NLPROMPT):
        last_epoch = history[-1]
        assert last_epoch["select_precision"] >= 0.75  # clean share of the sample: 0.5
        assert 0 < last_epoch["kept_frac"] < 1 and last_epoch["ot_residual"] < 0.1


def test_quickstart_preset_runs_on_the_testbed_and_reports_zero_shot(ray_session, standin_cache, testbed_inputs,
                                                                      tmp_path):
    from analysis import ablation_table, load_experiment
    from tune.run import run_study
    from tune.study import load_study, with_runtime_options

    study = load_study(preset="quickstart", overrides=[f"cache_dir={standin_cache}", "download=false", "epochs=3",
                                                       "group.seed=[1]"])
    study = with_runtime_options(study, storage=str(tmp_path))
    results, exp, _ = run_study(study, log=lambda *_: None)
    assert results.num_errors == 0 and results.num_terminated == 2
    table = ablation_table(load_experiment(exp))
    assert table.rows == ["zero-shot", "coop", "rsnl-m4"] and table.columns[:2] == ["0%", "50%"]
    bank = testbed_inputs[2]
    from rsnl.zeroshot import zeroshot_accuracy
    expected = zeroshot_accuracy(bank.test, bank.zeroshot_text, bank.test_labels)
    assert table.cells[("zero-shot", "50%")].mean == pytest.approx(expected)
