"""A kill sweep: the quickstart (its --smoke-test shape) SIGKILLed at eight moments of its life, on a local
folder and in an S3 bucket (moto on 127.0.0.1), each kill followed by the one command a user types next.

Each run is killed at the first moment of its kind that it reaches itself (a console line it prints, a file
it writes), so the moments are the same on every machine and under any load:

  header       its first console line: the checks passed, Ray not started yet    (then the plain command)
  Ray's start  Ray's first process is up, ray.init goes on                       (then the plain command)
  study file   rsnl_study.yaml written: features computed, Tune not started      (then --resume, always)
  tuner.pkl    Tune's first file, and no run state yet: Tune itself would start the experiment over
  first save   Tune's first experiment state appears (the other files of that save may not be there yet)
  checkpoint   a trial's checkpoint written
  one done     the first trial finished: in the record, not yet in Tune's saved state
  loop ended   Tune's loop returned: rsnl's final write-out and the summary not done yet

Every run after a kill must get on with the study (no refusal, no error), and the last one finishes it:
every trial exactly once in optuna.db and on disk, every epoch in the record and in result.json, and
`launch.py report` works. The two storages' chains run at the same time, each the other's load on the two
cores: the refused resumes of the past appeared under load. RSNL_SWEEP_LOAD=1 adds a CPU-bound process
beside them.
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from drivers import Driver, launch, record, results_of
from rsnl import storage

NAME = "quickstart-smoke"
EPOCHS = 2  # the smoke shape
RESUMED = "Tune's run state is missing (the driver was stopped before Tune first saved it) and no trial had finished"
DONE = "[rsnl] every trial of the study has finished; nothing to run"


class Local:
    """What the driver has written to a local experiment folder: {relative path: mtime}."""

    every = 0.02  # seconds between looks

    def __init__(self, root: Path):
        self.storage, self.exp = str(root), root / NAME

    def files(self) -> dict[str, float]:
        out = {}
        for folder, _, names in os.walk(self.exp):
            for n in names:
                p = Path(folder, n)
                try:
                    out[str(p.relative_to(self.exp))] = p.stat().st_mtime
                except OSError:
                    pass
        return out

    def driver_log(self) -> Path:
        return self.exp / "rsnl_driver.log"

    def local_copy(self, dest: Path) -> Path:
        return self.exp


class Bucket:
    """The same for an experiment in the moto bucket (listed less often: the server runs in this process)."""

    every = 0.05

    def __init__(self, uri: str):
        import boto3
        from urllib.parse import parse_qs
        self.storage = uri
        self.client = boto3.client("s3", endpoint_url=f"http://{parse_qs(uri.split('?', 1)[1])['endpoint_override'][0]}")
        self.prefix = f"studies/{NAME}/"

    def files(self) -> dict[str, float]:
        out = {}
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket="rsnl", Prefix=self.prefix):
            for o in page.get("Contents", []):
                out[o["Key"][len(self.prefix):]] = o["LastModified"].timestamp()
        return out

    def driver_log(self) -> Path:  # the local copy the driver writes (uploaded when it ends)
        return storage.mirror_dir(storage.join(self.storage, NAME), "logs") / "rsnl_driver.log"

    def local_copy(self, dest: Path) -> Path:
        return storage.download(storage.join(self.storage, NAME), dest, skip=lambda rel: "/checkpoint_" in rel)


def loop_ends(store) -> int:
    path = store.driver_log()
    return path.read_text(errors="replace").count("rsnl.run: tuning loop:") if path.is_file() else 0


def written_since(store, started: float, match) -> bool:
    return any(match(k) and t >= started - 0.001 for k, t in store.files().items())


def is_checkpoint(key: str) -> bool:
    return "/checkpoint_" in key and key.endswith("/state.pt")


# (moment, the command that ran into it: plain or resume, the trigger: (driver, store, loop ends before) -> bool)
MOMENTS = [
    ("header", "plain", lambda d, s, n: d.said("[rsnl] study ")),
    ("Ray's start", "plain", lambda d, s, n: d.runs("gcs_server")),
    ("study file", "plain", lambda d, s, n: "rsnl_study.yaml" in s.files()),
    ("tuner.pkl", "resume", lambda d, s, n: (lambda f: "tuner.pkl" in f and not any(
        k.startswith("experiment_state-") for k in f))(s.files())),
    ("first save", "resume", lambda d, s, n: written_since(s, d.started, lambda k: k.startswith("experiment_state-"))),
    ("checkpoint", "resume", lambda d, s, n: written_since(s, d.started, is_checkpoint)),
    ("one done", "resume", lambda d, s, n: d.said("[rsnl] trials 1/2 done")),
    ("loop ended", "resume", lambda d, s, n: loop_ends(s) > n),
]


def outcome(text: str, command: str) -> str:
    """What a run said about the state it found."""
    if command == "plain":
        return "the plain command started the study again"
    for line in text.splitlines():
        if line.startswith("[rsnl] Tune's run state") or line.startswith(DONE):
            return line[len("[rsnl] "):]
    return "Tune restored its run state"


def sweep(store, env, cwd: Path, logs: Path):
    """The chain of kills on one storage; returns ([(moment, what the next run made of it)], the last run)."""
    plain = ["--preset", "quickstart", "--smoke-test", "--storage", store.storage]
    resume = plain + ["--resume"]
    rows, before = [], None
    for i, (moment, command, reached) in enumerate(MOMENTS):
        ends = loop_ends(store)
        d = Driver(plain if command == "plain" else resume, env, cwd, logs / f"run{i}.log")
        caught = d.wait_for(lambda: reached(d, store, ends), every=store.every)
        d.kill()
        out = d.output
        assert caught, f"{moment}: the run ended before it (exit {d.proc.returncode}):\n{out[-3000:]}"
        assert "error" not in out.lower() and "Traceback" not in out, f"{moment}:\n{out[-3000:]}"
        if i:
            rows.append((before, outcome(out, command)))
        before = moment
    p = launch(resume, env, cwd)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows.append((before, outcome(p.stdout, "resume")))
    assert "[rsnl] 2 of 2 trial(s) finished, 0 failed" in p.stdout, p.stdout
    assert f"[rsnl] results:     {storage.join(store.storage, NAME)}\n" in p.stdout, "the name goes before a query"
    assert {"rsnl_study.yaml", "optuna.db", "rsnl_driver.log"} <= set(store.files())
    log = store.local_copy(cwd / "copy") / "rsnl_driver.log"
    assert log.read_text().count("rsnl.run: tuning loop:") == 1, "the log has every run's lines, the killed ones' too"
    return rows, p


def check_finished(exp: Path) -> None:
    trials = record(exp, NAME)
    assert len(trials) == 2 and len({t.user_attrs["tune_trial_id"] for t in trials}) == 2
    assert all(t.state.name == "COMPLETE" for t in trials)
    folders = sorted(d.name for d in exp.iterdir() if (d / "params.json").is_file())
    assert folders == sorted(t.user_attrs["trial_folder"] for t in trials), "one folder per trial"
    assert {t.params["variant"] for t in trials} == {"coop", "rsnl-m4"}
    for t in trials:
        rows = results_of(exp / t.user_attrs["trial_folder"])
        assert sorted({r["epoch"] for r in rows}) == list(range(EPOCHS)) and rows[-1]["epoch"] == EPOCHS - 1
        assert sorted(t.intermediate_values) == list(range(EPOCHS)), "every epoch in the record"
        assert t.value == pytest.approx(rows[-1]["val_acc"])


def report_works(experiment: str, env, cwd: Path) -> None:
    p = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "launch.py"), "report", experiment,
                        "--out", str(cwd / "report")], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    text = (cwd / "report" / "report.md").read_text()
    assert "trials: 2 (2 TERMINATED)" in text, text[:1500]


def run_chain(kind, store, env, base: Path):
    cwd = base / kind
    (cwd / "logs").mkdir(parents=True)
    ray_tmp = tempfile.mkdtemp(prefix="rsnl-ray-", dir="/tmp")  # short: Ray's socket paths stay < 107 bytes
    try:
        started = time.monotonic()
        rows, p = sweep(store, {**env, "RAY_TMPDIR": ray_tmp}, cwd, cwd / "logs")
        seconds = time.monotonic() - started
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    exp = store.local_copy(cwd / "copy")
    check_finished(exp)
    report_works(p.stdout.split("report: python launch.py report ", 1)[1].split()[0], env, cwd)
    return rows, seconds


def test_a_study_killed_at_eight_moments_on_local_and_s3_storage_finishes_every_trial_once(
        tmp_path, ray_env, study_cache, s3):
    env = {**os.environ, **ray_env, "RSNL_CACHE": str(study_cache)}
    load = None
    if os.environ.get("RSNL_SWEEP_LOAD") == "1":
        load = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            chains = {kind: pool.submit(run_chain, kind, store, env, tmp_path)
                      for kind, store in (("local", Local(tmp_path / "st")), ("s3", Bucket(s3)))}
            done = {kind: f.result() for kind, f in chains.items()}
    finally:
        if load is not None:
            load.kill()
            load.wait()
    for kind, (rows, seconds) in done.items():
        print(f"\n{kind} ({seconds:.0f} s):")
        for moment, said in rows:
            print(f"  killed at {moment:12s} -> {said}")
        outcomes = dict(rows)
        assert outcomes["study file"].startswith(RESUMED) and outcomes["tuner.pkl"].startswith(RESUMED), rows
        assert outcomes["loop ended"] == DONE[len("[rsnl] "):], rows
