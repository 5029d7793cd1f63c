"""Fault injection for the study tests: the real trainable, made to raise once at a chosen epoch.

rsnl has no hook for this. `fail_once_at` swaps the trainable that tune.run hands to Tune for a wrapper
of it; Ray pickles the wrapper (a closure) by value to the workers. Inside, the trial code runs
unchanged until it reports the chosen epoch: that report raises instead, once in the whole study (the
marker file is created exclusively, so two concurrent trials cannot both fail, and a retried trial
runs on).
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path


@contextlib.contextmanager
def fail_once_at(epoch: int, marker: Path, stale_results_in: Path | None = None):
    """While active, the first trial to report `epoch` raises RuntimeError("injected fault at epoch k")
    before that epoch's result and checkpoint reach Tune. Yields the marker (it exists once fired).

    With `stale_results_in` (the experiment's folder on local storage), the trial's result.json there
    is first emptied, as if Tune's background copy of it had lagged behind the epochs reported."""
    import tune.run
    from tune.trainable import train_trial

    marker = Path(marker)

    @functools.wraps(train_trial)
    def failing_trial(config, study=None, banks=None):
        from ray import tune as ray_tune
        report = ray_tune.report

        def report_or_fail(metrics, **kw):
            if metrics["epoch"] == epoch:
                try:
                    with open(marker, "x") as f:
                        f.write(f"failed once at epoch {epoch}\n")
                except FileExistsError:
                    pass
                else:
                    if stale_results_in is not None:
                        trial = Path(ray_tune.get_context().get_trial_dir()).name
                        (Path(stale_results_in) / trial / "result.json").write_text("")
                    raise RuntimeError(f"injected fault at epoch {epoch}")
            return report(metrics, **kw)

        ray_tune.report = report_or_fail
        try:
            return train_trial(config, study=study, banks=banks)
        finally:
            ray_tune.report = report

    original = tune.run.train_trial
    tune.run.train_trial = failing_trial
    try:
        yield marker
    finally:
        tune.run.train_trial = original
