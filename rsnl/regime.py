"""The test-bed's regime figures: what a stand-in VLM is calibrated on, baseline behaviour only.

A stand-in stands in for CLIP RN50 on DTD, so it should meet DTD's regime: a weak zero-shot prompt,
few-shot CoOp well above it, CoOp hurt by label noise about as much as on DTD, and a linear probe on
the frozen image features about level with CoOp. The noisy-label methods' own results are never
among these figures: they are what the test-bed then measures (docs/testbed.md).

    from rsnl.regime import regime_figures, regime_lines
    print("\\n".join(regime_lines(regime_figures(cfg, clip, bank, seeds=(1, 2, 3, 4, 5)))))
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rsnl.config import TrialConfig

NOISE = 0.5  # the regime's noisy point: 50 % ptnl noise
METHODS = Path(__file__).parent / "configs" / "methods"  # CoOp: coop.yaml


@dataclass
class Regime:
    zeroshot: float               # test accuracy of "a photo of a {class}.", %
    coop_clean: list[float]       # 16-shot CoOp at 0 % noise, last-epoch test accuracy per seed, %
    coop_noisy: list[float]       # the same at 50 % ptnl noise, same seeds
    probe: list[float]            # logistic regression on the frozen image features, 0 % noise, per seed
    seeds: tuple
    # mean cosine between CoOp's class features (last epoch) per seed, at 0 and 50 % noise
    clean_class_cosine: list[float] | None = None
    noisy_class_cosine: list[float] | None = None

    @property
    def coop_loss(self) -> np.ndarray:
        """Per seed: CoOp's accuracy at 0 % minus at 50 % noise (paired by seed)."""
        return np.asarray(self.coop_clean) - np.asarray(self.coop_noisy)


# (figure, DTD with CLIP RN50 (CoOp's and PTNL's papers), target, test)
TARGETS = (
    ("zero-shot (%)", "42.3", "40-55", lambda r: 40 <= r.zeroshot <= 55),
    ("CoOp at 0 % minus zero-shot (points)", "+20.6", ">= +15", lambda r: np.mean(r.coop_clean) - r.zeroshot >= 15),
    ("CoOp's loss, 0 -> 50 % ptnl noise (points)", "16.7", "14-20", lambda r: 14 <= r.coop_loss.mean() <= 20),
    ("  its spread over seeds (std, points)", "-", "<= 5", lambda r: len(r.seeds) < 2 or r.coop_loss.std(ddof=1) <= 5),
    ("linear probe minus CoOp at 0 % (points)", "about 0", "within 5",
     lambda r: abs(np.mean(r.probe) - np.mean(r.coop_clean)) <= 5),
)


def linear_probe(cfg: TrialConfig, bank, seed: int) -> float:
    """Test accuracy (%) of a logistic regression on the frozen image features of the trial's clean
    few-shot sample (scikit-learn's default L2 strength, C = 1), as CLIP's linear-probe baseline."""
    from sklearn.linear_model import LogisticRegression
    from rsnl.inputs import trial_data
    data = trial_data(cfg.replace(noise_rate=0.0, seed=seed), bank)
    probe = LogisticRegression(C=1.0, max_iter=5000).fit(data.train.float().numpy(), data.sample.labels)
    return 100.0 * float((probe.predict(data.test.float().numpy()) == data.test_labels).mean())


def regime_figures(cfg: TrialConfig, clip, bank, seeds=(1, 2, 3, 4, 5)) -> Regime:
    """Every figure on the test-bed's protocol `cfg` (its trainer settings), CoOp on each seed's draw (the
    runs trained side by side: the same numbers as one at a time)."""
    from rsnl.config import load_yaml
    from rsnl.members import run_side_by_side
    from rsnl.trainer import build_trainer
    from rsnl.zeroshot import zeroshot_accuracy

    coop = load_yaml(METHODS / "coop.yaml")
    runs = [(rate, s) for rate in (0.0, NOISE) for s in seeds]
    histories = run_side_by_side([build_trainer(cfg.replace(noise_rate=rate, seed=s, noise_type="ptnl", **coop),
                                                clip, bank) for rate, s in runs])
    last = {run: h[-1] for run, h in zip(runs, histories)}
    zeroshot = zeroshot_accuracy(bank.test, bank.zeroshot_text, bank.test_labels)
    return Regime(zeroshot=zeroshot, coop_clean=[last[0.0, s]["test_acc"] for s in seeds],
                  coop_noisy=[last[NOISE, s]["test_acc"] for s in seeds],
                  probe=[linear_probe(cfg, bank, s) for s in seeds], seeds=tuple(seeds),
                  clean_class_cosine=[last[0.0, s]["class_cosine"] for s in seeds],
                  noisy_class_cosine=[last[NOISE, s]["class_cosine"] for s in seeds])


def regime_lines(r: Regime) -> list[str]:
    """The figures beside DTD's and the targets, one line each, marked met or not."""
    clean, noisy, loss = np.mean(r.coop_clean), np.mean(r.coop_noisy), r.coop_loss
    sd = loss.std(ddof=1) if len(loss) > 1 else float("nan")
    values = (f"{r.zeroshot:.2f}", f"{clean - r.zeroshot:+.2f} (CoOp {clean:.2f})",
              f"{loss.mean():.2f} (CoOp at 50 %: {noisy:.2f}; per seed {', '.join(f'{x:.1f}' for x in loss)})",
              f"{sd:.2f}", f"{np.mean(r.probe) - clean:+.2f} (probe {np.mean(r.probe):.2f})")
    lines = [f"[rsnl] regime over seeds {', '.join(map(str, r.seeds))} (DTD with CLIP RN50 | target | here):"]
    for (name, dtd, target, test), value in zip(TARGETS, values):
        lines.append(f"  {'ok ' if test(r) else 'OFF'} {name:44s} {dtd:>8s} | {target:>8s} | {value}")
    if r.noisy_class_cosine:  # no target: it tells a seed whose CoOp no longer tells the classes apart
        lines.append(f"      {'mean cosine between CoOp class features':44s} {'-':>8s} | {'-':>8s} | "
                     f"{np.mean(r.clean_class_cosine):.3f} at 0 %; at 50 % per seed "
                     f"{', '.join(f'{x:.3f}' for x in r.noisy_class_cosine)} (1: one feature for all classes)")
    return lines


def meets_targets(r: Regime) -> bool:
    return all(test(r) for *_, test in TARGETS)
