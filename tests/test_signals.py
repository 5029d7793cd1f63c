"""SIGTERM stops a study like Ctrl-C in every phase, also where SIGINT is ignored; a second one ends it at once.

The driver runs as a script's background job does (`launch.py ... &`: SIGINT ignored) and gets SIGTERM alone,
as `kill PID`, Slurm or Kubernetes send it, in each phase of its life: Ray's start, the feature task, the
tuning loop, and the final write-out after Tune's loop. Each moment is a process or a line of the driver's
own, never a sleep. Every time it exits with 130 and says how to go on; the resumes then finish the study
with every trial run once. The SIGINT it gets on the way is ignored, as the shell meant; a driver in the
foreground stops on Ctrl-C, and a SIGTERM during that clean stop ends it at once. While a driver runs, a
second one on the same study is refused. A SIGTERM after ray.shutdown is still the driver's to answer
(Ray's core would reset it to the default there, unseen by Python).
"""

from __future__ import annotations

import signal
import subprocess
import sys

from drivers import REPO, Driver, launch, record, results_of

NAME = "quickstart-smoke"
EPOCHS = 2
BEFORE = "[rsnl] interrupted before the study started; nothing to resume (run the same command again)"
CONTINUE = "[rsnl] interrupted; continue with: python launch.py --resume --name quickstart-smoke --storage"


def test_sigterm_stops_a_background_driver_in_every_phase_and_the_study_resumes(tmp_path, env, study_cache):
    plain = ["--preset", "quickstart", "--smoke-test", "--storage", str(tmp_path / "st")]
    resume = plain + ["--resume"]
    exp = tmp_path / "st" / NAME
    log = exp / "rsnl_driver.log"
    env = {**env, "RSNL_CACHE": str(study_cache / "signals")}  # features to compute: a feature task to stop
    (tmp_path / "logs").mkdir()

    def background(args, name, sigint_ignored=True):
        return Driver(args, env, tmp_path, tmp_path / "logs" / f"{name}.log", sigint_ignored=sigint_ignored)

    def term_when(d: Driver, moment) -> int:
        assert d.wait_for(moment), d.output[-3000:]
        d.send(signal.SIGTERM)
        return d.end()

    # Ray's start (its first process is up, ray.init goes on for seconds)
    d = background(plain, "ray-start")
    assert term_when(d, lambda: d.runs("gcs_server")) == 130, d.output[-3000:]
    assert BEFORE in d.output and "Traceback" not in d.output, d.output[-3000:]

    # SIGINT while Ray starts is ignored: the driver goes on to the feature task, where SIGTERM stops it
    d = background(plain, "features")
    assert d.wait_for(lambda: d.runs("gcs_server")), d.output[-3000:]
    d.send(signal.SIGINT)
    assert term_when(d, lambda: d.runs("ray::compute_bank")) == 130, d.output[-3000:]
    assert BEFORE in d.output and "Traceback" not in d.output, d.output[-3000:]
    assert not (exp / "rsnl_study.yaml").exists()

    # the tuning loop: Tune saves its state and pauses the trials; the summary says what is unfinished.
    # Held there (SIGSTOP), the driver keeps the study: a second one, new or --resume, is refused in one line.
    d = background(plain, "loop")
    assert d.wait_for(lambda: any(exp.glob("*/checkpoint_*/state.pt"))), d.output[-3000:]
    d.send(signal.SIGSTOP)
    for args in (resume, plain):
        p = launch(args, env, tmp_path, timeout=120)
        assert p.returncode == 2 and p.stdout == "", p.stdout + p.stderr
        assert "another launch.py is running this study" in p.stderr and len(p.stderr.splitlines()) == 1
    d.send(signal.SIGTERM)  # handled first when it goes on
    d.send(signal.SIGCONT)
    assert d.end() == 130, d.output[-3000:]
    summary = [x for x in d.output.splitlines() if "trial(s) finished" in x]
    assert summary and "unfinished" in summary[0] and "0 failed" in summary[0], d.output
    assert f"{CONTINUE} {tmp_path / 'st'}" in d.output

    # Ctrl-C in the foreground, then SIGTERM once Tune took the first: the driver ends at once (no summary)
    stops = log.read_text().count("Stop signal received")
    d = background(resume, "twice", sigint_ignored=False)
    assert d.wait_for(lambda: d.said("[rsnl] trials 0/2 done")), d.output[-3000:]
    d.send(signal.SIGINT)
    assert d.wait_for(lambda: log.read_text().count("Stop signal received") > stops), d.output[-3000:]
    d.send(signal.SIGTERM)
    assert d.end() == 130 and CONTINUE in d.output, d.output[-3000:]
    assert "trial(s) finished" not in d.output, d.output

    # the final write-out: after Tune's loop (its end is in the driver's log), before the summary
    ends = log.read_text().count("rsnl.run: tuning loop:")
    d = background(resume, "write-out")
    assert term_when(d, lambda: log.read_text().count("rsnl.run: tuning loop:") > ends) == 130, d.output[-3000:]
    assert CONTINUE in d.output and "Traceback" not in d.output, d.output[-3000:]

    d = background(resume, "last")
    assert d.end() == 0, d.output[-3000:]
    assert "[rsnl] 2 of 2 trial(s) finished, 0 failed" in d.output
    trials = record(exp, NAME)
    assert len(trials) == 2 and all(t.state.name == "COMPLETE" for t in trials)
    for t in trials:
        rows = results_of(exp / t.user_attrs["trial_folder"])
        assert sorted({r["epoch"] for r in rows}) == list(range(EPOCHS))
        assert sorted(t.intermediate_values) == list(range(EPOCHS))


AFTER_SHUTDOWN = """
import os, signal, ray
from tune.stopping import STOP
STOP.install()
with STOP.ray_start():
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
with STOP.waiting_phase():
    ray.shutdown()
try:
    os.kill(os.getpid(), signal.SIGTERM)
    signal.sigtimedwait([], 1.0)
except KeyboardInterrupt:
    print("stopped cleanly")
"""


def test_sigterm_after_ray_shuts_down_is_still_the_drivers(env):
    """Ray's core resets SIGTERM to the default in the kernel at shutdown, where Python cannot see it; the
    driver's write-out after that must still answer a SIGTERM with its clean stop, not die of it."""
    p = subprocess.run([sys.executable, "-c", AFTER_SHUTDOWN], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0 and "stopped cleanly" in p.stdout, (p.returncode, p.stdout, p.stderr[-3000:])
