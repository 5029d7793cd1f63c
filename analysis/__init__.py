"""Tables, plots and reports of rsnl studies, read from the experiment folder's files (no Ray, no model).

    from analysis import load_experiment, ablation_table
    df = load_experiment("results/quickstart")      # one row per run (trial x group member) and epoch
    print(ablation_table(df).markdown())
    python launch.py report results/quickstart     # report.md + PNGs

Modules: load (files -> DataFrame), tables (Markdown/LaTeX tables), plots (matplotlib figures),
importance (the study's Optuna record optuna.db, importances and Optuna's plots), report.
"""

from analysis.load import last_epoch, load_experiment, trial_summary
from analysis.tables import ablation_table, best_trials, paired_table, selection_table

__all__ = [
    "ablation_table",
    "best_trials",
    "last_epoch",
    "load_experiment",
    "paired_table",
    "selection_table",
    "trial_summary",
    "write_report",
]


def write_report(experiment, out=None, evaluator: str = "default"):
    """See analysis.report.write_report (imported on use: it pulls in matplotlib and Optuna)."""
    from analysis.report import write_report as _write
    return _write(experiment, out, evaluator)
