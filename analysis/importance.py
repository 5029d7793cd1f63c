"""The Optuna view of a search: the study's Optuna record, importances, Optuna's plots.

The record is optuna.db in the experiment, the one optuna-dashboard shows: the driver adds every trial
as it finishes, valued at the group mean of the study's metric at its last epoch (the protocol's
number), with the per-epoch values. Trials still running are not in it yet. Every function that can
have too little to work with returns a one-line note instead of raising.
"""

from __future__ import annotations

import warnings

import pandas as pd

from analysis.load import record_study

EVALUATORS = ("default", "fanova")
ALPHA_PARAMS = ("alpha_base", "alpha_rate")


def objective_name(df: pd.DataFrame) -> str:
    return f"{df.attrs.get('metric', 'objective')} (group mean, last epoch)"


def record(df: pd.DataFrame):
    """The experiment's Optuna record (optuna.db) as an in-memory optuna Study."""
    study = df.attrs.get("study")
    if study is None or study.kind == "grid" or not study.params:
        raise ValueError("an Optuna view needs an optuna or random search (a grid study has no sampled params)")
    ostudy = record_study(df.attrs["path"], study)
    if ostudy is None:
        raise ValueError(f"{df.attrs['path']}: no optuna.db (the study writes it as its trials finish)")
    return ostudy


def importance_note(ostudy) -> str | None:
    """Why importances cannot be computed (None if they can)."""
    from optuna.trial import TrialState
    done = ostudy.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(done) < 2:
        return f"parameter importance needs at least 2 complete trials; this study has {len(done)}"
    if len({t.value for t in done}) == 1:
        return (f"the objective is the same ({done[0].value:.4g}) in all {len(done)} complete trials; "
                f"parameter importance is undefined")
    if not any(len({repr(t.params.get(k)) for t in done}) > 1 for k in done[0].params):
        return "no searched parameter takes more than one value among the complete trials"
    return None


def _evaluator(name: str):
    from optuna.importance import FanovaImportanceEvaluator
    if name not in EVALUATORS:
        raise ValueError(f"evaluator: {name!r} is not allowed; allowed: {', '.join(EVALUATORS)}")
    return None if name == "default" else FanovaImportanceEvaluator(seed=0)


def evaluator_name(name: str) -> str:
    return "fANOVA" if name == "fanova" else "PED-ANOVA, Optuna's default"


def importances(ostudy, evaluator: str = "default") -> tuple[dict[str, float], str | None]:
    """({param: importance}, None), or ({}, note) when they cannot be computed."""
    import optuna
    note = importance_note(ostudy)
    if note:
        return {}, note
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = optuna.importance.get_param_importances(ostudy, evaluator=_evaluator(evaluator))
        return {k: float(v) for k, v in out.items()}, None
    except (ValueError, RuntimeError, ZeroDivisionError) as e:
        return {}, f"{evaluator_name(evaluator)} importance failed: {e}"


def _optuna_plot(fn, *args, **kwargs):
    """Call an optuna.visualization.matplotlib function; it sets the ggplot style globally, so the
    rcParams are restored afterwards (our own figures keep their look)."""
    import matplotlib
    with matplotlib.rc_context(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _detach(ax):
    """The Figure behind an axes that Optuna made with pyplot, closed in pyplot (no window, no leak)."""
    import matplotlib.pyplot as plt
    fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
    plt.close(fig)
    return fig


def plot_importances(ostudy, df: pd.DataFrame, evaluator: str = "default"):
    """(Figure, None) or (None, note)."""
    from optuna.visualization.matplotlib import plot_param_importances
    note = importance_note(ostudy)
    if note:
        return None, note
    try:
        ax = _optuna_plot(plot_param_importances, ostudy, evaluator=_evaluator(evaluator),
                          target_name=objective_name(df))
    except (ValueError, RuntimeError, ZeroDivisionError) as e:
        return None, f"{evaluator_name(evaluator)} importance failed: {e}"
    n = len(ostudy.get_trials(deepcopy=False, states=(_complete(),)))
    ax.set_title("", loc="left")  # Optuna's own title would overlap ours
    ax.set_title(f"{df.attrs.get('name', '')}: parameter importance for {df.attrs.get('metric')}\n"
                 f"({evaluator_name(evaluator)}, {n} complete trials)")
    ax.set_xlabel("importance (normalised, sums to 1)")
    ax.set_ylabel("searched parameter")
    ax.figure.set_size_inches(8, 4.5)
    return _detach(ax), None


def plot_history(ostudy, df: pd.DataFrame):
    """(Figure, None) or (None, note): objective per trial in start order, and the best so far."""
    from optuna.visualization.matplotlib import plot_optimization_history
    n = len(ostudy.get_trials(deepcopy=False, states=(_complete(),)))
    if n < 1:
        return None, "no complete trial yet, so no optimisation history"
    ax = _optuna_plot(plot_optimization_history, ostudy, target_name=objective_name(df))
    ax.set_title("", loc="left")
    ax.set_title(f"{df.attrs.get('name', '')}: optimisation history ({n} complete trials, in start order)")
    ax.set_xlabel("trial (start order)")
    metric = df.attrs.get("metric", "objective")
    ax.set_ylabel(f"{metric} (%), group mean at last epoch" if metric.endswith("_acc") else objective_name(df))
    ax.figure.set_size_inches(8, 4.5)
    return _detach(ax), None


def plot_alpha_contour(ostudy, df: pd.DataFrame, params=ALPHA_PARAMS):
    """(Figure, None) or (None, note): the objective over alpha_base x alpha_rate."""
    from optuna.visualization.matplotlib import plot_contour
    done = ostudy.get_trials(deepcopy=False, states=(_complete(),))
    missing = [p for p in params if not done or p not in done[0].params]
    if missing:
        return None, f"no contour: {', '.join(missing)} not searched in this study"
    if len(done) < 2 or any(len({t.params[p] for t in done}) < 2 for p in params):
        return None, f"a {' x '.join(params)} contour needs 2 complete trials with different values of each"
    ax = _optuna_plot(plot_contour, ostudy, params=list(params), target_name=objective_name(df))
    fig = _detach(ax)
    ax = ax.flat[0] if hasattr(ax, "flat") else ax
    ax.set_title("", loc="left")
    labels = {"alpha_base": "alpha_base (alpha at epoch 0)",
              "alpha_rate": "alpha_rate (epochs; alpha = base * exp(epoch / rate))"}
    ax.set_xlabel(labels.get(params[0], params[0]))
    ax.set_ylabel(labels.get(params[1], params[1]))
    ax.set_title(f"{df.attrs.get('name', '')}: {objective_name(df)} over {' x '.join(params)}\n"
                 f"(interpolated between {len(done)} complete trials, dots)")
    fig.set_size_inches(8, 6)
    return fig, None


def _complete():
    from optuna.trial import TrialState
    return TrialState.COMPLETE
