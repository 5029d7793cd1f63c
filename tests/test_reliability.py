"""Crashes, races, bad data and bad input lose nothing and explain themselves (the reliability promise).

Crash retry and SIGKILL + resume live in test_tune.py; here: NaN trials inside a study, two processes
racing for one cache entry, unreadable images, the table of bad study configs and command lines, and
the safe-loading and network-binding rules.
"""

import gc
import multiprocessing as mp
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from rsnl.testing import corrupt_file, make_coop_tree
from studies import grid_study, run

REPO = Path(__file__).resolve().parents[1]


# --- NaN in one trial of a study ----------------------------------------------------------------

def test_nan_trial_fails_with_epoch_and_metric_while_the_study_finishes(ray_session, tmp_path, study_cache):
    values = grid_study(tmp_path, study_cache, name="nan", epochs=2, warmup_epochs=0)
    values["search"]["params"] = {"lr": {"grid": [0.002, 1e30]}}  # 1e30 overflows the context vectors
    values["variants"] = [{"name": "rsnl-m2", "blocks": 2}]
    values["max_failures"] = 0
    results, exp, _ = run(values)
    by_lr = {r.config["lr"]: r for r in results}
    assert by_lr[0.002].error is None and by_lr[0.002].metrics["epoch"] == 1
    bad = by_lr[1e30]
    assert bad.error is not None
    text = (Path(bad.path) / "error.txt").read_text()
    assert re.search(r"epoch 0: train_loss is nan", text), text[-1000:]

    from analysis import load_experiment
    frame = load_experiment(exp)
    status = frame.groupby("trial_id")["status"].first()
    assert sorted(status.tolist()) == ["ERROR", "TERMINATED"]


# --- feature cache races --------------------------------------------------------------------------

def _build_once(cache_dir, barrier, out):
    from rsnl.data import load_dataset
    from rsnl.features import cached_features
    from rsnl.models import load_clip
    clip = load_clip("rsnl-tiny", None)
    test = load_dataset("digits").test
    stats = {}
    barrier.wait()
    feats = cached_features(clip.model, clip.identity, test, clip.preprocess, 0, cache_dir, stats=stats)
    out.put((stats, feats.sum().item(), feats.shape[0]))


def test_two_processes_building_one_entry_compute_it_once(tmp_path):
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_build_once, args=(str(tmp_path), barrier, out)) for _ in range(2)]
    for p in procs:
        p.start()
    got = [out.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    computed = sum(s.get("computed", 0) for s, _, _ in got)
    hits = sum(s.get("hits", 0) for s, _, _ in got)
    assert (computed, hits) == (1, 1)
    assert got[0][1:] == got[1][1:], "both read the same features"
    assert not list(tmp_path.rglob("*.tmp")), "no half-written file left"
    assert len(list(tmp_path.rglob("*.pt"))) == 1


# --- unreadable images ----------------------------------------------------------------------------

def test_corrupt_image_stops_a_trial_before_training_naming_the_file(tmp_path):
    make_coop_tree(tmp_path / "data")
    bad = sorted((tmp_path / "data" / "dtd" / "images").rglob("*.jpg"))[3]
    corrupt_file(bad)
    p = subprocess.run([sys.executable, "-m", "rsnl.train", "--set", "dataset=dtd",
                        "--set", f"data_root={tmp_path / 'data'}", "--set", "backbone=rsnl-tiny",
                        "--set", "pretrained=null", "--set", "shots=4", "--set", "val_shots=2",
                        "--set", f"cache_dir={tmp_path / 'cache'}", "--set", "epochs=1"],
                       capture_output=True, text=True, cwd=REPO)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and err and str(bad) in err[-1] and err[-1].startswith("rsnl: error:")
    assert "epoch" not in p.stdout, "no epoch ran"


def test_corrupt_image_in_a_study_is_one_line_and_no_experiment(ray_session, tmp_path, capsys):
    import launch
    make_coop_tree(tmp_path / "data")
    bad = sorted((tmp_path / "data" / "dtd" / "images").rglob("*.jpg"))[-1]
    corrupt_file(bad)
    values = grid_study(tmp_path / "st", tmp_path / "cache", name="badimg", dataset="dtd",
                        data_root=str(tmp_path / "data"), shots=4, val_shots=2)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(values))
    code = launch.main(["--config", str(tmp_path / "s.yaml")])
    # the failed feature task's other output must not surface later as Ray's "Unhandled error" log, which
    # lands in whatever stream is open when its reference is collected
    gc.collect()
    ray_session.get(ray_session.put(0))  # lets Ray process the freed references
    time.sleep(2)
    stderr = capsys.readouterr().err
    err = [x for x in stderr.strip().splitlines() if x.startswith("launch.py")]
    assert code == 2 and len(err) == 1 and str(bad) in err[0]
    assert "Unhandled error" not in stderr
    assert not (tmp_path / "st" / "badimg").exists()


# --- the table of bad inputs ----------------------------------------------------------------------

def _study(tmp_path, **changes):
    values = grid_study(tmp_path / "st", tmp_path / "cache", name="bad")
    for key, value in changes.items():
        if key == "trial":
            values["trial"].update(value)
        else:
            values[key] = value
    return values


BAD_INPUTS = [  # (study changes, extra command-line arguments, what the one line must contain)
    ({"trial": {"bloks": 2}}, [], "trial.bloks: unknown key (did you mean 'blocks'?)"),
    ({"trial": {"shots": "16"}}, [], "shots: must be an integer, got '16'"),
    ({"trial": {"noise_rate": 1.5}}, [], "noise_rate: 1.5 is out of range; allowed: [0.0, 1.0)"),
    ({"trial": {"blocks": 0}}, [], "blocks: 0 is out of range; allowed: [1, 64]"),
    ({"trial": {"shots": 500}}, [], "images in digits/train, shots is 500"),
    ({"trial": {"dataset": "cifar"}}, [], "dataset: 'cifar' is not known"),
    ({"trial": {"backbone": "ViT-B-33"}}, [], "backbone: 'ViT-B-33' is not an open_clip model (did you mean"),
    ({"trial": {"pretrained": "openia"}}, [], "pretrained: 'openia' is not a tag of rsnl-tiny"),
    ({"trial": {"pretrained": "/nowhere/RN50.pt"}}, [], "checkpoint file /nowhere/RN50.pt does not exist"),
    ({"trial": {"dataset": "dtd", "data_root": "/nowhere/data"}}, [], "/nowhere/data"),
    ({"trial": {"selector": "gmmm"}}, [], "selector: 'gmmm' is not allowed (did you mean 'gmm'?)"),
    ({"trial": {"ctx_init": "a photo of a"}}, [], "ctx_init: with blocks > 1"),
    ({"search": {"kind": "optuna", "params": {"lr": {"grid": [0.1]}}}, "variants": []}, [],
     "cannot be combined with an optuna search"),
    ({"search": {"kind": "optuna", "params": {}}, "variants": []}, [], "search.params: empty"),
    ({"search": {"kind": "grid", "params": {"lr": {"uniform": [0.1, 0.2]}}}}, [], "a grid study takes grid"),
    ({"objective": {"metric": "acc"}}, [], "objective.metric: 'acc' is not reported"),
    ({"objective": {"mode": "maximize"}}, [], "objective.mode: 'maximize' is not allowed"),
    ({"resources": {"gpu": -1}}, [], "resources.gpu: -1 is out of range"),
    ({}, ["--gpus-per-trial", "1.5"], "--gpus-per-trial: 1.5 is not allowed"),
    ({}, ["--gpus-per-trial", "0.5"], "this machine has no CUDA GPU"),
    ({}, ["--cpus-per-trial", "0"], "--cpus-per-trial: 0.0 is out of range"),
    ({}, ["--storage", "/etc/hostname/results"], "cannot be created (/etc/hostname is a file)"),
    ({}, ["--storage", "/proc/rsnl"], "is not writable"),
    ({}, ["--name", ""], "--name: must be one folder name"),
    ({}, ["--name", ".."], "--name: must be one folder name"),
    ({}, ["--name", "a/b"], "--name: must be one folder name"),
    ({"max_failures": -1}, [], "max_failures: -1 is out of range"),
    ({"trial": {"backbone": "RN50", "pretrained": "openai"}}, [], "weights RN50/openai are not in the local cache"),
    ({}, ["--storage", "s3://rsnl/st?endpoint_override=127.0.0.1:1&scheme=http&region=us-east-1"],
     "storage: cannot reach s3://rsnl/st"),
    ({"trial": {"noise_file": "BINARY"}}, [], "BINARY is not a text file"),
    ({"trial": {"noise_file": "SIXTEEN_SHOTS", "noise_rate": 0.5}, "search": {"kind": "grid", "params": {}}}, [],
     "SIXTEEN_SHOTS has 16 train images per class but the trial says shots 8"),
]


def sixteen_shot_manifest(path) -> str:
    """A noise manifest of a 16-shot draw from digits at 50 % noise (what a 16-shot trial writes)."""
    from rsnl.data import load_dataset
    from rsnl.manifest import manifest_text
    from rsnl.noise import sample_noisy_fewshot
    d = load_dataset("digits")
    samples = {split: sample_noisy_fewshot(np.asarray(part.labels), len(d.classnames), 16, 0.5, "ptnl", 1)
               for split, part in (("train", d.train), ("val", d.val))}
    Path(path).write_text(manifest_text(samples, {"train": d.train.ids, "val": d.val.ids}, d.classnames))
    return str(path)


@pytest.mark.parametrize("changes, args, message", BAD_INPUTS)
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, monkeypatch, capsys, changes, args, message):
    """One line, before the study's first console line and before Ray starts."""
    import ray
    import launch
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # a bucket's client must not look elsewhere
        monkeypatch.setenv(key, "rsnl-test")
    files = {"BINARY": tmp_path / "manifest.bin", "SIXTEEN_SHOTS": tmp_path / "manifest16.csv"}
    files["BINARY"].write_bytes(bytes(range(256)) * 4)
    sixteen_shot_manifest(files["SIXTEEN_SHOTS"])
    for name, path in files.items():
        changes = {k: ({**v, "noise_file": str(path)} if isinstance(v, dict) and v.get("noise_file") == name else v)
                   for k, v in changes.items()}
        message = message.replace(name, str(path))
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(_study(tmp_path, **changes)))
    ray_was_up = ray.is_initialized()
    code = launch.main(["--config", str(path), *args])
    out, err = capsys.readouterr()
    err = err.strip().splitlines()
    assert code == 2
    assert out == "", "nothing printed before the error (no header)"
    assert len(err) == 1 and err[0].startswith("launch.py: error:"), err
    assert message in err[0], err[0]
    assert not (tmp_path / "st").exists(), "no partial experiment folder"
    assert ray.is_initialized() == ray_was_up, "Ray was not started for a bad input"


def test_the_bad_input_table_is_large(tmp_path):
    assert len(BAD_INPUTS) >= 20


# --- safe loading and ports -----------------------------------------------------------------------

def test_every_torch_load_is_weights_only():
    import ast
    calls = []
    for path in list((REPO / "rsnl").rglob("*.py")) + list((REPO / "tune").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
                kw = {k.arg: k.value for k in node.keywords}
                calls.append((path.name, node.lineno, getattr(kw.get("weights_only"), "value", None)))
    assert len(calls) >= 3, calls  # trainer checkpoints, Tune checkpoints, feature cache
    assert all(flag is True for _, _, flag in calls), calls


def test_a_local_study_serves_no_dashboard(ray_env):
    code = ("from tune.resources import init_ray; import ray; ctx = init_ray(None, num_cpus=1); "
            "print('URL', ctx.dashboard_url or ''); ray.shutdown()")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       env={**__import__('os').environ, **ray_env})
    line = [x for x in p.stdout.splitlines() if x.startswith("URL")]
    assert p.returncode == 0 and line == ["URL "], p.stdout + p.stderr[-2000:]
