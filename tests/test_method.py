"""The method on the test-bed: real images (Fashion-MNIST) and a real, pretrained stand-in VLM, so that
these tests check what the method does, not only that the plumbing runs.

Thresholds come from measurements on this test-bed (docs/testbed.md) with a safety margin:
  regime           zero-shot 53.88 %; 16-shot CoOp at 0 % noise 78.09 / 78.98 (seeds 1, 2)
  50 % ptnl noise  epoch-0 AUROC of G 0.958 / 0.975 / 0.979 and selection precision 0.902 / 0.902 / 0.867
                   (robust m=2, seeds 1-3; the clean share is 0.5); last-epoch test accuracy, mean of
                   seeds 1-3: CoOp 67.94, robust m=2 76.38, m=4 74.40
  NLPrompt, 50 %   last-epoch selection precision 0.885 / 0.879 / 0.985 (seeds 1-3); its accuracy varies
                   too much over seeds (57.9 / 63.9 / 79.0) for a threshold to mean anything
Every run is deterministic, so a failure here means the numbers changed, not bad luck.
"""

import numpy as np
import pytest

from rsnl.trainer import build_trainer

pytestmark = pytest.mark.usefixtures("torch_one_thread")
COOP = dict(blocks=1, selector="none", loss="ce")
SEEDS = (1, 2, 3)


def run(inputs, **changes) -> list[dict]:
    cfg, clip, bank = inputs
    return build_trainer(cfg.replace(**changes), clip, bank).run()


@pytest.fixture(scope="module")
def noisy_runs(testbed_inputs):
    """Last-epoch metrics and epoch-0 selection at 50 % ptnl noise: {method: [history per seed]}."""
    methods = {"coop": COOP, "m2": dict(blocks=2, selector="gmm", loss="ce"),
               "m4": dict(blocks=4, selector="gmm", loss="ce"),
               "nlprompt": dict(blocks=1, selector="ot", loss="ce+mae")}
    return {name: [run(testbed_inputs, noise_rate=0.5, seed=s, **m) for s in SEEDS] for name, m in methods.items()}


def test_regime_zero_shot_is_weak_and_coop_learns_well_above_it(testbed_inputs):
    coop = [run(testbed_inputs, noise_rate=0.0, seed=s, **COOP) for s in (1, 2)]
    zeroshot = coop[0][-1]["zeroshot_acc"]
    assert 40.0 <= zeroshot <= 55.0, "the stand-in left its calibrated regime (zero-shot 40-55 %)"
    assert all(h[-1]["zeroshot_acc"] == zeroshot for h in coop)
    assert np.mean([h[-1]["test_acc"] for h in coop]) >= zeroshot + 15.0


def test_epoch0_robust_similarity_separates_clean_from_noisy(noisy_runs):
    for history in noisy_runs["m2"]:
        first = history[0]
        assert first["alpha"] == pytest.approx(0.2)  # mostly the feature similarity at epoch 0
        assert first["noise_auroc"] >= 0.90
        assert first["select_precision"] >= 0.75  # clean share of the sample: 0.5
        assert first["select_recall"] >= 0.75


def test_robust_filter_beats_coop_under_50_percent_noise(noisy_runs):
    mean = {k: np.mean([h[-1]["test_acc"] for h in runs]) for k, runs in noisy_runs.items()}
    assert mean["m2"] >= mean["coop"] + 3.0, mean
    assert mean["m4"] >= mean["coop"] + 3.0, mean
    # CoOp trains on every sample: its kept share and precision are the sample's
    assert all(h[-1]["kept_frac"] == 1.0 and h[-1]["select_precision"] == 0.5 for h in noisy_runs["coop"])


def test_promptot_selects_mostly_clean_samples_under_50_percent_noise(noisy_runs):
    for history in noisy_runs["nlprompt"]:
        last = history[-1]
        assert last["select_precision"] >= 0.75  # clean share of the sample: 0.5
        assert 0 < last["kept_frac"] < 1 and last["ot_residual"] < 0.1


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
