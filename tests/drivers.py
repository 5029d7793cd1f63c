"""launch.py as a user runs it, for the stop, kill and resume tests (plain helpers; fixtures in conftest.py).

A `Driver` is one `python launch.py ...` in a session of its own, with its own Ray (the `env` fixture).
Tests wait for what it writes, console lines and files, never for a fixed time, and end it as a user or a
scheduler would: SIGTERM or SIGINT to the driver alone, SIGKILL to it and the Ray it started. Nothing of a
driver's session outlives the test (`Driver.end`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAUNCH = [sys.executable, str(REPO / "launch.py")]


def wait_for(predicate, timeout: float, every: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(every)
    return False


def session_pids(sid: int) -> list[int]:
    """Processes of a session (the driver, its Ray and Ray's workers)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[3]) == sid and fields[0] != "Z":
                pids.append(int(entry))
    return pids


def titles(sid: int) -> list[str]:
    """The command lines (or titles: Ray names a worker by what it runs) of a session's processes."""
    out = []
    for pid in session_pids(sid):
        try:
            out.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            pass
    return out


def kill_session(sid: int) -> None:
    for pid in session_pids(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Driver:
    """launch.py with `args` in its own session; its console (stdout and stderr) is collected line by line
    and copied to `log`. sigint_ignored: started as a script's background job is (SIGINT ignored)."""

    def __init__(self, args, env, cwd, log: Path, sigint_ignored: bool = False):
        self.started = time.time()
        self.log = open(log, "w")
        ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None
        self.proc = subprocess.Popen(LAUNCH + list(args), env=env, cwd=cwd, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True, preexec_fn=ignore)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            self.log.write(line)
            self.log.flush()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def said(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    def wait_for(self, predicate, timeout: float = 300, every: float = 0.02) -> bool:
        """True once predicate() holds; False if the driver ended first or the time ran out."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate():
                return True
            if self.proc.poll() is not None:
                return bool(predicate())
            time.sleep(every)
        return False

    def runs(self, text: str) -> bool:
        """Whether a process of its session (its Ray, Ray's workers) has `text` in its command line or title."""
        return any(text in t for t in titles(self.proc.pid))

    def send(self, sig) -> None:
        """A signal to the driver alone, as `kill PID` or a batch scheduler sends it."""
        self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL the driver, then at once everything it started."""
        self.proc.kill()
        kill_session(self.proc.pid)
        self.end(timeout=60)

    def end(self, timeout: float = 600) -> int:
        """Its exit status once it has ended; then nothing of its session is left."""
        try:
            self.proc.wait(timeout=timeout)
        finally:
            kill_session(self.proc.pid)
            self._reader.join(timeout=30)
            self.log.close()
        return self.proc.returncode


def launch(args, env, cwd, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(LAUNCH + list(args), env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def results_of(trial_dir: Path) -> list[dict]:
    path = Path(trial_dir) / "result.json"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def checkpoints(exp: Path) -> dict[str, list[int]]:
    """{trial folder: sorted checkpoint indices} as the workers wrote them to the storage."""
    dirs = [d for d in exp.iterdir() if d.is_dir()] if exp.is_dir() else []
    return {d.name: sorted(int(c.name.split("_")[1]) for c in d.glob("checkpoint_*")) for d in dirs}


def record(exp: Path, name: str):
    """The trials of a local experiment's optuna.db."""
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=name, storage=f"sqlite:///{Path(exp) / 'optuna.db'}").get_trials()
