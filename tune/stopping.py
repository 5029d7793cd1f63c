"""Stopping a study: SIGTERM and Ctrl-C ask for one clean stop in every phase; a second one ends the driver.

`kill PID`, Slurm, Kubernetes and `ray job stop` send SIGTERM (then SIGKILL); a person presses Ctrl-C
(SIGINT). Both ask for the same clean stop:

- outside Tune's loop (the checks, Ray's start, the feature task, the final write-out): KeyboardInterrupt
  in the main thread, which launch.py turns into the resume command and exit status 130;
- inside it: Tune's own stop (the handler Tune installs for SIGUSR1 while its loop runs). Tune saves its
  run state and pauses the trials; when fit returns, the driver stops as above.

A second signal during the clean stop ends the driver at once, with the same message and status. The
study stays resumable: that is what a SIGKILL would leave. Ray's processes follow the driver (Ray binds
them to it with the kernel's parent-death signal).

A SIGINT that was ignored when the driver started (a script's background job, nohup) stays ignored.
Tune's own SIGINT handler is therefore turned off: it would take SIGINT over while its loop runs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading


class Stop:
    """The driver's stop requests: `install()` in the main thread, `uninstall()` when done, and the
    phases `ray_start()` and `tuning()` in between."""

    def __init__(self):
        self.installed = False
        self.requests = 0
        self.answered = 0       # requests Tune's loop took care of (the driver goes on to its summary)
        self.sigint = False     # whether SIGINT is ours (it was not ignored when installed)
        self.in_tune = False
        self.waiting = False    # in a phase that checks for requests itself (check() after it)
        self.delivered = False  # Tune's stop was asked for
        self.last_words = lambda: None  # what the driver says when it ends at once
        self._before = {}

    def install(self, last_words=None) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        self.requests = self.answered = 0
        self.in_tune, self.waiting, self.delivered = False, False, False
        self.last_words = last_words or (lambda: None)
        self._before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        self.sigint = self._before[signal.SIGINT] != signal.SIG_IGN
        self.installed = True
        self._own()

    def uninstall(self) -> None:
        """The dispositions from before install(): the work is done, nothing is left to stop cleanly."""
        if self.installed and threading.current_thread() is threading.main_thread():
            for s, handler in self._before.items():
                signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        self.installed = False

    def _own(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)
        if self.sigint:
            signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requests += 1
        if self.requests > 1:
            self.end_now()
        if self.in_tune:
            self.deliver()  # if Tune's loop is not up yet, its first step delivers it (tune.run.StopCallback)
        elif not self.waiting:
            raise KeyboardInterrupt

    def end_now(self) -> None:
        with contextlib.suppress(Exception):
            self.last_words()
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(130)

    def deliver(self) -> None:
        """Ask Tune's loop to stop, once, if a stop was requested and the loop's handler is installed."""
        if not self.requests or self.delivered:
            return
        handler = signal.getsignal(signal.SIGUSR1)
        if callable(handler):
            self.delivered = True
            handler(signal.SIGUSR1, None)

    def check(self) -> None:
        """Between phases: a request whose KeyboardInterrupt was lost (Python drops an exception raised
        while a finalizer runs) stops the driver here."""
        if self.installed and self.requests > self.answered:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def waiting_phase(self):
        """A phase that calls check() itself, or is too short to interrupt, is not interrupted inside:
        an exception raised at an arbitrary point of it can be lost (Python drops one raised while a
        fork handler or a finalizer runs) or leave a half-started Ray behind."""
        before, self.waiting = self.waiting, True
        try:
            yield
        finally:
            self.waiting = before
        self.check()

    @contextlib.contextmanager
    def ray_start(self):
        """Around ray.init, which would set SIGTERM handlers of its own (exit at once, then shut its node
        down and exit 1): the driver's handler stays, and a request stops the driver once Ray is up.

        The driver's Ray core is also started without its crash handler: it takes SIGTERM over (abort)
        and, at ray.shutdown, resets SIGTERM to the default in the kernel while Python still names the
        driver's handler, so a SIGTERM in the final write-out would kill the driver without a word. The
        driver's crash traces are what that costs; the workers keep theirs."""
        if not self.installed:
            yield
            return
        import ray._private.ray_constants as ray_constants
        import ray._private.utils as ray_utils
        keep = ray_utils.set_sigterm_handler, ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER
        ray_utils.set_sigterm_handler = lambda handler: None
        ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True
        try:
            with self.waiting_phase():
                yield
        finally:
            ray_utils.set_sigterm_handler, ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = keep
            self._own()

    @contextlib.contextmanager
    def tuning(self):
        """Around Tuner.fit: requests go to Tune's loop, which saves its state and returns; the driver
        then says what finished and how to resume (launch.py, `requests`)."""
        if not self.installed:
            yield
            return
        before = signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # Tune's handler, once installed, is callable
        self.in_tune, self.delivered = True, False
        try:
            self.deliver()
            yield
        finally:
            self.in_tune, self.answered = False, self.requests
            signal.signal(signal.SIGUSR1, before)


STOP = Stop()
