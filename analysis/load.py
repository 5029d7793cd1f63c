"""Read an experiment into one tidy DataFrame: one row per run and epoch, without Ray.

A "run" is one (trial, group member): an Optuna trial scored on seeds 1 and 2 gives two runs, each
with its own noise_rate/seed columns, so tables and curves treat every study kind alike. Only files
are read, each through rsnl.study (the owner of the study's format): rsnl_study.yaml, the Optuna record
optuna.db, and in each trial folder Tune's params.json, result.json and error.txt and rsnl's
rsnl_trial.json (the configs the trial ran, so nothing is rebuilt or re-validated with later code).
This works on a copied or moved folder, on a study in a bucket (s3://..., copied to a local mirror
without its checkpoints), and while the study is still running. A trial's status comes from the
record when it finished; else from its folder (running, or failed with error.txt). Trials that
never started have no folder; `df.attrs["planned"]` says how many the study has.
"""

from __future__ import annotations

import math
import sqlite3
import tempfile
import warnings
from pathlib import Path

import pandas as pd

from rsnl import storage
from rsnl.errors import UserError
from rsnl.study import (EPOCH_METRICS, RECORD_FILE, STUDY_FILE, TRIAL_FILE, error_line, flatten_variant, member_name,
                        read_json, read_stored)

# The epoch's learning rate would overwrite the config's base `lr` (a searchable key).
METRICS = tuple(k for k in EPOCH_METRICS if k not in ("epoch", "ot_residual"))
METRIC_COLUMNS = {k: ("epoch_lr" if k == "lr" else k) for k in METRICS}
FINISHED, FAILED, RUNNING = "TERMINATED", "ERROR", "RUNNING"
ID_COLUMNS = ("trial_id", "trial", "status", "error", "member", "run", "method", "variant", "started")


def experiment_dir(path) -> Path:
    """The folder itself (a URI is mirrored to a local folder first), or a one-line FileNotFoundError /
    ValueError if it holds no Tune results."""
    if storage.is_uri(str(path)):
        path = mirror(str(path))
    exp = Path(path).expanduser()
    if not exp.is_dir():
        raise FileNotFoundError(f"{exp}: no such experiment folder (expected STORAGE/NAME of a study)")
    if not _trial_dirs(exp) and not (exp / STUDY_FILE).is_file():
        raise ValueError(f"{exp}: holds no study results (no trial folders, no {STUDY_FILE}); "
                         f"is it STORAGE/NAME of a study that has started?")
    return exp


def mirror(uri: str) -> Path:
    """A local copy of an experiment in a bucket, without checkpoints (what the analysis reads)."""
    try:
        if not storage.exists(storage.join(uri, STUDY_FILE)):
            raise FileNotFoundError(f"{uri}: no such experiment ({STUDY_FILE} missing; expected STORAGE/NAME)")
        return storage.download(uri, storage.mirror_dir(uri, "mirrors"),
                                skip=lambda rel: any(p.startswith("checkpoint_") for p in rel.split("/")))
    except OSError as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise FileNotFoundError(f"{uri}: cannot be read ({' '.join(str(e).split())[:200]})") from None


def read_study(exp):
    """The StudyConfig stored with the experiment, read as it was written (not re-validated), or None."""
    if not (Path(exp) / STUDY_FILE).is_file():
        return None
    try:
        return read_stored(str(exp), check=False)
    except (UserError, ValueError, TypeError) as e:  # the trial folders are still readable
        warnings.warn(f"{Path(exp) / STUDY_FILE}: cannot be read ({e}); using trial folders only")
        return None


def record_study(exp, study):
    """The Optuna study of optuna.db, copied into memory (None without a record): what optuna-dashboard
    shows. The file is copied with SQLite's backup first, so a driver writing it meanwhile is neither
    blocked nor seen half-way."""
    import optuna
    path = Path(exp) / RECORD_FILE
    if study is None or not path.is_file():
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    memory = optuna.create_study(study_name=study.name, direction="maximize" if study.mode == "max" else "minimize")
    with tempfile.TemporaryDirectory() as d:
        copy = Path(d) / RECORD_FILE
        src, dst = sqlite3.connect(f"file:{path}?mode=ro", uri=True), sqlite3.connect(copy)
        try:
            src.backup(dst)
        finally:
            src.close()
            dst.close()
        disk = optuna.storages.RDBStorage(f"sqlite:///{copy}")
        try:
            memory.add_trials(optuna.load_study(study_name=study.name, storage=disk).get_trials())
        except KeyError:  # the file holds no study of this name yet
            pass
        finally:
            disk.engine.dispose()
    return memory


def read_record(exp, study) -> dict[str, dict]:
    """{Tune trial id: {state, value}} of the trials optuna.db records ({} without a record)."""
    memory = record_study(exp, study)
    if memory is None:
        return {}
    return {t.user_attrs.get("tune_trial_id"): {"state": t.state.name, "value": t.value}
            for t in memory.get_trials(deepcopy=False)}


def read_results(trial_dir) -> list[dict]:
    """The trial's result.json lines, one per epoch (the last report of an epoch wins after a retry)."""
    path = Path(trial_dir) / "result.json"
    if not path.is_file():
        return []
    import json
    by_epoch: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # a line being written right now
            continue
        if isinstance(row, dict) and "epoch" in row:
            by_epoch[int(row["epoch"])] = row
    return [by_epoch[e] for e in sorted(by_epoch)]


def _trial_dirs(exp: Path) -> list[Path]:
    return sorted(p for p in exp.iterdir() if p.is_dir() and any((p / f).is_file() for f in
                                                                  (TRIAL_FILE, "params.json", "result.json")))


def _member_configs(tdir: Path, study) -> tuple[str | None, dict, dict[str, dict]]:
    """(trial id, params, member name -> full trial config) as the trial recorded them; for a trial that
    has not written its record yet, no id and the stored study's values with the params (not validated)."""
    if (tdir / TRIAL_FILE).is_file():
        record = read_json(tdir / TRIAL_FILE)
        return record.get("trial_id"), record.get("params") or {}, record["members"]
    params = read_json(tdir / "params.json") if (tdir / "params.json").is_file() else {}
    base = {**(study.trial if study else {}), **flatten_variant(params)}
    members = study.group_members if study else [{}]
    return None, params, {member_name(m): {**base, **m} for m in members}


def method_label(config: dict, study=None) -> str:
    """The row of the ablation table: the variant's name, else prompt blocks / selector / loss
    (plus any other discrete grid axis, so that different grid points are not pooled)."""
    v = config.get("variant")
    if isinstance(v, str) and v:
        return v
    label = f"m={config.get('blocks')} {config.get('selector')}/{config.get('loss')}"
    if study is not None and study.kind == "grid":
        extra = [k for k in study.params if k not in ("noise_rate", "seed", "blocks", "selector", "loss")]
        label += "".join(f" {k}={config.get(k)}" for k in extra)
    return label


def load_experiment(path) -> pd.DataFrame:
    """One row per run (trial x group member) and epoch; see the module docstring.

    Columns: trial_id, trial (folder name), status (TERMINATED, ERROR, RUNNING), error (exception line
    of a failed trial), member, run, method, variant, started (the trial's start, unix time), epoch
    (0-indexed, NaN for a run without results), the metrics of METRICS (the epoch's `lr` as epoch_lr),
    objective (the trial's reported group mean of the study's metric), complete (the run reached its
    last epoch), then every trial-config key (noise_rate, seed, blocks, alpha_base, ...).
    df.attrs holds path, study (StudyConfig or None), name, kind, metric, mode, searched (param keys),
    planned (trials the study has).
    """
    exp = experiment_dir(path)
    study = read_study(exp)
    record = read_record(exp, study)
    metric = study.metric if study is not None else "val_acc"
    rows: list[dict] = []
    for tdir in _trial_dirs(exp):
        rows += _trial_rows(tdir, record, study, metric)
    df = pd.DataFrame(rows)
    if df.empty:
        raise ValueError(f"{exp}: holds no trials yet")
    df["epoch"] = pd.to_numeric(df["epoch"], errors="coerce")
    lead = [c for c in ID_COLUMNS if c in df] + ["epoch", *METRIC_COLUMNS.values(), "objective", "complete",
                                                  "training_iteration", "time_total_s"]
    lead = [c for c in lead if c in df]
    df = df[lead + [c for c in df.columns if c not in lead]]
    df = df.sort_values(["trial", "member", "epoch"], kind="stable").reset_index(drop=True)
    df.attrs.update(path=str(exp), study=study, name=study.name if study else exp.name,
                    kind=study.kind if study else "grid", metric=metric,
                    mode=study.mode if study else "max", searched=list(study.params) if study else [],
                    planned=study.num_trials() if study else df["trial"].nunique())
    return df


def _trial_rows(tdir: Path, record: dict, study, metric: str) -> list[dict]:
    trial_id, params, configs = _member_configs(tdir, study)
    results = read_results(tdir)
    trial_id = trial_id or (results[0].get("trial_id") if results else tdir.name)
    recorded = record.get(trial_id)
    if recorded is not None:
        status = FAILED if recorded["state"] == "FAIL" else FINISHED
    else:  # not finished yet (or a study without a record): judge from the folder
        planned = max(int(c.get("epochs") or 0) for c in configs.values())
        reached = bool(results) and int(results[-1]["epoch"]) + 1 >= planned
        status = FINISHED if reached else FAILED if (tdir / "error.txt").is_file() else RUNNING
    error = error_line((tdir / "error.txt").read_text(errors="replace")) if status == FAILED and \
        (tdir / "error.txt").is_file() else ""
    started = math.nan
    if results:  # the first report's time, less its epoch
        started = _number_or_nan(results[0].get("timestamp")) - _number_or_nan(results[0].get("time_this_iter_s"))
    variant = params.get("variant", {}).get("name") if isinstance(params.get("variant"), dict) else None
    single = len(configs) == 1
    rows = []
    for member, cfg in configs.items():
        base = {"trial_id": trial_id, "trial": tdir.name, "status": status, "error": error, "member": member,
                "run": f"{trial_id}/{member}", "variant": variant, "started": started, **cfg}
        base["method"] = method_label({**cfg, "variant": variant}, study)
        if not results:
            rows.append({**base, "epoch": math.nan, "complete": False})
            continue
        for r in results:
            m = r if single else (r.get("group") or {}).get(member)
            if m is None:
                continue
            row = {**base, "epoch": int(r["epoch"]), "objective": _number_or_nan(r.get(metric)),
                   "training_iteration": r.get("training_iteration"), "time_total_s": r.get("time_total_s")}
            row.update({METRIC_COLUMNS[k]: _number_or_nan(m.get(k)) for k in METRICS})
            row["complete"] = int(r["epoch"]) + 1 >= int(cfg.get("epochs") or 0)
            rows.append(row)
    return rows


def _number_or_nan(v) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def trial_summary(df: pd.DataFrame) -> pd.DataFrame:
    """One row per trial: status, method, epochs done / planned, last objective, error line."""
    keys = ["trial_id", "trial", "status", "method"] + [k for k in df.attrs.get("searched", []) if k in df]
    g = df.groupby("trial", sort=False)
    out = g[keys].first()
    out["epochs_done"] = g["epoch"].max().add(1).fillna(0).astype(int)
    out["epochs"] = g["epochs"].first() if "epochs" in df else math.nan
    out["objective"] = g["objective"].last() if "objective" in df else math.nan
    out["error"] = g["error"].first()
    return out.reset_index(drop=True)


def last_epoch(df: pd.DataFrame, complete_only: bool = True) -> pd.DataFrame:
    """Each run's last reported epoch; by default only runs that reached the planned last epoch
    (the protocol's number), leaving out running, failed and early-stopped ones."""
    d = df.dropna(subset=["epoch"])
    d = d.loc[d.groupby("run")["epoch"].idxmax()]
    if complete_only:
        d = d[d["complete"].astype(bool)]
    return d.reset_index(drop=True)
