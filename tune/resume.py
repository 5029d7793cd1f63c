"""How a resume continues: from Tune's run state where it is whole, else rebuilt from rsnl's own record.

Tune saves its run state every few seconds, one file after the other (the experiment state, the
searcher's, the callbacks'; a local copy overwrites in place), and writes tuner.pkl first of all. A
driver killed at any moment can leave none of it, tuner.pkl alone, files of different saves, or a
file cut off. rsnl's own record is whole at every moment: rsnl_study.yaml, optuna.db (a finished
trial is recorded before Tune's next save) and the trial folders.

`plan_resume` reads both, before Ray starts:

- done: every planned trial is finished in the record; nothing runs.
- restore: Tune's newest save is whole (every file there and readable, all from the same save) and
  knows every finished trial. Tune continues it; tuner.pkl is written afresh from the study first,
  and folders of trials that save never knew (started after it) are removed: Tune starts their
  points again.
- rebuild: anything else. The finished trials stay as they are (folders and record); Tune's state,
  the other folders and the record's failed entries go; a new Tune run covers exactly the rest: the
  grid points not finished, or the remaining samples of a search (Optuna's sampler is told the
  finished trials' values). Those trials start from their first epoch.

A resume is refused only where the record cannot be read (tune.record.read_record): it is what says
which trials finished.
"""

from __future__ import annotations

import json
import pickle
import re
from dataclasses import dataclass, field

from ray.tune.search import Searcher

from rsnl import storage
from rsnl.study import StudyConfig, record_params
from tune.record import keep_in_record, read_record

# Tune's trial id starts every trial folder's name: <5 hex>_<5 digits> from a grid or random search,
# 8 hex from a searcher (Optuna, a rebuilt grid)
TRIAL_FOLDER = re.compile(r"^([0-9a-f]{5}_\d{5}|[0-9a-f]{8})(_|$)")
TUNE_FILE = re.compile(r"^((experiment_state|callback-states|basic-variant-state|search_gen_state|searcher-state)"
                       r"-.+|tuner\.pkl|\.validate_storage_marker)$")


@dataclass
class Plan:
    kind: str                                          # done, restore, rebuild, new (a rebuild keeping nothing)
    finished: list = field(default_factory=list)       # the record's finished trials (Optuna FrozenTrials)
    known: set[str] = field(default_factory=set)       # restore: the trial folders Tune's save knows
    points: list[dict] | None = None                   # rebuild of a grid: the points to run
    samples: int = 0                                   # rebuild of a search: the suggestions to run
    why: str = ""                                      # why Tune's state is not used

    def line(self) -> str | None:
        """What the console says about it (nothing for a plain restore)."""
        if self.kind == "done":
            return "[rsnl] every trial of the study has finished; nothing to run"
        if self.kind == "rebuild":
            left = len(self.points) if self.points is not None else self.samples
            return (f"[rsnl] Tune's run state is {self.why}; rebuilt from the study's record: "
                    f"{len(self.finished)} finished trial(s) kept, {left} to run from their first epoch")
        if self.kind == "new":
            return f"[rsnl] Tune's run state is {self.why} and no trial had finished: the study starts again"
        return None


def plan_resume(exp: str, study: StudyConfig) -> Plan:
    """How the resume of the study at `exp` goes on; reads, changes nothing."""
    finished = finished_trials(exp, study)
    if len(finished) >= study.num_trials():
        return Plan("done", finished)
    fs, path = storage.filesystem(exp)
    saved, why = whole_save(fs, path)
    if saved is not None and {t.user_attrs.get("tune_trial_id") for t in finished} <= set(saved.values()):
        return Plan("restore", finished, known=set(saved))
    if saved is not None:
        why = "older than the record (a trial finished after Tune's last save)"
    return rebuild_plan(exp, study, why, finished)


def rebuild_plan(exp: str, study: StudyConfig, why: str, finished: list | None = None) -> Plan:
    finished = finished_trials(exp, study) if finished is None else finished
    if not finished:
        return Plan("new", why=why)
    if study.kind == "grid":
        done = [t.params for t in finished]
        points = [p for p in study.grid_points() if record_params(study, p) not in done]
        return Plan("rebuild", finished, points=points, why=why)
    return Plan("rebuild", finished, samples=study.num_trials() - len(finished), why=why)


def finished_trials(exp: str, study: StudyConfig) -> list:
    return [t for t in read_record(exp, study) if t.state.name in ("COMPLETE", "PRUNED")]


def prepare(plan: Plan, exp: str, study: StudyConfig) -> None:
    """Make the experiment what the plan continues from. restore: folders of trials Tune's save does not
    know go (Tune starts their points again). rebuild, new: Tune's state, every trial folder but the
    finished ones, and the record's other entries go."""
    import pyarrow.fs
    fs, path = storage.filesystem(exp)
    keep = plan.known if plan.kind == "restore" else {t.user_attrs.get("trial_folder") for t in plan.finished}
    for info in fs.get_file_info(pyarrow.fs.FileSelector(path)):
        if info.type == pyarrow.fs.FileType.Directory and TRIAL_FOLDER.match(info.base_name):
            if info.base_name not in keep:
                fs.delete_dir(info.path)
        elif plan.kind != "restore" and info.type == pyarrow.fs.FileType.File and TUNE_FILE.match(info.base_name):
            fs.delete_file(info.path)
    if plan.kind != "restore" and len(read_record(exp, study)) != len(plan.finished):
        keep_in_record(exp, study, plan.finished)


def trial_folders(fs, path: str) -> list[str]:
    import pyarrow.fs
    return [i.base_name for i in fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
            if i.type == pyarrow.fs.FileType.Directory and TRIAL_FOLDER.match(i.base_name)]


def whole_save(fs, path: str) -> tuple[dict[str, str] | None, str]:
    """({trial folder: trial id}, "") of Tune's newest save if it is whole, else (None, what is wrong)."""
    import pyarrow.fs
    from ray import cloudpickle

    names = {i.base_name for i in fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))}
    sessions = sorted(n[len("experiment_state-"):-len(".json")] for n in names
                      if n.startswith("experiment_state-") and n.endswith(".json"))
    if not sessions:
        return None, "missing (the driver was stopped before Tune first saved it)"
    session = sessions[-1]

    def read(name, load):
        if name not in names:
            return None
        try:
            with fs.open_input_stream(f"{path}/{name}") as f:
                return load(f.read())
        except Exception:  # cut off mid-write: any decoding error
            return None

    partial = None, "partial (the driver was stopped while Tune saved it)"
    state = read(f"experiment_state-{session}.json", json.loads)
    callbacks = read(f"callback-states-{session}.pkl", cloudpickle.loads)
    if not isinstance(state, dict) or not isinstance(callbacks, dict):
        return partial
    try:
        trials = {json.loads(t)["relative_logdir"]: json.loads(t)["trial_id"] for t, *_ in state["trial_data"]}
        step = state["runner_data"]["_iteration"]
    except (KeyError, TypeError, ValueError):
        return partial
    guard = next((c for c in callbacks.values() if isinstance(c, dict) and "step" in c), None)
    if guard is not None and guard["step"] != step:
        return partial  # the callbacks' state is from another save
    variants = read(f"basic-variant-state-{session}.json", cloudpickle.loads)
    if isinstance(variants, dict):
        created = sum(getattr(it, "counter", 0) for it in variants.get("_iterators", []))
    else:
        search = read(f"search_gen_state-{session}.json", cloudpickle.loads)
        if not isinstance(search, dict) or f"searcher-state-{session}.pkl" not in names:
            return partial
        created = search.get("counter")
    if created != len(trials):
        return partial  # the searcher's state is from another save
    return trials, ""


class Points(Searcher):
    """A searcher that hands out fixed configs, each once: a rebuilt grid's remaining points."""

    def __init__(self, points: list[dict], metric: str | None = None, mode: str | None = None):
        super().__init__(metric=metric, mode=mode)
        self.points = list(points)
        self.given = 0

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        self._metric, self._mode = metric or self._metric, mode or self._mode
        return True

    def suggest(self, trial_id: str):
        if self.given >= len(self.points):
            return Searcher.FINISHED
        self.given += 1
        return dict(self.points[self.given - 1])

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
        pass

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump({"points": self.points, "given": self.given}, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            state = pickle.load(f)
        self.points, self.given = state["points"], state["given"]


def rebuilt_search(plan: Plan, study: StudyConfig):
    """(search_alg, num_samples) of a rebuilt run."""
    if plan.points is not None:
        return Points(plan.points), len(plan.points)
    if study.kind == "optuna":
        from ray.tune.search.optuna import OptunaSearch
        done = [t for t in plan.finished if t.state.name == "COMPLETE" and t.value is not None]
        search = OptunaSearch(seed=study.search_seed, points_to_evaluate=[t.params for t in done] or None,
                              evaluated_rewards=[t.value for t in done] or None)
        return search, plan.samples
    return None, plan.samples  # random: Tune's own sampling
