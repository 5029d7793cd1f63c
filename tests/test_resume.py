"""Resume as a user meets it: an Optuna search killed while checkpointing and resumed from a moved folder,
Tune's run state damaged (rebuilt from rsnl's record), an unreadable record, a trial that failed and then
completes. Stops by signal are in test_signals.py, the kill sweep over a study's life in test_kill_sweep.py.

The CLI tests run launch.py in its own process group with a Ray of its own (tiny digits studies on CPU).
"""

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import yaml

from drivers import LAUNCH, checkpoints, launch, record, results_of, wait_for
from studies import grid_study, optuna_study


def start(args, env, cwd, log: Path):
    f = open(log, "w")
    p = subprocess.Popen(LAUNCH + args, env=env, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    p.log = f
    return p


def kill(driver) -> None:
    """SIGKILL the driver and the Ray it started (its process group)."""
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    driver.log.close()


def test_a_search_killed_while_checkpointing_resumes_from_a_moved_folder_running_every_trial_once(
        tmp_path, env, study_cache):
    """An Optuna search SIGKILLed while two trials run and one of them is writing a checkpoint (the kill
    sweep in test_kill_sweep.py covers a grid's other moments); the resume runs from another directory on
    the folder moved elsewhere. Each trial ends once, complete, with every epoch in the record."""
    epochs = 6
    values = optuna_study(tmp_path / "st", study_cache, name="killed", num_samples=3, epochs=epochs)
    values["group"] = {"seed": [1]}
    values["max_concurrent"] = 2
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(values))
    exp = tmp_path / "st" / "killed"

    # the moment a new checkpoint folder appears while at least two trials have checkpoints
    d = start(["--config", str(tmp_path / "study.yaml")], env, tmp_path, tmp_path / "run1.log")
    seen = {}

    def checkpointing():
        nonlocal seen
        now = checkpoints(exp)
        new = any(set(v) - set(seen.get(k, [])) for k, v in now.items())
        seen = now
        return new and sum(bool(v) for v in now.values()) >= 2
    caught = wait_for(checkpointing, timeout=300, every=0.005)
    kill(d)
    assert caught, (tmp_path / "run1.log").read_text()[-3000:]
    # finished as far as the storage knows (Tune copies result.json there with its run state; a trial that
    # ended after the last copy reruns its last epochs from its checkpoint, to the same numbers)
    finished = {d.name: (d / "result.json").read_bytes() for d in exp.iterdir()
                if [r["epoch"] for r in results_of(d)][-1:] == [epochs - 1]}

    # the folder moves; the resume runs from elsewhere, given --storage
    moved = tmp_path / "elsewhere" / "st"
    moved.parent.mkdir()
    shutil.move(str(tmp_path / "st"), str(moved))
    other_cwd = tmp_path / "cwd"
    other_cwd.mkdir()
    p = launch(["--resume", "--name", "killed", "--storage", str(moved)], env, other_cwd)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "[rsnl] 3 of 3 trial(s) finished, 0 failed" in p.stdout
    exp = moved / "killed"
    assert not (tmp_path / "st").exists() and not (other_cwd / "results").exists(), "nothing written elsewhere"
    assert yaml.safe_load((exp / "rsnl_study.yaml").read_text())["storage"] == str(moved)

    trials = record(exp, "killed")
    assert len(trials) == 3 and len({t.user_attrs["tune_trial_id"] for t in trials}) == 3
    assert all(t.state.name == "COMPLETE" for t in trials)
    folders = sorted(d.name for d in exp.iterdir() if (d / "params.json").is_file())
    assert folders == sorted(t.user_attrs["trial_folder"] for t in trials), "one folder per trial"
    for t in trials:
        rows = results_of(exp / t.user_attrs["trial_folder"])
        assert sorted({r["epoch"] for r in rows}) == list(range(epochs)) and rows[-1]["epoch"] == epochs - 1
        assert sorted(t.intermediate_values) == list(range(epochs)), "per-epoch values survive every resume"
        assert t.value == pytest.approx(rows[-1]["val_acc"])
    for folder, content in finished.items():
        assert (exp / folder / "result.json").read_bytes() == content, "a finished trial was not run again"


# --- Tune's run state damaged: rebuilt from rsnl's record (tune/resume.py) ---------------------------

def done_failed_kept(exp: Path, name: str):
    """The record's finished and failed trial of a two-trial study, and the finished one's result.json."""
    trials = record(exp, name)
    done = next(t for t in trials if t.state.name == "COMPLETE")
    failed = next(t for t in trials if t.state.name == "FAIL")
    return done, failed, (exp / done.user_attrs["trial_folder"] / "result.json").read_bytes()


def trial_results(exp: Path) -> dict[str, bytes]:
    return {d.name: (d / "result.json").read_bytes() for d in exp.iterdir() if (d / "result.json").is_file()}


def test_a_finished_study_with_a_damaged_run_state_resumes_to_its_summary_and_reruns_nothing(
        ray_session, tmp_path, study_cache):
    from rsnl.study import read_stored
    from studies import run
    from tune.run import run_study
    values = grid_study(tmp_path / "st", study_cache, name="broken", epochs=2)
    values["search"]["params"] = {"noise_rate": {"grid": [0.5]}, "seed": {"grid": [1]}}
    run(values)
    exp = tmp_path / "st" / "broken"
    before = trial_results(exp)
    for state in exp.glob("experiment_state-*.json"):
        state.write_text('{"trial_data": [')  # cut off mid-write
    said = []
    results, _, _ = run_study(read_stored(str(exp)), resume=True, log=said.append)
    assert results is None and said == ["[rsnl] every trial of the study has finished; nothing to run"]
    assert trial_results(exp) == before, "no trial ran again and no new one started"


def test_a_partial_run_state_is_rebuilt_from_the_record_without_running_a_finished_trial(
        ray_session, tmp_path, study_cache):
    """One trial finished, one failed; Tune's experiment state is cut off mid-write. The resume keeps the
    finished trial as it is and runs the other grid point again, as a new trial."""
    from faults import fail_once_at
    from rsnl.study import read_stored
    from studies import run
    from tune.record import tally
    from tune.run import run_study
    values = grid_study(tmp_path / "st", study_cache, name="partial", epochs=2)
    values["search"]["params"] = {"noise_rate": {"grid": [0.5]}, "seed": {"grid": [1]}}
    values["max_failures"] = 0
    with fail_once_at(1, tmp_path / "fault"):
        run(values)
    exp = tmp_path / "st" / "partial"
    done, failed, kept = done_failed_kept(exp, "partial")
    state = sorted(exp.glob("experiment_state-*.json"))[-1]
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    said = []
    study = read_stored(str(exp))
    run_study(study, resume=True, log=said.append)
    assert ("[rsnl] Tune's run state is partial (the driver was stopped while Tune saved it); rebuilt from the "
            "study's record: 1 finished trial(s) kept, 1 to run from their first epoch") in said, said
    trials = record(exp, "partial")
    assert len(trials) == 2 and all(t.state.name == "COMPLETE" for t in trials)
    assert {t.params["variant"] for t in trials} == {"coop", "rsnl-m2"}
    assert (exp / done.user_attrs["trial_folder"] / "result.json").read_bytes() == kept, "the finished trial stays"
    assert not (exp / failed.user_attrs["trial_folder"]).exists()
    folders = sorted(d.name for d in exp.iterdir() if (d / "params.json").is_file())
    assert folders == sorted(t.user_attrs["trial_folder"] for t in trials), "one folder per grid point"
    again = next(t for t in trials if t.params["variant"] == failed.params["variant"])
    assert [r["epoch"] for r in results_of(exp / again.user_attrs["trial_folder"])] == [0, 1]
    assert sorted(again.intermediate_values) == [0, 1]
    outcome = tally(str(exp), study)
    assert (outcome.finished, outcome.failed, outcome.unfinished) == (2, 0, 0)


def test_a_search_with_a_missing_run_state_is_rebuilt_with_the_sampler_told_the_finished_values(
        ray_session, tmp_path, study_cache):
    """An Optuna search: one trial finished, one failed, Tune's state gone. The rebuild keeps the finished
    one and asks the sampler, told its value, for the one sample left."""
    from faults import fail_once_at
    from rsnl.study import read_stored
    from studies import run
    from tune.run import run_study
    values = optuna_study(tmp_path / "st", study_cache, name="search", num_samples=2, epochs=2)
    values["max_failures"] = 0
    with fail_once_at(1, tmp_path / "fault"):
        run(values)
    exp = tmp_path / "st" / "search"
    done, failed, kept = done_failed_kept(exp, "search")
    for state in exp.glob("experiment_state-*.json"):
        state.unlink()
    said = []
    run_study(read_stored(str(exp)), resume=True, log=said.append)
    assert ("[rsnl] Tune's run state is missing (the driver was stopped before Tune first saved it); rebuilt from "
            "the study's record: 1 finished trial(s) kept, 1 to run from their first epoch") in said, said
    trials = record(exp, "search")
    assert len(trials) == 2 and all(t.state.name == "COMPLETE" for t in trials)
    assert (exp / done.user_attrs["trial_folder"] / "result.json").read_bytes() == kept
    assert not (exp / failed.user_attrs["trial_folder"]).exists()
    folders = sorted(d.name for d in exp.iterdir() if (d / "params.json").is_file())
    assert folders == sorted(t.user_attrs["trial_folder"] for t in trials), "one folder per trial"


def test_an_unreadable_record_refuses_the_resume_in_one_line_before_ray(tmp_path, capsys):
    import ray

    import launch
    from rsnl.study import parse_study, write_stored
    study = parse_study(grid_study(tmp_path / "st", tmp_path / "cache", name="norecord"))
    write_stored(study)
    (tmp_path / "st" / "norecord" / "optuna.db").write_bytes(b"not a database" * 100)
    was_up = ray.is_initialized()
    code = launch.main(["--resume", "--name", "norecord", "--storage", str(tmp_path / "st")])
    out, err = capsys.readouterr()
    assert code == 2 and out == "", out
    assert len(err.splitlines()) == 1 and "optuna.db: cannot be read" in err and "another --name" in err, err
    assert ray.is_initialized() == was_up


def test_a_trial_that_failed_then_completes_on_resume_is_recorded_complete(ray_session, tmp_path, study_cache):
    from faults import fail_once_at
    from rsnl.study import read_stored
    from studies import run
    from tune.record import tally
    from tune.run import run_study

    values = optuna_study(tmp_path / "st", study_cache, name="retry", num_samples=2, epochs=3)
    values["max_failures"] = 0
    with fail_once_at(1, tmp_path / "fault") as fault:
        run(values)
    assert fault.exists()
    exp = tmp_path / "st" / "retry"
    assert sorted(t.state.name for t in record(exp, "retry")) == ["COMPLETE", "FAIL"]
    failed = next(t.user_attrs["tune_trial_id"] for t in record(exp, "retry") if t.state.name == "FAIL")

    study = read_stored(str(exp))
    run_study(study, resume=True, log=lambda *_: None)
    trials = record(exp, "retry")
    assert len(trials) == 2 and all(t.state.name == "COMPLETE" for t in trials)
    again = next(t for t in trials if t.user_attrs["tune_trial_id"] == failed)
    assert sorted(again.intermediate_values) == [0, 1, 2] and again.user_attrs["epochs_done"] == 3
    outcome = tally(str(exp), study)
    assert (outcome.finished, outcome.failed, outcome.unfinished) == (2, 0, 0)
