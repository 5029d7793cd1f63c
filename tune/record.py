"""The study's Optuna record, optuna.db: every finished trial of every study kind, the one record that
optuna-dashboard shows while the study runs and that the report and launch.py's summary read after.

The driver writes it from finished Tune trials only, keyed by Tune's trial id, so a killed driver leaves
no stale RUNNING trial in it and a resumed one adds no duplicate. The value is the trial's reported
group mean of the study's metric at its last epoch; the per-epoch values go with it. Those per-epoch
values are part of the callback state that Tune saves with the experiment, so a trial resumed
after a kill still has all of them. A trial recorded as failed that completes on a later resume replaces
its failed entry. On URI storage the record is a local copy, uploaded after every change.
(Tune's OptunaSearch keeps its own in-memory study for the sampler; that one is Tune's business.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ray import tune

from rsnl import storage
from rsnl.errors import ConfigError
from rsnl.study import RECORD_FILE, StudyConfig, distributions, finite, record_params


def local_path(experiment: str) -> Path:
    """Where the driver keeps optuna.db: in the experiment folder, or a local copy for a URI."""
    if storage.is_uri(experiment):
        return storage.mirror_dir(experiment, "records") / RECORD_FILE
    return Path(experiment) / RECORD_FILE


def fetch(experiment: str) -> Path:
    """The local optuna.db, brought up to date with the storage's copy first when the storage is a URI."""
    path = local_path(experiment)
    if storage.is_uri(experiment):
        remote = storage.join(experiment, RECORD_FILE)
        if storage.exists(remote):
            from rsnl.files import atomic_write
            atomic_write(path, storage.read_bytes(remote))
    return path


def storage_url(path) -> str:
    return f"sqlite:///{Path(path).resolve()}"


def open_study(url: str, study: StudyConfig):
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(storage=url, study_name=study.name, load_if_exists=True,
                               direction="maximize" if study.mode == "max" else "minimize")


def frozen_trial(study: StudyConfig, config: dict, history: dict[int, float], last: dict | None, trial_id: str,
                 folder: str, errored: bool = False):
    """An Optuna FrozenTrial for one finished Tune trial: COMPLETE, PRUNED (stopped early) or FAIL."""
    import optuna
    from optuna.trial import TrialState
    value = (last or {}).get(study.metric)
    epochs = study.trial_configs(config)[0][1].epochs
    finished = last is not None and int(last.get("epoch", -1)) + 1 >= epochs
    if errored or not finite(value):
        state, value = TrialState.FAIL, None
    elif not finished:
        state, value = TrialState.PRUNED, None
    else:
        state = TrialState.COMPLETE
    attrs = {"tune_trial_id": trial_id, "trial_folder": folder,
             "epochs_done": int(last.get("epoch", -1)) + 1 if last else 0}
    for k in ("test_acc", "val_acc", "select_precision", "select_recall", "noise_auroc"):
        if last and finite(last.get(k)):
            attrs[k] = float(last[k])
    return optuna.trial.create_trial(
        params=record_params(study, config), distributions=distributions(study), value=value, state=state,
        user_attrs=attrs, intermediate_values={int(e): float(v) for e, v in history.items() if finite(v)})


def replace_trial(url: str, study: StudyConfig, frozen) -> None:
    """Swap the entry of frozen's Tune trial for `frozen`. Optuna cannot change a finished trial, so the
    record is rewritten whole (same study name, trials in the same order)."""
    import optuna
    tid = frozen.user_attrs["tune_trial_id"]
    old = open_study(url, study).get_trials(deepcopy=True)
    trials = [frozen if t.user_attrs.get("tune_trial_id") == tid else t for t in old]
    optuna.delete_study(study_name=study.name, storage=url)
    open_study(url, study).add_trials(trials)


class OptunaRecorder(tune.Callback):
    """Adds each finished Tune trial to optuna.db once (a failed entry may be replaced by a later finish)."""

    def __init__(self, experiment: str, study: StudyConfig):
        self.experiment, self.study = experiment, study
        self.path = local_path(experiment)
        self.history: dict[str, dict[int, float]] = {}
        self._states: dict[str, str] = {}
        self._ostudy = None

    def setup(self, **info):
        fetch(self.experiment)  # continue the copy the storage holds (a resume)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._ostudy = open_study(storage_url(self.path), self.study)
        if storage.is_uri(self.experiment):  # one the storage lacks (a kill before its first upload) goes up
            storage.write_bytes(storage.join(self.experiment, RECORD_FILE), self.path.read_bytes())
        self._states = {t.user_attrs.get("tune_trial_id"): t.state.name
                        for t in self._ostudy.get_trials(deepcopy=False)}

    # Saved with the experiment by Tune and given back on resume.
    def get_state(self) -> dict:
        return {"history": self.history}

    def set_state(self, state: dict) -> None:
        self.history = dict(state.get("history") or {})

    def on_trial_result(self, iteration, trials, trial, result, **info):
        v = result.get(self.study.metric)
        if isinstance(v, (int, float)):
            self.history.setdefault(trial.trial_id, {})[int(result.get("epoch", 0))] = float(v)

    def _record(self, trial, errored: bool):
        tid = trial.trial_id
        before = self._states.get(tid)
        if self._ostudy is None or before in ("COMPLETE", "PRUNED") or (before == "FAIL" and errored):
            return
        history = self.history.get(tid, {})
        if before == "FAIL":  # the epochs it reached before failing, in case a resume started after them
            old = next(t for t in self._ostudy.get_trials(deepcopy=False) if t.user_attrs.get("tune_trial_id") == tid)
            history = {**old.intermediate_values, **history}
        ft = frozen_trial(self.study, trial.config, history, trial.last_result or None, tid, Path(trial.path).name,
                          errored)
        if before is None:
            self._ostudy.add_trial(ft)
        else:
            replace_trial(storage_url(self.path), self.study, ft)
            self._ostudy = open_study(storage_url(self.path), self.study)
        self._states[tid] = ft.state.name
        if not errored:  # finished for good: the experiment state need not carry its history any more
            self.history.pop(tid, None)
        if storage.is_uri(self.experiment):
            storage.write_bytes(storage.join(self.experiment, RECORD_FILE), self.path.read_bytes())

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._record(trial, errored=False)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._record(trial, errored=True)


def read_record(experiment: str, study: StudyConfig) -> list:
    """Every trial optuna.db holds ([] without the file); an unreadable file is one ConfigError line."""
    import optuna
    try:
        path = fetch(experiment)
        if not path.is_file():
            return []
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        return open_study(storage_url(path), study).get_trials(deepcopy=False)
    except Exception as e:  # sqlite, Optuna and the storage fail in many types; all mean the same here
        raise ConfigError(f"{storage.join(experiment, RECORD_FILE)}: cannot be read ({' '.join(str(e).split())[:200]}"
                          f"); it records which trials finished, so nothing was run: put back a good copy, or "
                          f"start the study again under another --name") from None


def keep_in_record(experiment: str, study: StudyConfig, trials: list) -> None:
    """optuna.db with only `trials` (the others run again as new trials); uploaded for a URI."""
    import optuna
    url = storage_url(local_path(experiment))
    optuna.delete_study(study_name=study.name, storage=url)
    open_study(url, study).add_trials(trials)
    if storage.is_uri(experiment):
        storage.write_bytes(storage.join(experiment, RECORD_FILE), local_path(experiment).read_bytes())


@dataclass
class Tally:
    """What the record says about a study: trials finished (complete or stopped early), failed, and the
    rest of the planned ones (running when interrupted, or never started); the best complete trial."""
    planned: int
    finished: int
    failed: int
    best: dict | None

    @property
    def unfinished(self) -> int:
        return max(self.planned - self.finished - self.failed, 0)


def tally(experiment: str, study: StudyConfig) -> Tally:
    import optuna
    path = fetch(experiment)
    trials = []
    if path.is_file():
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        trials = optuna.load_study(study_name=study.name, storage=storage_url(path)).get_trials(deepcopy=False)
    states = [t.state.name for t in trials]
    done = [t for t in trials if t.state.name == "COMPLETE" and finite(t.value)]
    best = None
    if done:
        pick = max if study.mode == "max" else min
        t = pick(done, key=lambda t: t.value)
        best = {"params": t.params, "value": t.value, **t.user_attrs}
    return Tally(planned=study.num_trials(), finished=states.count("COMPLETE") + states.count("PRUNED"),
                 failed=states.count("FAIL"), best=best)
