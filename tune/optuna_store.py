"""The study's Optuna record in SQLite, for optuna-dashboard while it runs and for analysis after.

Tune's OptunaSearch keeps its own in-memory study (checkpointed with the experiment, so a resumed
search continues its sampler). The SQLite study here is written from finished Tune trials only, keyed
by Tune's trial id: a killed driver can leave no stale RUNNING trial in it, and a resumed one adds
no duplicate. Its objective is the reported group mean of the study's metric at the last epoch.
"""

from __future__ import annotations

import math
from pathlib import Path

from ray import tune

from tune.study import StudyConfig

DB_NAME = "optuna.db"


def storage_url(experiment_dir) -> str:
    return f"sqlite:///{Path(experiment_dir).resolve() / DB_NAME}"


def distributions(study: StudyConfig) -> dict:
    import optuna.distributions as od
    out = {}
    for key, spec in study.params.items():
        (dist, v), = spec.items()
        out[key] = {
            "choice": lambda: od.CategoricalDistribution(list(v)),
            "grid": lambda: od.CategoricalDistribution(list(v)),
            "uniform": lambda: od.FloatDistribution(v[0], v[1]),
            "loguniform": lambda: od.FloatDistribution(v[0], v[1], log=True),
            "int": lambda: od.IntDistribution(v[0], v[1]),
        }[dist]()
    return out


def open_study(url: str, study: StudyConfig):
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(storage=url, study_name=study.name, load_if_exists=True,
                               direction="maximize" if study.mode == "max" else "minimize")


def frozen_trial(study: StudyConfig, config: dict, history: dict[int, float], last: dict | None,
                 trial_id: str, errored: bool = False):
    """An Optuna FrozenTrial for one finished Tune trial."""
    import optuna
    from optuna.trial import TrialState
    value = (last or {}).get(study.metric)
    finished = last is not None and int(last.get("epoch", -1)) + 1 >= _epochs(study, config)
    if errored or value is None or not math.isfinite(value):
        state, value = TrialState.FAIL, None
    elif not finished:
        state, value = TrialState.PRUNED, None  # stopped early by ASHA
    else:
        state = TrialState.COMPLETE
    attrs = {"tune_trial_id": trial_id}
    for k in ("test_acc", "val_acc", "select_precision", "select_recall", "noise_auroc"):
        if last and isinstance(last.get(k), (int, float)) and math.isfinite(last[k]):
            attrs[k] = float(last[k])
    return optuna.trial.create_trial(
        params={k: config[k] for k in study.params}, distributions=distributions(study), value=value,
        state=state, user_attrs=attrs,
        intermediate_values={int(e): float(v) for e, v in history.items() if math.isfinite(v)})


def _epochs(study: StudyConfig, config: dict) -> int:
    return study.trial_configs(config)[0][1].epochs


def recorded_ids(ostudy) -> set[str]:
    return {t.user_attrs.get("tune_trial_id") for t in ostudy.get_trials(deepcopy=False)}


class OptunaRecorder(tune.Callback):
    """Adds each finished Tune trial to the SQLite study once."""

    def __init__(self, url: str, study: StudyConfig):
        self.url, self.study = url, study
        self.history: dict[str, dict[int, float]] = {}
        self._ostudy = None

    def setup(self, **info):
        self._ostudy = open_study(self.url, self.study)
        self._seen = recorded_ids(self._ostudy)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        v = result.get(self.study.metric)
        if isinstance(v, (int, float)):
            self.history.setdefault(trial.trial_id, {})[int(result.get("epoch", 0))] = float(v)

    def _record(self, trial, errored: bool):
        if self._ostudy is None or trial.trial_id in self._seen:
            return
        ft = frozen_trial(self.study, trial.config, self.history.get(trial.trial_id, {}), trial.last_result or None,
                          trial.trial_id, errored)
        self._ostudy.add_trial(ft)
        self._seen.add(trial.trial_id)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._record(trial, errored=False)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._record(trial, errored=True)
