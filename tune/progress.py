"""What a person sees while a study runs: one live progress line and rsnl's own lines, nothing of Ray's.

On a terminal the line is redrawn in place; in a log file (CI, nohup) it is written at most every
`every_s` seconds and whenever a trial ends. A trial that fails or is retried gets one line of its own.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ray import tune

from rsnl.study import StudyConfig, error_line, finite


def _clock(seconds: float) -> str:
    s = int(max(seconds, 0))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress(tune.Callback):
    """trials done / running / failed of the planned ones, the best objective so far, elapsed and ETA."""

    def __init__(self, study: StudyConfig, live: bool | None = None, every_s: float = 30.0):
        self.study = study
        self.live = sys.stdout.isatty() if live is None else live
        self.every_s = every_s
        self.epochs = study.trial_configs(study.grid_points()[0] if study.kind == "grid" else {})[0][1].epochs
        self.start = time.monotonic()
        self.done: set[str] = set()
        self.failed: set[str] = set()
        self.epochs_seen: dict[str, int] = {}
        self.best: float | None = None
        self._first: tuple[float, int] | None = None  # (time, epochs) at the first result: the rate after start-up
        self._last_line = 0.0
        self._width = 0

    @property
    def stream(self):  # looked up on use: Tune pickles its callbacks with the experiment
        return sys.stdout

    # -- Tune's events -----------------------------------------------------------------------
    def on_step_end(self, iteration, trials, **info):  # the clock moves between results too
        self._show(trials)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.epochs_seen[trial.trial_id] = int(result.get("epoch", 0)) + 1
        self._show(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.done.add(trial.trial_id)
        v = (trial.last_result or {}).get(self.study.metric)
        if finite(v) and self.epochs_seen.get(trial.trial_id, 0) >= self.epochs:
            better = max if self.study.mode == "max" else min
            self.best = v if self.best is None else better(self.best, v)
        self._show(trials, force=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.failed.add(trial.trial_id)
        self._say(f"[rsnl] trial {Path(trial.path).name} failed at epoch {self.epochs_seen.get(trial.trial_id, 0)}: "
                  f"{self._error(trial)}")
        self._show(trials, force=True)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._say(f"[rsnl] trial {Path(trial.path).name} crashed ({self._error(trial)}); retrying from its last "
                  f"checkpoint")

    def on_experiment_end(self, trials, **info):
        if self.live and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0

    # -- output -------------------------------------------------------------------------------
    def line(self, trials) -> str:
        running = sum(t.status == "RUNNING" and t.trial_id not in self.done for t in trials)
        planned = max(self.study.num_trials(), len(trials))
        elapsed = time.monotonic() - self.start
        total = planned * self.epochs
        seen = sum(self.epochs_seen.values())
        if self._first is None and seen:
            self._first = (time.monotonic(), seen)
        t0, seen0 = self._first or (0.0, seen)
        rate = (seen - seen0) / max(time.monotonic() - t0, 1e-9)
        eta = _clock((total - seen) / rate) if rate > 0 and total > seen else "--"
        best = f"{self.best:.2f}" if self.best is not None else "--"
        return (f"[rsnl] trials {len(self.done)}/{planned} done, {running} running, {len(self.failed)} failed | "
                f"best {self.study.metric} {best} | {_clock(elapsed)} elapsed, ETA {eta}")

    def _show(self, trials, force: bool = False):
        now = time.monotonic()
        if not force and now - self._last_line < (1.0 if self.live else self.every_s):
            return
        self._last_line = now
        text = self.line(trials)
        if self.live:
            self.stream.write("\r" + text.ljust(self._width))
            self._width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def _say(self, text: str):
        if self.live and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self._width = 0
        self.stream.write(text + "\n")
        self.stream.flush()

    @staticmethod
    def _error(trial) -> str:
        path = Path(trial.local_path or "") / "error.txt"
        text = path.read_text(errors="replace") if path.is_file() else ""
        return error_line(text) or str(getattr(trial, "error_msg", "") or "see error.txt in its folder")
