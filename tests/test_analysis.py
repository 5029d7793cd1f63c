"""analysis/: the loader, tables, plots, Optuna view, `launch.py report` and the notebooks, on the output
of real tiny studies (session fixtures grid_experiment / optuna_experiment in conftest.py)."""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from faults import fail_once_at
from studies import grid_study, run

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def raw_trials(exp) -> list[tuple[dict, list[dict]]]:
    """(params.json, result.json lines) of every trial folder, read by hand."""
    out = []
    for d in sorted(Path(exp).iterdir()):
        if (d / "result.json").is_file():
            lines = [json.loads(x) for x in (d / "result.json").read_text().splitlines() if x.strip()]
            out.append((json.loads((d / "params.json").read_text()), lines))
    return out


def copy_experiment(src, dst) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoint_*", "events.out.*"))
    return Path(dst)


# --- loader -------------------------------------------------------------------------------------

def test_grid_experiment_loads_one_row_per_trial_and_epoch_with_full_config(grid_experiment):
    from analysis import load_experiment, trial_summary

    df = load_experiment(grid_experiment)
    assert len(df) == 8 * 3 and df["run"].nunique() == 8
    assert set(df["status"]) == {"TERMINATED"} and df["complete"].sum() == 8
    assert sorted(df["epoch"].unique()) == [0, 1, 2]
    assert list(df.attrs["study"].params) == ["noise_rate", "seed"]
    coop = df[df["method"] == "coop"]
    # study.trial + params + variant overrides
    assert set(coop["blocks"]) == {1} and set(coop["selector"]) == {"none"} and set(coop["dataset"]) == {"digits"}
    assert set(df[df["method"] == "rsnl-m2"]["blocks"]) == {2}
    for params, lines in raw_trials(grid_experiment):
        rows = df[df["trial_id"] == lines[0]["trial_id"]].sort_values("epoch")
        assert rows["noise_rate"].iloc[0] == params["noise_rate"] and rows["seed"].iloc[0] == params["seed"]
        assert rows["method"].iloc[0] == params["variant"]["name"]
        assert rows["test_acc"].tolist() == [x["test_acc"] for x in lines]
        assert rows["epoch_lr"].tolist() == [x["lr"] for x in lines] and set(rows["lr"]) == {0.002}
    summary = trial_summary(df)
    assert len(summary) == 8 and summary["epochs_done"].tolist() == [3] * 8


def test_optuna_group_is_exploded_into_member_runs(optuna_experiment):
    from analysis import load_experiment

    df = load_experiment(optuna_experiment)
    assert df["trial_id"].nunique() == 4 and df["run"].nunique() == 8 and len(df) == 4 * 2 * 3
    assert set(df["seed"]) == {1, 2} and set(df["noise_rate"]) == {0.5}
    for params, lines in raw_trials(optuna_experiment):
        t = df[df["trial_id"] == lines[0]["trial_id"]]
        assert t["blocks"].iloc[0] == params["blocks"] and t["alpha_base"].iloc[0] == params["alpha_base"]
        for line in lines:
            at = t[t["epoch"] == line["epoch"]]
            assert (at["objective"] == line["val_acc"]).all()  # the reported group mean
            for member, metrics in line["group"].items():
                row = at[at["member"] == member]
                assert len(row) == 1 and row["val_acc"].item() == metrics["val_acc"]
                assert f"seed={row['seed'].item()}" in member


def test_loader_needs_no_ray_torch_or_model_code(optuna_experiment, tmp_path):
    code = ("import sys; from analysis.load import load_experiment; from analysis.report import write_report;"
            f"load_experiment({str(optuna_experiment)!r}); write_report({str(optuna_experiment)!r}, {str(tmp_path)!r});"
            "bad = [m for m in ('ray', 'torch', 'open_clip', 'rsnl.train', 'rsnl.models') if m in sys.modules];"
            "assert not bad, bad")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
                       env={**os.environ, "MPLBACKEND": "Agg"})
    assert p.returncode == 0, p.stderr[-2000:]


def test_running_and_starting_trials_are_read_from_their_folders(grid_experiment, tmp_path):
    """Without the record (a trial not finished yet) and without any of Tune's experiment state, the
    folders tell: a trial mid-write is RUNNING, a trial that has only written its configs is listed."""
    from analysis import ablation_table, load_experiment, trial_summary, write_report

    exp = copy_experiment(grid_experiment, tmp_path / "grid")
    (exp / "optuna.db").unlink()
    for f in exp.glob("experiment_state-*.json"):
        f.unlink()
    dirs = sorted(d for d in exp.iterdir() if (d / "result.json").is_file() and "rsnl-m2_noise_rate=0.5" in d.name)
    running, starting = dirs
    first = (running / "result.json").read_text().splitlines()[0]
    (running / "result.json").write_text(first + "\n" + '{"epoch": 1, "test_a')  # a line mid-write
    running_id = json.loads(first)["trial_id"]
    for name in ("result.json", "params.json", "progress.csv"):
        (starting / name).unlink()
    starting_id = json.loads((starting / "rsnl_trial.json").read_text())["trial_id"]

    df = load_experiment(exp)
    assert df["run"].nunique() == 8
    r = df[df["trial_id"] == running_id]
    assert r["status"].tolist() == ["RUNNING"] and r["epoch"].tolist() == [0] and not r["complete"].any()
    s = df[df["trial_id"] == starting_id]
    assert s["status"].tolist() == ["RUNNING"] and s["epoch"].isna().all() and s["blocks"].tolist() == [2]
    summary = trial_summary(df).set_index("trial_id")
    assert summary.loc[running_id, "epochs_done"] == 1 and summary.loc[running_id, "status"] == "RUNNING"
    table = ablation_table(df)
    assert ("rsnl-m2", 0.5) not in set(zip(table.stats["method"], table.stats["noise_rate"]))
    assert "not at their last epoch are left out (2 running)" in table.caption, table.caption
    text = write_report(exp, tmp_path / "report").read_text()
    assert "## Trials not finished" in text and "RUNNING" in text


def test_status_comes_from_the_optuna_record(grid_experiment, tmp_path):
    """A trial the record holds as finished is TERMINATED whatever its folder looks like."""
    from analysis import load_experiment

    exp = copy_experiment(grid_experiment, tmp_path / "grid")
    d = next(d for d in sorted(exp.iterdir()) if (d / "result.json").is_file())
    (d / "error.txt").write_text("RuntimeError: an error Tune retried past\n")
    df = load_experiment(exp)
    assert set(df["status"]) == {"TERMINATED"} and df.attrs["planned"] == 8


def test_each_trial_records_its_members_and_the_analysis_reads_them_as_written(grid_experiment, optuna_experiment,
                                                                               tmp_path):
    from analysis import load_experiment
    from rsnl.study import read_stored

    for exp in (grid_experiment, optuna_experiment):
        study = read_stored(exp)
        for d in (p for p in Path(exp).iterdir() if (p / "params.json").is_file()):
            record = json.loads((d / "rsnl_trial.json").read_text())
            params = json.loads((d / "params.json").read_text())
            assert record["params"] == params
            assert record["members"] == {name: cfg.to_dict() for name, cfg in study.trial_configs(params)}
    # a value today's code would refuse is read as the trial ran it, without a warning
    exp = copy_experiment(grid_experiment, tmp_path / "old")
    d = next(p for p in sorted(exp.iterdir()) if (p / "rsnl_trial.json").is_file())
    record = json.loads((d / "rsnl_trial.json").read_text())
    for cfg in record["members"].values():
        cfg["blocks"], cfg["retired_key"] = 0, "kept"
    (d / "rsnl_trial.json").write_text(json.dumps(record))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        df = load_experiment(exp)
    rows = df[df["trial"] == d.name]
    assert set(rows["blocks"]) == {0} and set(rows["retired_key"]) == {"kept"}


@pytest.mark.parametrize("name", ["params.json", "rsnl_trial.json"])
def test_half_written_trial_file_is_one_line_naming_it(grid_experiment, tmp_path, capsys, name):
    exp = copy_experiment(grid_experiment, tmp_path / "grid")
    d = next(p for p in sorted(exp.iterdir()) if (p / name).is_file())
    if name == "params.json":
        (d / "rsnl_trial.json").unlink()  # a trial that has not written its record: params.json is read
    (d / name).write_text((d / name).read_text()[:25])
    from launch import main
    assert main(["report", str(exp)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(d / name) in err[0] and "is not valid JSON" in err[0], err


@pytest.fixture(scope="module")
def failed_experiment(ray_session, ray_env, tmp_path_factory, study_cache):
    """A real one-trial grid study whose trial raises at epoch 1 and is not retried
    (tests/faults.py)."""
    values = grid_study(tmp_path_factory.mktemp("failing"), study_cache, name="failing", epochs=2)
    values["search"]["params"] = {"noise_rate": {"grid": [0.5]}, "seed": {"grid": [1]}}
    values["variants"] = values["variants"][:1]
    values["max_failures"] = 0
    with fail_once_at(1, tmp_path_factory.mktemp("fault") / "fault.done") as fault:
        _, path, _ = run(values)
    assert fault.exists(), "the fault fired"
    return path


def test_failed_trial_is_listed_with_its_error(failed_experiment, tmp_path):
    from analysis import ablation_table, load_experiment, trial_summary, write_report

    df = load_experiment(failed_experiment)
    assert df["status"].tolist() == ["ERROR"] and df["epoch"].tolist() == [0]  # its one reported epoch
    failed = trial_summary(df).iloc[0]
    assert failed["error"].startswith("RuntimeError: injected fault at epoch 1") and failed["epochs_done"] == 1
    assert not ablation_table(df)  # the protocol's number needs the last epoch
    text = write_report(failed_experiment, tmp_path).read_text()
    assert "## Trials not finished" in text and "injected fault at epoch 1" in text
    assert "_No run has reached its last epoch yet._" in text


# --- tables -------------------------------------------------------------------------------------

def test_ablation_table_cells_match_hand_computed_mean_and_std(grid_experiment):
    from analysis import ablation_table, load_experiment

    by_cell: dict[tuple, list[float]] = {}
    zeroshot: dict[float, list[float]] = {}
    for params, lines in raw_trials(grid_experiment):
        assert lines[-1]["epoch"] == 2
        by_cell.setdefault((params["variant"]["name"], params["noise_rate"]), []).append(lines[-1]["test_acc"])
        zeroshot.setdefault(params["noise_rate"], []).append(lines[-1]["zeroshot_acc"])
    table = ablation_table(load_experiment(grid_experiment))
    assert table.rows == ["zero-shot", "coop", "rsnl-m2"] and table.columns == ["25%", "50%", "mean", "Δ vs coop"]
    for rate, vals in zeroshot.items():  # the same test split and model in every run: one value, no std
        assert len(set(vals)) == 1 and table.cells[("zero-shot", f"{rate * 100:g}%")].mean == vals[0]
        assert not math.isfinite(table.cells[("zero-shot", f"{rate * 100:g}%")].std)
    md = table.markdown()
    for (method, rate), vals in by_cell.items():
        mean, std = statistics.mean(vals), statistics.stdev(vals)
        cell = table.cells[(method, f"{rate * 100:g}%")]
        assert cell.mean == pytest.approx(mean, abs=1e-12) and cell.std == pytest.approx(std, abs=1e-12)
        assert cell.n == 2
        assert f"{mean:.2f}** ± {std:.2f}" in md or f"{mean:.2f} ± {std:.2f}" in md
    row_mean = {m: statistics.mean([statistics.mean(by_cell[(m, r)]) for r in (0.25, 0.5)]) for m in ("coop", "rsnl-m2")}
    for m in row_mean:
        assert table.cells[(m, "mean")].mean == pytest.approx(row_mean[m])
        assert table.cells[(m, "Δ vs coop")].mean == pytest.approx(row_mean[m] - row_mean["coop"])
    latex = table.latex("tab:ablation")
    assert "\\begin{tabular}{lrrrr}" in latex and "\\label{tab:ablation}" in latex and "\\toprule" in latex
    m, r = "rsnl-m2", 0.5
    assert f"{statistics.mean(by_cell[(m, r)]):.2f}}} \\pm {statistics.stdev(by_cell[(m, r)]):.2f}$" in latex \
        or f"${statistics.mean(by_cell[(m, r)]):.2f} \\pm {statistics.stdev(by_cell[(m, r)]):.2f}$" in latex


def test_paired_differences_to_coop_with_t_intervals(grid_experiment):
    """Same seed and noise rate = the same draw: the difference per seed, its mean and 95 % t-interval."""
    from scipy import stats

    from analysis import load_experiment, paired_table

    last = {}
    for params, lines in raw_trials(grid_experiment):
        last[(params["variant"]["name"], params["noise_rate"], params["seed"])] = lines[-1]["test_acc"]
    table = paired_table(load_experiment(grid_experiment))
    assert table.rows == ["rsnl-m2"] and table.columns == ["25%", "50%"]
    for rate in (0.25, 0.5):
        diffs = [last[("rsnl-m2", rate, seed)] - last[("coop", rate, seed)] for seed in (1, 2)]
        mean, sd = statistics.mean(diffs), statistics.stdev(diffs)
        half = stats.t.ppf(0.975, 1) * sd / math.sqrt(2)
        cell = table.cells[("rsnl-m2", f"{rate * 100:g}%")]
        assert cell.n == 2 and cell.mean == pytest.approx(mean)
        assert (cell.lo, cell.hi) == (pytest.approx(mean - half), pytest.approx(mean + half))
        assert f"[{mean - half:+.2f}, {mean + half:+.2f}] (n=2" in table.markdown()
    assert "95% t-interval" in table.caption


def test_cells_below_zero_shot_are_flagged_and_uneven_counts_shown(grid_experiment):
    from analysis import ablation_table, load_experiment

    df = load_experiment(grid_experiment)
    table = ablation_table(df)
    for (row, col), cell in table.cells.items():
        if row == "zero-shot" or col not in ("25%", "50%"):
            continue
        below = cell.mean < table.cells[("zero-shot", col)].mean
        assert (cell.flag == "†") == below and (("†" in cell.text(2)) == below)
    assert ("below zero-shot" in table.caption) == any(c.flag for c in table.cells.values())
    # one run fewer in one cell: every cell then says how many runs back it
    run = df[(df["method"] == "coop") & (df["noise_rate"] == 0.5)]["run"].iloc[0]
    fewer_runs = df[df["run"] != run]
    fewer_runs.attrs.update(df.attrs)
    fewer = ablation_table(fewer_runs)
    assert fewer.cells[("coop", "50%")].n == 1 and "(n=1)" in fewer.markdown() and "(n=2)" in fewer.markdown()
    assert "Runs per cell differ" in fewer.caption


def test_selection_table_and_missing_baseline(optuna_experiment):
    from analysis import ablation_table, load_experiment, selection_table

    df = load_experiment(optuna_experiment)
    sel = selection_table(df)
    last = {}
    for params, lines in raw_trials(optuna_experiment):
        for member in lines[-1]["group"].values():
            last.setdefault(f"m={params['blocks']} gmm/ce @ 50%", []).append(member["select_precision"] * 100)
    assert sorted(sel.rows) == sorted(last)
    for row, vals in last.items():
        assert sel.cells[(row, "precision (%)")].mean == pytest.approx(statistics.mean(vals))
    acc = ablation_table(df)
    assert "Δ vs coop" not in acc.columns and "No CoOp baseline" in acc.caption


# --- Optuna view ------------------------------------------------------------------------------------

def test_the_report_reads_the_optuna_record_the_dashboard_shows(optuna_experiment):
    from optuna.trial import TrialState

    from analysis import importance, load_experiment

    df = load_experiment(optuna_experiment)
    ostudy = importance.record(df)
    expected = {lines[0]["trial_id"]: lines[-1]["val_acc"] for _, lines in raw_trials(optuna_experiment)}
    got = {t.user_attrs["tune_trial_id"]: t.value for t in ostudy.trials}
    assert got == pytest.approx(expected)  # the group mean of the metric at the last epoch
    assert all(t.state == TrialState.COMPLETE for t in ostudy.trials)
    for t in ostudy.trials:  # every epoch's value, as result.json has them
        lines = next(lines for _, lines in raw_trials(optuna_experiment) if lines[0]["trial_id"] ==
                     t.user_attrs["tune_trial_id"])
        assert t.intermediate_values == pytest.approx({r["epoch"]: r["val_acc"] for r in lines})
    assert set(ostudy.trials[0].params) == {"blocks", "alpha_base", "alpha_rate"}
    for name in importance.EVALUATORS:
        values, note = importance.importances(ostudy, name)
        if note is None:  # the tiny model may give a constant objective: then a note, not a crash
            assert set(values) == {"blocks", "alpha_base", "alpha_rate"} and sum(values.values()) == pytest.approx(1)


def _study_of(trials, value=None):
    import copy

    import optuna
    s = optuna.create_study(direction="maximize")
    for t in trials:
        t = copy.deepcopy(t)
        if value is not None:
            t.value = value
        s.add_trial(t)
    return s


def test_too_few_trials_or_a_constant_objective_give_notes(optuna_experiment):
    from analysis import importance, load_experiment

    df = load_experiment(optuna_experiment)
    trials = importance.record(df).trials
    flat = _study_of(trials, value=10.0)
    assert "the same (10)" in importance.importances(flat)[1]
    assert importance.plot_importances(flat, df)[0] is None
    one = _study_of(trials[:1])
    note = "parameter importance needs at least 2 complete trials; this study has 1"
    assert importance.importances(one, "fanova") == ({}, note)
    assert importance.plot_alpha_contour(one, df)[0] is None
    assert importance.plot_history(one, df)[0] is not None


# --- report ------------------------------------------------------------------------------------------

def _pngs_ok(out: Path, text: str, expected: set[str]) -> None:
    pngs = {p.name for p in out.glob("*.png")}
    assert expected <= pngs
    for name in pngs:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000, name
        assert f"]({name})" in text


def test_report_command_on_a_search(optuna_experiment, tmp_path, capsys):
    import launch

    out = tmp_path / "rep"
    assert launch.main(["report", str(optuna_experiment), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"[rsnl] report written to {out / 'report.md'}"
    text = (out / "report.md").read_text()
    for section in ("# Study report: search", "## Test accuracy (last epoch)", "## Clean-sample selection",
                    "## Per-epoch curves", "## Hyperparameter search", "### Parameter importance"):
        assert section in text
    assert "\\begin{tabular}" in (out / "ablation.tex").read_text()
    _pngs_ok(out, text, {"accuracy_vs_noise.png", "curves_noise_50.png", "optimization_history.png"})


def test_report_of_a_grid_goes_to_experiment_report_by_default(grid_experiment, tmp_path):
    from analysis import write_report

    exp = copy_experiment(grid_experiment, tmp_path / "grid")
    path = write_report(exp)
    assert path == exp / "report" / "report.md"
    text = path.read_text()
    assert "| coop |" in text and "Δ vs coop" in text and "Hyperparameter search" not in text
    _pngs_ok(path.parent, text, {"accuracy_vs_noise.png", "curves_noise_25.png", "curves_noise_50.png"})


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_report_of_a_missing_or_empty_folder_is_one_line(tmp_path, capsys, make):
    import launch

    target = tmp_path / "nothing"
    if make == "empty":
        target.mkdir()
    assert launch.main(["report", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("launch.py report: error: ") and str(target) in err


# --- notebooks -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["study_summary", "hparam_importance"])
def test_notebooks_run_on_a_real_study(name, optuna_experiment, monkeypatch):
    import nbclient
    import nbformat
    from jupyter_client.kernelspec import find_kernel_specs

    if "python3" not in find_kernel_specs():
        subprocess.run([sys.executable, "-m", "ipykernel", "install", "--user", "--name", "python3"], check=True)
    path = REPO / "analysis" / f"{name}.ipynb"
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code"), \
        "notebooks are stored without outputs"
    assert "RSNL_EXPERIMENT" in nb.cells[0].source
    monkeypatch.setenv("RSNL_EXPERIMENT", str(optuna_experiment))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nbclient.NotebookClient(nb, kernel_name="python3", timeout=180,
                            resources={"metadata": {"path": str(path.parent)}}).execute()
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 2
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors


def test_seeds_to_resolve_is_the_first_n_whose_interval_excludes_zero():
    from scipy import stats

    from analysis.tables import seeds_to_resolve

    def excludes_zero(n, mean, sd):
        return stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n) < abs(mean)
    for mean, sd in ((1.0, 2.0), (-0.5, 3.0), (2.0, 1.0)):
        n = seeds_to_resolve(mean, sd)
        assert excludes_zero(n, mean, sd) and not excludes_zero(n - 1, mean, sd)
    assert seeds_to_resolve(0.0, 1.0) > 10_000


def test_a_studys_pairs_get_their_own_paired_table_in_the_report(grid_experiment, tmp_path):
    """pairs: [[coop, rsnl-m2]] reports coop minus rsnl-m2 per seed: the CoOp table's cells negated."""
    import shutil

    import yaml

    from analysis import load_experiment, paired_table, write_report

    exp = tmp_path / "grid"
    shutil.copytree(grid_experiment, exp)
    stored = yaml.safe_load((exp / "rsnl_study.yaml").read_text())
    stored["pairs"] = [["coop", "rsnl-m2"]]
    (exp / "rsnl_study.yaml").write_text(yaml.safe_dump(stored))
    df = load_experiment(exp)
    to_coop = paired_table(df)
    reversed_ = paired_table(df, baseline="rsnl-m2", methods=["coop"])
    assert reversed_.rows == ["coop"] and reversed_.columns == to_coop.columns
    for col in to_coop.columns:
        a, b = to_coop.cells[("rsnl-m2", col)], reversed_.cells[("coop", col)]
        assert b.mean == pytest.approx(-a.mean) and (b.lo, b.hi) == (pytest.approx(-a.hi), pytest.approx(-a.lo))
    text = write_report(exp, tmp_path / "report").read_text()
    assert "## Paired difference to rsnl-m2 (last epoch)" in text
    assert (tmp_path / "report" / "paired_rsnl-m2.tex").is_file()
