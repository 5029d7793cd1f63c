"""`python launch.py report EXPERIMENT_DIR`: report.md with the tables, PNG plots beside it.

Everything comes from the files of the experiment folder (analysis.load), so a report can be made
while the study runs; what is not there yet (no complete run, too few trials for importances)
becomes a one-line note in the report instead of an error.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from analysis.load import load_experiment, trial_summary
from analysis.tables import (
    ablation_table,
    best_trials,
    frame_markdown,
    noise_label,
    paired_table,
    selection_table,
)
from rsnl import storage
from rsnl.files import atomic_write

REPORT = "report.md"


def _use_agg() -> None:
    """Headless PNGs; leave a backend alone that a notebook (pyplot already imported) has chosen."""
    import matplotlib
    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")


def write_report(experiment, out=None, evaluator: str = "default") -> Path:
    """Write OUT/report.md (default OUT: EXPERIMENT/report; for a study in a bucket, ./NAME-report) with
    PNGs beside it; returns its path. A missing folder raises FileNotFoundError, one without results
    ValueError (one-line messages)."""
    df = load_experiment(experiment)
    _use_agg()
    from analysis import plots

    if out is None:
        out = Path(f"{df.attrs['name']}-report") if storage.is_uri(str(experiment)) else Path(experiment) / "report"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):  # a previous report's plots (e.g. of a noise rate since dropped)
        old.unlink()
    a = df.attrs
    study = a.get("study")
    md: list[str] = [f"# Study report: {a['name']}", ""]
    if study is not None and study.description:
        md += [" ".join(study.description.split()), ""]
    md += _overview(df)

    def figure(fig_note, filename: str, alt: str) -> None:
        fig, note = fig_note if isinstance(fig_note, tuple) else (fig_note, None)
        if fig is None:
            md.extend([f"_{note}._", ""])
        else:
            plots.save(fig, out / filename)
            md.extend([f"![{alt}]({filename})", ""])

    def table(title: str, tab, name: str) -> None:
        md.extend([f"## {title}", ""])
        if tab:
            md.extend([tab.markdown(), "", f"_{tab.caption}_", "", f"LaTeX: [{name}.tex]({name}.tex)", ""])
            atomic_write(out / f"{name}.tex", tab.latex(f"tab:{name}") + "\n")
        else:
            md.extend(["_No run has reached its last epoch yet._", ""])

    acc = ablation_table(df)
    table("Test accuracy (last epoch)", acc, "ablation")
    paired = paired_table(df)
    if paired:  # only where the study has the CoOp baseline on the same draws
        table("Paired difference to CoOp (last epoch)", paired, "paired")
    for reference, methods in _pairs_by_reference(study):
        tab = paired_table(df, baseline=reference, methods=methods)
        if tab:
            table(f"Paired difference to {reference} (last epoch)", tab, f"paired_{_slug(reference)}")
    table("Clean-sample selection (last epoch)", selection_table(df), "selection")

    md += ["## Accuracy vs noise rate", ""]
    figure((plots.accuracy_vs_noise(df), None) if acc else (None, "no complete run to plot yet"),
           "accuracy_vs_noise.png", "test accuracy vs noise rate")
    md += ["## Per-epoch curves", "",
           "Mean over the runs (seeds) of each method, band = ±1 std; failed runs are left out.", ""]
    rates = plots.noise_rates(df)
    for rate in rates:
        figure(plots.curves(df, rate), f"curves_noise_{rate * 100:g}.png", f"curves at {noise_label(rate)} noise")
    if not rates:
        md += ["_No epoch reported yet._", ""]
    noisy = [r for r in rates if r > 0]
    if noisy and "prompt_auroc" in df and df["prompt_auroc"].notna().any():
        md += ["## The two sides of G, and the blocks", "",
               "Per epoch: the AUROC (clean vs noisy) of the selection score, of the prompt similarity and of the "
               "feature similarity alone, and the blocks' mean cosine; mean over seeds, band = ±1 std.", ""]
        for rate in noisy:
            figure(plots.diagnostics(df, rate), f"diagnostics_noise_{rate * 100:g}.png",
                   f"diagnostics at {noise_label(rate)} noise")

    if study is not None and study.kind in ("optuna", "random"):
        _search_section(md, df, evaluator, figure)
    atomic_write(out / REPORT, "\n".join(md).rstrip() + "\n")
    return out / REPORT


def _pairs_by_reference(study) -> list[tuple[str, list[str]]]:
    """The study's `pairs`, one table per reference: [(reference, [variant, ...])]."""
    out: dict[str, list[str]] = {}
    for method, reference in (study.pairs if study is not None else []):
        out.setdefault(reference, []).append(method)
    return list(out.items())


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def _overview(df) -> list[str]:
    a = df.attrs
    study = a.get("study")
    trials = trial_summary(df)
    counts = ", ".join(f"{n} {s}" for s, n in trials["status"].value_counts().items())
    lines = [f"- experiment: `{a['path']}`"]
    if study is not None:
        group = f" x group of {len(study.group_members)} ({', '.join(study.group)})" if len(study.group_members) > 1 else ""
        lines.append(f"- search: {study.kind}, {study.num_trials()} trial(s){group}; objective "
                     f"{study.metric} ({study.mode}); {study.trial_configs({})[0][1].epochs} epochs planned")
    lines += [f"- trials: {len(trials)} ({counts}); runs (trial x group member): {df['run'].nunique()}",
              f"- generated: {time.strftime('%Y-%m-%d %H:%M:%S')}", ""]
    odd = trials[trials["status"] != "TERMINATED"]
    if len(odd):
        lines += ["## Trials not finished", "",
                  frame_markdown(odd[["trial", "status", "epochs_done", "epochs", "error"]]
                                 .rename(columns={"epochs_done": "epochs done", "epochs": "of"})), ""]
    return lines


def _search_section(md: list[str], df, evaluator: str, figure) -> None:
    """Appends to md (figure() appends there too)."""
    from analysis import importance
    md += ["## Hyperparameter search", ""]
    best = best_trials(df)
    if len(best):
        md += [(f"Best trials by {df.attrs['metric']} (group mean at the last epoch; test_acc: mean over the "
                "group):"), "", frame_markdown(best), ""]
    ostudy = importance.record(df)
    imp, note = importance.importances(ostudy, evaluator)
    md += [f"### Parameter importance ({importance.evaluator_name(evaluator)})", ""]
    if imp:
        md += [frame_markdown(_imp_frame(imp)), ""]
        figure(importance.plot_importances(ostudy, df, evaluator), "param_importance.png", "parameter importance")
    else:
        md += [f"_{note}._", ""]
    md += ["### Optimisation history", ""]
    figure(importance.plot_history(ostudy, df), "optimization_history.png", "optimisation history")
    md += ["### alpha_base x alpha_rate", ""]
    figure(importance.plot_alpha_contour(ostudy, df), "contour_alpha.png", "alpha_base x alpha_rate contour")


def _imp_frame(imp: dict):
    import pandas as pd
    return pd.DataFrame({"parameter": list(imp), "importance": [round(v, 3) for v in imp.values()]})
