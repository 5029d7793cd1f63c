"""Read an experiment folder into one tidy DataFrame: one row per run and epoch, without Ray.

A "run" is one (trial, group member): an Optuna trial scored on seeds 1 and 2 gives two runs, each
with its own noise_rate/seed columns, so tables and curves treat every study kind alike. Only files
are read (rsnl_study.yaml, Tune's experiment_state-*.json, each trial's params.json and result.json),
so this works on a copied folder and while the study is still running. Trials that failed, are still
running or never started stay in the frame with their status; trials without any result get one row
with epoch NaN, so nothing disappears silently.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pandas as pd
import yaml

STUDY_FILE = "rsnl_study.yaml"  # written by tune/run.py (not imported: it pulls in Ray)
METRICS = ("lr", "train_loss", "train_acc", "val_acc", "test_acc", "zeroshot_acc", "alpha", "kept_frac", "select_precision",
           "select_recall", "noise_auroc", "epoch_seconds")
# The epoch's learning rate would overwrite the config's base `lr` (a searchable key).
METRIC_COLUMNS = {k: ("epoch_lr" if k == "lr" else k) for k in METRICS}
FINISHED, FAILED = "TERMINATED", "ERROR"
ID_COLUMNS = ("trial_id", "trial", "status", "error", "member", "run", "method", "variant", "started")


def experiment_dir(path) -> Path:
    """The folder itself, or a one-line FileNotFoundError / ValueError if it holds no Tune results."""
    exp = Path(path).expanduser()
    if not exp.is_dir():
        raise FileNotFoundError(f"{exp}: no such experiment folder (expected STORAGE/NAME of a study)")
    if not _trial_dirs(exp) and not list(exp.glob("experiment_state-*.json")):
        raise ValueError(f"{exp}: holds no Tune results (no trial folders, no experiment_state-*.json); "
                         f"is it STORAGE/NAME of a study that has started?")
    return exp


def read_study(exp):
    """The StudyConfig stored with the experiment, or None (a plain Tune experiment)."""
    path = Path(exp) / STUDY_FILE
    if not path.is_file():
        return None
    from tune.study import parse_study
    try:
        return parse_study(yaml.safe_load(path.read_text()))
    except (ValueError, TypeError, yaml.YAMLError) as e:  # an older study's results are still readable
        warnings.warn(f"{path}: cannot be parsed ({e}); using trial folders only")
        return None


def read_states(exp) -> dict[str, dict]:
    """Trial status from the newest experiment_state-*.json, keyed by the trial's folder name.

    Tune writes that file every few seconds, so it can lag behind the folders or be mid-write;
    callers fall back to what the folders say.
    """
    files = sorted(Path(exp).glob("experiment_state-*.json"), key=lambda p: (p.stat().st_mtime, p.name))
    for path in reversed(files):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        out = {}
        for entry in data.get("trial_data", []):
            try:
                state, meta = json.loads(entry[0]), json.loads(entry[1])
            except (TypeError, ValueError, IndexError):
                continue
            name = state.get("relative_logdir") or state.get("custom_dirname") or state.get("trial_id")
            out[name] = {"trial_id": state.get("trial_id"), "status": state.get("status"),
                         "config": state.get("config") if isinstance(state.get("config"), dict) else None,
                         "error_file": meta.get("error_filename"), "num_failures": meta.get("num_failures", 0),
                         "start_time": meta.get("start_time")}
        return out
    return {}


def read_results(trial_dir) -> list[dict]:
    """The trial's result.json lines, one per epoch (the last report of an epoch wins after a retry)."""
    path = Path(trial_dir) / "result.json"
    if not path.is_file():
        return []
    by_epoch: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # a line being written right now
            continue
        if isinstance(row, dict) and "epoch" in row:
            by_epoch[int(row["epoch"])] = row
    return [by_epoch[e] for e in sorted(by_epoch)]


def error_line(trial_dir) -> str:
    """The exception line of Tune's error.txt ('' if none)."""
    path = Path(trial_dir) / "error.txt"
    if not path.is_file():
        return ""
    lines = [x.strip() for x in path.read_text(errors="replace").splitlines() if x.strip()]
    for x in reversed(lines):
        head = x.split(":", 1)[0]
        if head.replace(".", "").replace("_", "").isalnum() and head.endswith(("Error", "Exception", "Interrupt",
                                                                                "Exit")):
            return x
    return lines[-1] if lines else ""


def _trial_dirs(exp: Path) -> list[Path]:
    return sorted(p for p in exp.iterdir() if p.is_dir() and ((p / "params.json").is_file()
                                                               or (p / "result.json").is_file()))


def _member_dict(name: str) -> dict:
    """'noise_rate=0.5,seed=1' -> {'noise_rate': 0.5, 'seed': 1} (tune.study.member_name reversed)."""
    if name in ("", "single"):
        return {}
    out = {}
    for part in name.split(","):
        k, _, v = part.partition("=")
        out[k] = yaml.safe_load(v)
    return out


def _flat_params(params: dict) -> dict:
    out = {k: v for k, v in params.items() if k != "variant"}
    if isinstance(params.get("variant"), dict):
        out.update({k: v for k, v in params["variant"].items() if k != "name"})
    return out


def _member_configs(study, params: dict) -> dict[str, dict]:
    """member name -> full trial config (study.trial + params + variant + member)."""
    if study is not None:
        try:
            return {name: cfg.to_dict() for name, cfg in study.trial_configs(params)}
        except (ValueError, TypeError) as e:  # a config the current code rejects still has readable results
            warnings.warn(f"trial config {params} no longer validates ({e}); using the raw values")
            base = {**study.trial, **_flat_params(params)}
            return {name: {**base, **_member_dict(name)} for name in _names(study)}
    return {"single": _flat_params(params)}


def _names(study) -> list[str]:
    from tune.study import member_name
    return [member_name(m) for m in study.group_members]


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

    Columns: trial_id, trial (folder name), status (TERMINATED, ERROR, RUNNING, PENDING, ...), error
    (exception line of a failed trial), member, run, method, variant, started (the trial's start, unix
    time; orders an optimisation history), epoch (0-indexed, NaN for a run
    without results), the metrics of METRICS (the epoch's `lr` as epoch_lr), objective (the trial's
    reported group mean of the study's metric), complete (the run reached its last epoch), then every
    trial-config key (noise_rate, seed, blocks, alpha_base, ...).
    df.attrs holds path, study (StudyConfig or None), name, kind, metric, mode, searched (param keys).
    """
    exp = experiment_dir(path)
    study = read_study(exp)
    states = read_states(exp)
    metric = study.metric if study is not None else "val_acc"
    rows: list[dict] = []
    seen = set()
    for tdir in _trial_dirs(exp):
        seen.add(tdir.name)
        rows += _trial_rows(tdir, states.get(tdir.name), study, metric)
    for name, st in states.items():  # in the experiment state but no folder yet: pending
        if name not in seen:
            rows += _trial_rows(exp / name, st, study, metric)
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
                    mode=study.mode if study else "max", searched=list(study.params) if study else [])
    return df


def _trial_rows(tdir: Path, state: dict | None, study, metric: str) -> list[dict]:
    params = {}
    if (tdir / "params.json").is_file():
        params = json.loads((tdir / "params.json").read_text())
    elif state and state.get("config"):
        params = state["config"]
    results = read_results(tdir)
    configs = _member_configs(study, params)
    status = (state or {}).get("status")
    if not status:  # not in the (lagging) experiment state: judge from the folder
        planned = max(int(c.get("epochs") or 0) for c in configs.values())
        reached = bool(results) and int(results[-1]["epoch"]) + 1 >= planned
        status = FINISHED if reached else FAILED if (tdir / "error.txt").is_file() else "RUNNING"
    error = error_line(tdir) if status == FAILED else ""
    trial_id = (state or {}).get("trial_id") or (results[0].get("trial_id") if results else tdir.name)
    started = (state or {}).get("start_time")
    if not isinstance(started, (int, float)) and results:  # the first report's time, less its epoch
        started = _number_or_nan(results[0].get("timestamp")) - _number_or_nan(results[0].get("time_this_iter_s"))
    variant = params.get("variant", {}).get("name") if isinstance(params.get("variant"), dict) else None
    single = len(configs) == 1
    rows = []
    for member, cfg in configs.items():
        base = {"trial_id": trial_id, "trial": tdir.name, "status": status, "error": error, "member": member,
                "run": f"{trial_id}/{member}", "variant": variant,
                "started": _number_or_nan(started), **cfg}
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
