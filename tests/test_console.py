"""What a user sees: the quickstart's console, and the two dashboards it points to, served over HTTP.

One real quickstart (its --smoke-test shape: digits, 2 epochs) runs as a user would, with Ray's token
authentication on (no RAY_AUTH_MODE in the environment, a HOME of its own for the token).
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory, ray_env, study_cache):
    """(CompletedProcess, experiment folder, HOME) of `launch.py --preset quickstart --smoke-test`."""
    import shutil
    import tempfile
    tmp = tmp_path_factory.mktemp("quickstart")
    home = tmp / "home"
    home.mkdir()
    ray_tmp = tempfile.mkdtemp(prefix="rsnl-ray-", dir="/tmp")
    env = {**os.environ, **ray_env, "RAY_TMPDIR": ray_tmp, "HOME": str(home), "RSNL_CACHE": str(study_cache)}
    env.pop("RAY_AUTH_MODE")
    p = subprocess.run([sys.executable, str(REPO / "launch.py"), "--preset", "quickstart", "--smoke-test",
                        "--storage", str(tmp / "results")], env=env, cwd=tmp, capture_output=True, text=True,
                       timeout=600)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    return p, tmp / "results" / "quickstart-smoke", home


def test_the_console_shows_rsnl_lines_only_and_ends_with_the_summary(quickstart):
    p, exp, home = quickstart
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    lines = [x for x in (p.stdout + p.stderr).splitlines() if x.strip()]
    assert all(x.startswith("[rsnl]") for x in lines), "\n".join(lines)
    assert len(lines) <= 16, "\n".join(lines)
    assert "Token authentication" not in p.stdout + p.stderr
    assert (home / ".ray" / "auth_token").is_file(), "Ray's token authentication stayed on"
    out = p.stdout.splitlines()
    assert "2 of 2 trial(s) finished, 0 failed" in out[-3] and out[-2].startswith("[rsnl] best trial")
    assert out[-1].startswith(f"[rsnl] results in {exp}")
    assert any(x.startswith("[rsnl] trials 2/2 done, 0 running, 0 failed | best val_acc") for x in out)
    log = (exp / "rsnl_driver.log").read_text()
    assert "Started a local Ray instance" in log or "ray" in log, "Ray's own lines went to the log file"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 90.0):
    """GET url until the server answers (it is starting), then its JSON."""
    end = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return json.loads(r.read())
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.5)


def serve(args):
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_optuna_dashboard_serves_the_studys_record(quickstart):
    pytest.importorskip("optuna_dashboard")
    p, exp, _ = quickstart
    command = next(x for x in p.stdout.splitlines() if x.startswith("[rsnl] optuna:")).split(":", 1)[1].split()
    assert command[0] == "optuna-dashboard" and command[1] == f"sqlite:///{exp / 'optuna.db'}"
    port = free_port()
    server = serve([str(BIN / "optuna-dashboard"), command[1], "--host", "127.0.0.1", "--port", str(port)])
    try:
        studies = get_json(f"http://127.0.0.1:{port}/api/studies")["study_summaries"]
        assert [s["study_name"] for s in studies] == ["quickstart-smoke"]
        detail = get_json(f"http://127.0.0.1:{port}/api/studies/{studies[0]['study_id']}")
        trials = detail["trials"]
        assert len(trials) == 2 and {t["state"] for t in trials} == {"Complete"}
        assert {t["params"][0]["name"] for t in trials} == {"variant"}
        assert all(len(t["intermediate_values"]) == 2 for t in trials), "every epoch's value"
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_tensorboard_serves_every_trials_scalars(quickstart):
    p, exp, _ = quickstart
    port = free_port()
    server = serve([str(BIN / "tensorboard"), "--logdir", str(exp), "--host", "127.0.0.1", "--port", str(port)])
    try:
        tags = get_json(f"http://127.0.0.1:{port}/data/plugin/scalars/tags")
        runs = {run: set(t) for run, t in tags.items()}
        trial_runs = [r for r in runs if "ray/tune/val_acc" in runs[r]]
        assert len(trial_runs) == 2, runs
        run = trial_runs[0]
        points = get_json(f"http://127.0.0.1:{port}/data/plugin/scalars/scalars?run={urllib.request.quote(run)}"
                          f"&tag=ray/tune/val_acc")
        assert [pt[1] for pt in points] == [1, 2], "one point per epoch"
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_the_dashboard_command_is_printed_only_when_it_is_installed(monkeypatch, tmp_path):
    import importlib.util

    from launch import dashboard_line
    installed = dashboard_line(str(tmp_path / "exp"))
    if importlib.util.find_spec("optuna_dashboard") is not None:
        assert installed == f"[rsnl] optuna:      optuna-dashboard sqlite:///{tmp_path / 'exp' / 'optuna.db'}"
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "optuna_dashboard" else real(name, *a))
    assert dashboard_line(str(tmp_path / "exp")) == ('[rsnl] optuna:      pip install -e ".[dashboard]" for '
                                                      'optuna-dashboard (optuna.db is written)')
