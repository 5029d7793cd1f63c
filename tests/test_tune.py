"""The study layer (tune/, launch.py): configs, the trainable, resume, resources, TensorBoard, Optuna.

Studies are tiny (digits + rsnl-tiny on the CPU); the experiments of the session fixtures
`grid_experiment` / `optuna_experiment` are shared with the analysis tests.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rsnl.config import ConfigError
from faults import fail_once_at
from studies import grid_study, run
from rsnl.study import parse_study

REPO = Path(__file__).resolve().parents[1]


def results_of(trial_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines() if line.strip()]


def trial_dirs(exp) -> list[Path]:
    return sorted(p for p in Path(exp).iterdir() if (p / "params.json").is_file())


# --- study configs, no Ray ---------------------------------------------------------------------

BAD_STUDIES = [
    ({"nmae": "x"}, "nmae: unknown key (did you mean 'name'?)"),
    ({"trial": {"noise_rat": 0.5}}, "trial.noise_rat: unknown key (did you mean 'noise_rate'?)"),
    ({"trial": {"noise_rate": 1.5}}, "noise_rate: 1.5 is out of range"),
    ({"trial": {"blocks": 0}}, "blocks: 0 is out of range"),
    ({"trial": {"blocks": "four"}}, "blocks: must be an integer"),
    ({"trial": {"dataset": "dtdd"}}, "dataset: 'dtdd' is not known (did you mean 'dtd'?)"),
    ({"search": {"kind": "optuna", "params": {}}}, "search.params: empty"),
    ({"search": {"kind": "optuna", "params": {"blocks": {"grid": [1, 2]}}}}, "cannot be combined with an optuna"),
    ({"search": {"kind": "grid", "params": {"blocks": {"choice": [1, 2]}}}}, "a grid study takes grid"),
    ({"search": {"kind": "bayes"}}, "search.kind: 'bayes' is not allowed"),
    ({"search": {"kind": "random", "params": {"lr": {"loguniform": [0, 1]}}}}, "loguniform: low must be > 0"),
    ({"search": {"kind": "random", "params": {"lr": {"uniform": [0.1, 0.01]}}}}, "low 0.1 must be below high"),
    ({"search": {"kind": "random", "params": {"alpha_base": {"uniform": [0.1, 1.5]}}}}, "alpha_base: 1.5 is out"),
    ({"search": {"kind": "grid", "params": {"blocks": {"gird": [1]}}}}, "'gird' is not a distribution"),
    ({"resources": {"gpu": 1.5}}, "resources.gpu: 1.5 is not allowed"),
    ({"objective": {"metric": "val_accuracy"}}, "objective.metric: 'val_accuracy' is not reported"),
    ({"group": {"shots": [4, 8]}, "asha": {"grace_period": 2}}, "asha: cannot stop trials early"),
    ({"group": {"shots": []}}, "group.shots: must be a non-empty list"),
    ({"group": {"seed": [1, 2]}}, "group.seed: is also a search parameter"),
    ({"variants": [{"blocks": 2}]}, "variants[0]: must be a mapping with a 'name'"),
    ({"name": "a/b"}, "name: must be one folder name"),
    ({"name": ".."}, "name: must be one folder name"),
    ({"name": "a\\b"}, "name: must be one folder name"),
    ({"name": "s?x=1"}, "name: must be one folder name"),
    ({"objective": {"metric": "noise_auroc"}, "trial": {"noise_rate": 0.0}}, "noise_auroc is undefined"),
    ({"pairs": [["rsnl-m3", "coop"]]}, "pairs[0]: 'rsnl-m3' is not a variant (did you mean 'rsnl-m2'?)"),
    ({"pairs": [["coop"]]}, "pairs[0]: must be [variant, reference]"),
    ({"pairs": [["coop", "coop"]]}, "pairs[0]: compares 'coop' with itself"),
    ({"pairs": "coop"}, "pairs: must be a list"),
]


@pytest.mark.parametrize("change, message", BAD_STUDIES)
def test_bad_study_configs_name_the_key(tmp_path, change, message):
    values = grid_study(tmp_path, tmp_path / "cache")
    if change.get("search", {}).get("kind", "grid") != "grid":
        values.pop("variants")
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(values.get(key), dict) and key != "search":
            values[key] = {**values[key], **value}
        else:
            values[key] = value
    with pytest.raises(ConfigError) as e:
        parse_study(values)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_presets_parse_and_describe_themselves():
    from tune.study import list_presets, load_study
    presets = list_presets()
    assert {"quickstart", "dtd-ablation", "dtd-search", "fmnist-ablation", "fmnist-search"} <= set(presets)
    ablation = load_study(preset="dtd-ablation")
    assert ablation.num_trials() == 7 * 4 * 3
    assert {v["name"] for v in ablation.variants} >= {"coop", "gce", "rsnl-m6", "nlprompt"}
    search = load_study(preset="dtd-search")
    assert search.kind == "optuna" and len(search.group_members) == 9 and search.metric == "val_acc"
    # the test-bed's presets mirror DTD's: the same methods, noise rates and search space; ten seeds
    fm = load_study(preset="fmnist-ablation")
    assert fm.num_trials() * len(fm.group_members) == 7 * 4 * 10 and fm.variants == ablation.variants
    assert sorted(fm.group["noise_rate"]) == sorted(ablation.params["noise_rate"]["grid"])
    assert fm.group["seed"] == list(range(1, 11))
    assert fm.pairs == [["rsnl-m2", "rsnl-m1"], ["rsnl-m4", "rsnl-m1"], ["rsnl-m6", "rsnl-m1"]]
    sym = load_study(preset="fmnist-symmetric")
    assert sym.trial == {**fm.trial, "noise_type": "symmetric"} and sym.variants == fm.variants
    assert sym.group == {"noise_rate": [0.125, 0.25, 0.5], "seed": fm.group["seed"]}
    alpha = load_study(preset="fmnist-alpha")
    assert {v["name"]: v.get("alpha_base") for v in alpha.variants} == {
        "coop": None, "feature-only": 0.0, "blend": 0.2, "prompt-only": 1.0}
    assert alpha.pairs == [["feature-only", "blend"], ["prompt-only", "blend"]]
    fs = load_study(preset="fmnist-search")
    assert (fs.params, fs.group, fs.metric, fs.num_samples) == (search.params, search.group, search.metric,
                                                                 search.num_samples)
    for study in (fm, fs):
        assert (study.trial["dataset"], study.trial["backbone"], study.trial["pretrained"]) == (
            "fashion-mnist", "rsnl-tiny", "fashion-mnist")
    fid = load_study(preset="fmnist-fidelity")  # one of the original code's settings per variant
    assert fid.trial == fm.trial and fid.group == {"noise_rate": [0.5], "seed": [1, 2, 3]}
    switched = {v["name"]: {k for k in v if k not in ("name", "blocks", "selector", "loss")} for v in fid.variants}
    assert switched["rsnl"] == set() and switched["all-original"] == {"gmm_max_iter", "gmm_tol", "drop_last",
                                                                      "alpha_lag", "warmup_recount"}
    quick = load_study(preset="quickstart", overrides=["epochs=3"])
    assert quick.trial["epochs"] == 3 and quick.trial["pretrained"] == "fashion-mnist"
    assert [v["name"] for v in quick.variants] == ["coop", "rsnl-m4"]


LAUNCH_BAD_INPUTS = [
    (["--preset", "quickstart", "--gpus-per-trial", "1.5"], "--gpus-per-trial: 1.5 is not allowed"),
    (["--preset", "quickstart", "--gpus-per-trial", "1"], "this machine has no CUDA GPU"),
    (["--preset", "quickstrat"], "did you mean 'quickstart'?"),
    (["--preset", "quickstart", "--set", "blocks=0"], "blocks: 0 is out of range"),
    (["--preset", "quickstart", "--set", "backbone=RN5O"], "did you mean 'RN50'?"),
    (["--preset", "quickstart", "--set", "pretrained=laion9b"], "pretrained: 'laion9b' is not a tag"),
    (["--preset", "fmnist-search", "--num-samples", "0"], "--num-samples: 0 is out of range"),
    (["--preset", "dtd-ablation", "--num-samples", "3"], "a grid study runs each grid point once"),
    (["--preset", "dtd-ablation", "--set", "data_root=NOWHERE"], "NOWHERE"),
    (["--preset", "quickstart", "--resume", "--name", "never-ran"], "the same command without --resume starts it"),
]


@pytest.mark.parametrize("args, message", LAUNCH_BAD_INPUTS)
def test_launch_bad_inputs_fail_before_ray(tmp_path, monkeypatch, capsys, args, message):
    """One line, exit 2, no experiment folder, no Ray started."""
    import ray
    import launch
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.chdir(tmp_path)
    args = [a.replace("NOWHERE", str(tmp_path / "nowhere")) for a in args]
    message = message.replace("NOWHERE", str(tmp_path / "nowhere"))
    was_up = ray.is_initialized()
    code = launch.main([*args, "--storage", str(tmp_path / "st")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("launch.py: error:") and message in err[0], err
    assert not (tmp_path / "st").exists()
    assert ray.is_initialized() == was_up


def test_launch_error_exit_code_and_speed_from_the_shell(tmp_path, ray_env):
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, str(REPO / "launch.py"), "--preset", "quickstart", "--set", "noise_rate=1.5",
                        "--storage", str(tmp_path / "st")], capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, **ray_env})
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "noise_rate: 1.5 is out of range" in p.stderr
    assert time.perf_counter() - t0 < 30
    assert not (tmp_path / "st").exists()


def test_launch_help_and_presets():
    out = subprocess.run([sys.executable, str(REPO / "launch.py"), "--help"], capture_output=True, text=True)
    for flag in ("--preset", "--config", "--set", "--address", "--gpus-per-trial", "--cpus-per-trial",
                 "--max-concurrent", "--num-samples", "--storage", "--name", "--resume", "--smoke-test"):
        assert flag in out.stdout
    out = subprocess.run([sys.executable, str(REPO / "launch.py"), "presets"], capture_output=True, text=True)
    assert out.returncode == 0 and "quickstart" in out.stdout and "dtd-ablation" in out.stdout


# --- cluster.yaml ------------------------------------------------------------------------------

def test_cluster_yaml_passes_rays_validation_and_opens_nothing_to_the_world():
    from ray.autoscaler._private.util import prepare_config, validate_config
    raw = (REPO / "cluster.yaml").read_text()
    cfg = prepare_config(yaml.safe_load(raw))
    validate_config(cfg)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "the head runs no trials"
    gpu = [t for name, t in types.items() if t["resources"].get("GPU", 0) > 0]
    assert gpu and all(t["min_workers"] == 0 and t["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
                       for t in gpu)
    assert all("SecurityGroupIds" in t["node_config"] for t in types.values())
    assert "0.0.0.0" not in yaml.safe_dump(cfg), "no rule or bind address open to the world"
    assert all("--dashboard-host=0.0.0.0" not in c for c in cfg["head_start_ray_commands"])
    assert any("pip install" in c and "/home/ubuntu/rsnl" in c for c in cfg["setup_commands"])


def test_gpu_checks(ray_session, tmp_path, monkeypatch):
    """A GPU request on a cluster without GPUs fails unless the autoscaler can add GPU nodes."""
    import tune.resources as res
    with pytest.raises(ConfigError, match="no GPU and no autoscaling GPU node type"):
        res.check_cluster_gpus(0.5)
    res.check_cluster_gpus(0)
    bootstrap = tmp_path / "ray_bootstrap_config.yaml"
    bootstrap.write_text(yaml.safe_dump({"available_node_types": {
        "head": {"resources": {"CPU": 0}, "max_workers": 0},
        "gpu": {"resources": {"CPU": 4, "GPU": 1}, "min_workers": 0, "max_workers": 4}}}))
    monkeypatch.setattr(res, "BOOTSTRAP_CONFIG", bootstrap)
    assert res.autoscaler_gpu_types(bootstrap) == ["gpu"]
    monkeypatch.setattr(res, "autoscaler_gpu_types", lambda path=bootstrap: ["gpu"])
    res.check_cluster_gpus(0.25)


# --- studies on the session's Ray ------------------------------------------------------------

def test_grid_trials_report_every_epoch_with_tensorboard_events(grid_experiment):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    dirs = trial_dirs(grid_experiment)
    assert len(dirs) == 8
    for d in dirs:
        rows = results_of(d)
        assert [r["epoch"] for r in rows] == [0, 1, 2]
        for key in ("train_loss", "val_acc", "test_acc", "alpha", "kept_frac", "select_precision",
                    "select_recall", "noise_auroc", "epoch_seconds"):
            assert key in rows[-1]
        events = list(d.glob("events.out.tfevents.*"))
        assert events
        acc = EventAccumulator(str(d), size_guidance={"scalars": 0}).Reload()
        tags = acc.Tags()["scalars"]
        for metric in ("val_acc", "test_acc", "kept_frac", "select_precision", "noise_auroc", "alpha"):
            tag = f"ray/tune/{metric}"
            assert tag in tags
        steps = [e.step for e in acc.Scalars("ray/tune/test_acc")]
        values = [e.value for e in acc.Scalars("ray/tune/test_acc")]
        assert steps == [1, 2, 3]
        assert values == pytest.approx([r["test_acc"] for r in rows], abs=1e-4)
        hparams = acc.PluginTagToContent("hparams")
        assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(hparams), "hparams written"
    variants = {json.loads((d / "params.json").read_text())["variant"]["name"] for d in dirs}
    assert variants == {"coop", "rsnl-m2"}


def test_every_trial_keeps_its_draw_and_reports_its_hash(grid_experiment, optuna_experiment):
    """noise_manifest.csv in each trial folder (one per member in a group), its sha256 in every result; the
    same seed and noise rate give the same draw for every method."""
    import hashlib
    by_draw = {}
    for d in trial_dirs(grid_experiment):
        text = (d / "noise_manifest.csv").read_bytes()
        rows = results_of(d)
        assert {r["noise_manifest_sha256"] for r in rows} == {hashlib.sha256(text).hexdigest()}
        params = json.loads((d / "params.json").read_text())
        by_draw.setdefault((params["noise_rate"], params["seed"]), set()).add(text)
    assert len(by_draw) == 4 and all(len(texts) == 1 for texts in by_draw.values())
    for d in trial_dirs(optuna_experiment):
        members = results_of(d)[-1]["group"]
        for member, seed in (("seed=1", 1), ("seed=2", 2)):
            text = (d / f"noise_manifest_seed={seed}.csv").read_bytes()
            assert members[member]["noise_manifest_sha256"] == hashlib.sha256(text).hexdigest()


def test_group_objective_is_the_member_mean_and_optuna_db_matches(optuna_experiment):
    import optuna
    dirs = trial_dirs(optuna_experiment)
    assert len(dirs) == 4
    last = {}
    for d in dirs:
        rows = results_of(d)
        assert len(rows) == 3
        members = rows[-1]["group"]
        assert set(members) == {"seed=1", "seed=2"}
        assert rows[-1]["val_acc"] == pytest.approx(sum(m["val_acc"] for m in members.values()) / 2)
        last[rows[-1]["trial_id"]] = rows[-1]["val_acc"]
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{Path(optuna_experiment) / 'optuna.db'}")
    trials = study.get_trials()
    assert len(trials) == 4
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert {t.user_attrs["tune_trial_id"]: t.value for t in trials} == pytest.approx(last)
    assert set(trials[0].params) == {"blocks", "alpha_base", "alpha_rate"}


def test_trial_retried_after_a_crash_ends_like_an_uninterrupted_one(ray_session, ray_env, tmp_path, study_cache):
    """Exact resume inside Tune: a trial that dies after epoch 1 continues from its checkpoint."""
    values = grid_study(tmp_path / "a", study_cache, name="plain", epochs=4)
    values["search"]["params"] = {"seed": {"grid": [3]}}
    values["variants"] = [{"name": "rsnl-m2", "blocks": 2}]
    plain, _, _ = run(values)
    with fail_once_at(1, tmp_path / "fault.done") as fault:
        values.update(name="crashed", storage=str(tmp_path / "b"))
        crashed, _, _ = run(values)
    assert fault.exists(), "the fault fired"
    (a,), (b,) = list(plain), list(crashed)
    assert b.error is None
    rows_a, rows_b = results_of(Path(a.path)), results_of(Path(b.path))
    assert [r["epoch"] for r in rows_b] == [0, 1, 2, 3]
    drop = {"epoch_seconds", "time_this_iter_s", "time_total_s", "timestamp", "date", "pid", "trial_id",
            "time_since_restore", "iterations_since_restore", "experiment_tag", "hostname", "node_ip", "node_id",
            "checkpoint_dir_name", "done", "config", "training_iteration"}
    for ra, rb in zip(rows_a, rows_b):
        assert {k: v for k, v in ra.items() if k not in drop} == {k: v for k, v in rb.items() if k not in drop}


def test_grouped_trial_side_by_side_after_a_crash_ends_like_one_at_a_time(ray_session, tmp_path, study_cache,
                                                                          monkeypatch):
    """A trial's members train side by side by default (batch_members), one at a time with batch_members
    false: the same numbers, and after a crash the side-by-side trial resumes each member from its own
    checkpoint. The trial's record says which members trained together, and its result.json keeps the
    epochs before the crash although Tune's copy of it in the storage lagged behind when the trial failed."""
    monkeypatch.setenv("TUNE_GLOBAL_CHECKPOINT_S", "3600")  # no copy of Tune's own overwrites the stale one
    values = grid_study(tmp_path / "a", study_cache, name="one-at-a-time", batch_members=False)
    values["search"]["params"] = {}
    values["variants"] = [{"name": "rsnl-m2", "blocks": 2}]
    values["group"] = {"noise_rate": [0.25, 0.5], "seed": [1, 2]}
    alone, _, _ = run(values)
    values["trial"]["batch_members"] = True
    with fail_once_at(1, tmp_path / "fault.done", stale_results_in=tmp_path / "b" / "side-by-side") as fault:
        values.update(name="side-by-side", storage=str(tmp_path / "b"))
        together, _, _ = run(values)
    assert fault.exists(), "the fault fired"
    (a,), (b,) = list(alone), list(together)
    assert b.error is None
    rows_a, rows_b = results_of(Path(a.path)), results_of(Path(b.path))
    assert [r["epoch"] for r in rows_b] == [0, 1, 2]
    for ra, rb in zip(rows_a, rows_b):
        assert set(ra["group"]) == set(rb["group"]) and len(rb["group"]) == 4
        for member, ma in ra["group"].items():
            mb = rb["group"][member]
            for k, v in ma.items():
                if isinstance(v, str) or v != v:  # the manifest's hash; NaN (e.g. no blend)
                    assert mb[k] == v or (mb[k] != mb[k] and v != v), (member, k)
                elif k != "epoch_seconds":
                    assert mb[k] == pytest.approx(v, rel=1e-6, abs=1e-9), (member, k)
    record_a = json.loads((Path(a.path) / "rsnl_trial.json").read_text())
    record_b = json.loads((Path(b.path) / "rsnl_trial.json").read_text())
    assert record_b["side_by_side"] == {"groups": [list(record_b["members"])], "notes": []}
    assert record_a["side_by_side"]["groups"] == [[m] for m in record_a["members"]]


def test_driver_says_once_when_members_cannot_all_train_side_by_side(tmp_path, caplog):
    from rsnl.study import parse_study
    from tune.trainable import log_side_by_side
    values = grid_study(tmp_path, tmp_path / "cache")
    values["search"]["params"] = {}
    values["group"] = {"n_ctx": [4, 8], "seed": [1, 2]}
    with caplog.at_level("WARNING", logger="rsnl.members"):
        log_side_by_side(parse_study(values))
    lines = [r.getMessage() for r in caplog.records if r.name == "rsnl.members"]
    assert lines == ["members differ in n_ctx: a trial trains them in 2 side-by-side groups (one text-tower pass "
                     "per group and step) instead of one"]
    caplog.clear()
    values["group"] = {"seed": [1, 2], "blocks": [1, 2]}  # several block counts stack fine
    with caplog.at_level("WARNING", logger="rsnl.members"):
        log_side_by_side(parse_study(values))
    assert not [r for r in caplog.records if r.name == "rsnl.members"]


# --- own Ray processes --------------------------------------------------------------------------

@pytest.fixture
def ray_tmp():
    """A short RAY_TMPDIR for a Ray of its own (unix socket paths must stay under 107 bytes)."""
    import shutil
    import tempfile
    path = tempfile.mkdtemp(prefix="rsnl-ray-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_study_on_a_three_node_cluster_computes_features_once(tmp_path, ray_env, ray_tmp):
    env = {**os.environ, **ray_env, "RAY_TMPDIR": ray_tmp}
    p = subprocess.run([sys.executable, str(REPO / "tests" / "cluster_study.py"), str(tmp_path / "st"),
                        str(tmp_path / "cache")], capture_output=True, text=True, env=env, timeout=600)
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    assert p.returncode == 0 and line, p.stdout[-2000:] + p.stderr[-2000:]
    out = json.loads(line[-1][len("RESULT "):])
    assert out["errors"] == 0 and out["trials"] == 4
    assert out["trial_nodes"] == out["worker_nodes"], "trials ran on both GPU workers, none on the head"
    assert out["banks"] == 1 and out["computed"] == 1 + 3 and out["hits"] == 0  # 1 augmented + 3 test views
    assert len(list((tmp_path / "cache").rglob("*.pt"))) == 4


def test_finished_study_keeps_the_last_two_checkpoints_of_each_trial(grid_experiment):
    """Tune keeps every checkpoint during the study (tune/checkpoints.py); at the end the state in the
    storage names each trial's last one, and only it and the one before remain."""
    import pyarrow.fs
    from tune.checkpoints import durable_checkpoints
    exp = Path(grid_experiment)
    latest = durable_checkpoints(pyarrow.fs.LocalFileSystem(), str(exp))
    assert sorted(latest) == sorted(d.name for d in trial_dirs(exp)) and set(latest.values()) == {2}  # 3 epochs
    for d in trial_dirs(exp):
        assert sorted(c.name for c in d.glob("checkpoint_*")) == ["checkpoint_000001", "checkpoint_000002"]


def test_pruning_keeps_what_the_stored_state_can_ask_for(tmp_path):
    """Only checkpoints older than the one before the stored state's latest go; without a readable
    state nothing goes."""
    from tune.checkpoints import prune
    exp = tmp_path / "exp"
    for trial, n in (("t_a", 8), ("t_b", 3)):
        for i in range(n):
            (exp / trial / f"checkpoint_{i:06d}").mkdir(parents=True)
    (exp / "t_a" / "checkpoint_000002" / "state.pt").write_bytes(b"x")
    assert prune(str(exp)) == 0  # no experiment state yet
    (exp / "experiment_state-2026-01-01_00-00-00.json").write_text("{not json")
    assert prune(str(exp)) == 0

    def state(name, latest):
        trial_data = [[json.dumps({"relative_logdir": t}),
                       json.dumps({"last_result": {"checkpoint_dir_name": f"checkpoint_{k:06d}"}})]
                      for t, k in latest.items()]
        (exp / name).write_text(json.dumps({"trial_data": trial_data}))

    state("experiment_state-2026-01-01_00-00-01.json", {"t_a": 5, "t_b": 2})
    state("experiment_state-2025-12-31_00-00-00.json", {"t_a": 7, "t_b": 2})  # an older session's: not read
    assert prune(str(exp)) == 4 + 1
    assert sorted(p.name for p in (exp / "t_a").iterdir()) == [f"checkpoint_{i:06d}" for i in (4, 5, 6, 7)]
    assert sorted(p.name for p in (exp / "t_b").iterdir()) == ["checkpoint_000001", "checkpoint_000002"]


def test_nlprompt_runs_in_a_study_beside_coop(ray_session, tmp_path, study_cache):
    """NLPrompt (selector ot, loss ce+mae) as a variant: selection metrics, its OT residual, and the report's
    paired table against CoOp on the same draws."""
    from analysis import load_experiment, paired_table
    from studies import grid_study, run

    values = grid_study(tmp_path / "st", study_cache, name="nlp")
    values["variants"] = [{"name": "coop", "blocks": 1, "selector": "none", "loss": "ce"},
                          {"name": "nlprompt", "blocks": 1, "selector": "ot", "loss": "ce+mae"}]
    values["search"]["params"] = {"noise_rate": {"grid": [0.5]}, "seed": {"grid": [1, 2]}}
    results, exp, _ = run(values)
    assert results.num_errors == 0 and results.num_terminated == 4
    for d in trial_dirs(exp):
        last = results_of(d)[-1]
        if json.loads((d / "params.json").read_text())["variant"]["name"] == "nlprompt":
            assert 0 <= last["ot_residual"] < 1 and 0 < last["kept_frac"] <= 1
            assert 0 <= last["select_precision"] <= 1 and 0 <= last["noise_auroc"] <= 1
            assert last["alpha"] != last["alpha"]  # NaN: no blend in PromptOT
        else:
            assert "ot_residual" not in last and last["kept_frac"] == 1.0
    table = paired_table(load_experiment(exp))
    assert table.rows == ["nlprompt"] and table.cells[("nlprompt", "50%")].n == 2


# --- the study format (rsnl/study.py) -------------------------------------------------------------

def test_the_study_format_names_every_metric_a_trial_reports(digits_inputs):
    from rsnl.study import EPOCH_METRICS, OBJECTIVE_METRICS
    from rsnl.trainer import build_trainer

    cfg, clip, bank = digits_inputs
    gmm = build_trainer(cfg.replace(epochs=1), clip, bank).train_epoch()
    ot = build_trainer(cfg.replace(epochs=1, selector="ot", loss="ce+mae"), clip, bank).train_epoch()
    assert set(gmm) == set(EPOCH_METRICS) - {"ot_residual"} and set(ot) == set(EPOCH_METRICS)
    assert set(OBJECTIVE_METRICS) <= set(EPOCH_METRICS)


def test_searched_strings_never_nest_trial_folders(tmp_path):
    from rsnl.study import StudyConfig, trial_folder_name

    study = StudyConfig(name="paths", trial={}, params={"noise_file": {"grid": ["../../x.csv"]},
                                                        "backbone": {"grid": ["a\\b"]}})
    config = {"noise_file": "../../etc/x.csv", "backbone": "a\\b c", "variant": {"name": "v/1"}}
    name = trial_folder_name("abc12_00001", config, study)
    assert "/" not in name and "\\" not in name and " " not in name and name.startswith("abc12_00001_v_1_")
    assert (tmp_path / name).parent == tmp_path
    assert trial_folder_name("abc12_00002", {"noise_file": "/", "backbone": ".."}, study).count("/") == 0


def test_the_analysis_imports_nothing_from_tune_and_parses_no_tune_state():
    import ast
    for path in (REPO / "analysis").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "tune" or n.startswith(("tune.", "ray")) for n in names), f"{path}: {names}"
        assert "experiment_state" not in path.read_text(), f"{path} reads Tune's private run state"
