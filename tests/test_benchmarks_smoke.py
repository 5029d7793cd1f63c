"""The benchmarks run end to end at tiny sizes (no timing is asserted: benchmarks are not timed tests)."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(module: str, *args, timeout=300) -> str:
    """`python -m benchmarks.<module> ARGS` from the repository root, as the README runs them."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_bench_trial_smoke():
    out = run("bench_trial", "--smoke", "--threads", "1")
    lines = out.splitlines()
    assert lines[-1].startswith("ratio=") and float(lines[-1].split("=", 1)[1]) > 0
    for needle in ("== blocks 1 ==", "== blocks 6 ==", "feature cache", "s/epoch", "ref77", "plain", "fast",
                   "per-epoch ratio reference / fast", "peak RSS"):
        assert needle in out, needle


def test_bench_text_smoke():
    out = run("bench_text", "--backbone", "rsnl-tiny", "--classes", "5", "--blocks", "2", "--n-ctx", "4",
              "--reps", "1", "--ref-reps", "1", "--threads", "1")
    assert "ratios: ref77/fast" in out
    assert all(f"  {p} " in out for p in ("ref77", "plain", "fast"))


def test_bench_members_smoke():
    """Side by side vs one at a time on digits: members per second, the modes' differences, the ratio."""
    out = run("bench_members", "--smoke")
    lines = out.splitlines()
    assert lines[-1].startswith("ratio=") and float(lines[-1].split("=", 1)[1]) > 0
    assert out.count("members/s, side by side") == 2 and "group  2:" in out
    assert "bit-identical" in out or "max |ctx diff|" in out


def test_gpu_check_script_parses_and_explains_itself():
    script = REPO / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    help_ = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True)
    assert help_.returncode == 0 and "WHEELS_DIR" in help_.stdout
    assert subprocess.run(["bash", str(script), "a", "b"], capture_output=True).returncode == 2
    text = script.read_text()  # the members-per-second step: 0.25 GPU per trial, groups of 1 and 12
    assert "benchmarks.bench_members" in text and "--procs 4 --groups 1 12" in text


def test_bench_study_reads_tune_results(tmp_path):
    """bench_study's accounting on result.json rows as Tune writes them (the study itself needs Ray)."""
    from benchmarks.bench_study import analyse, read_trials

    for t in range(2):
        rows = [{"time_this_iter_s": 2.5 if e == 0 else 1.1, "epoch_seconds": 1.0, "time_total_s": 2.5 + 1.1 * e,
                 "timestamp": 100 + e, "training_iteration": e + 1} for e in range(3)]
        d = tmp_path / f"trial_{t}"
        d.mkdir()
        (d / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    trials = read_trials(tmp_path)
    assert len(trials) == 2 and len(trials[0]) == 3
    text = "\n".join(analyse(trials, wall=20.0, loop=10.0, features=3.0, slots=2))
    assert "2 finished x 3 epochs" in text and "360 trials/hour overall" in text
    assert "start 1.50 s" in text and "report + checkpoint 100 ms per epoch" in text
    assert "launch 5.30 s" in text  # (10 s x 2 slots - 2 x 4.7 s spans) / 2 trials
    assert "feature task 3.0 s" in text and "shutdown 7.0 s" in text


def test_bench_study_help():
    """Imports and argument parsing (the study itself runs in benchmarks/gpu_check.sh and by hand)."""
    out = run("bench_study", "--help", timeout=120)
    assert "--gpus-per-trial" in out and "trials per hour" in out


def test_bench_overhead_sums_every_member_of_every_epoch(tmp_path):
    """bench_overhead's compute: grouped and single trials, as Tune writes their result.json."""
    from benchmarks.bench_overhead import trial_compute

    grouped = [{"epoch": e, "group": {"seed=1": {"epoch_seconds": 0.5}, "seed=2": {"epoch_seconds": 0.25}}}
               for e in range(4)]
    single = [{"epoch": e, "epoch_seconds": 1.5} for e in range(2)]
    for name, rows in (("a_coop", grouped), ("b_rsnl", single)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert trial_compute(tmp_path) == {"a_coop": 3.0, "b_rsnl": 3.0}
    out = run("bench_overhead", "--help", timeout=120)
    assert "overhead" in out and "plain loop" in out
