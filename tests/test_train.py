"""rsnl.trainer and rsnl.train: the epoch loop on digits + rsnl-tiny, its metrics, determinism, exact resume, losses,
non-finite detection and the command line."""

import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rsnl.config import ConfigError
from rsnl.data import DataError
from rsnl.similarity import alpha_schedule
from rsnl.device import resolve_device
from rsnl.errors import NonFiniteError
from rsnl.inputs import preflight, trial_data
from rsnl.train import json_safe, main
from rsnl.trainer import Trainer, build_trainer, load_checkpoint, noisy_label_loss

pytestmark = pytest.mark.usefixtures("torch_one_thread")

REPO = Path(__file__).resolve().parent.parent
REQUIRED = ("epoch", "train_loss", "val_acc", "test_acc", "alpha", "kept_frac", "select_precision",
            "select_recall", "noise_auroc", "epoch_seconds")


def without_time(history):
    """Comparable metrics: no wall time, and NaN (e.g. block_cosine of one block) as a string, since NaN != NaN."""
    return [{k: "nan" if isinstance(v, float) and math.isnan(v) else v for k, v in m.items() if k != "epoch_seconds"}
            for m in history]


def trainer(inputs, **changes) -> Trainer:
    cfg, clip, bank = inputs
    return build_trainer(cfg.replace(**changes), clip, bank)


# ---- one run -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def three_epochs(digits_inputs):
    """The base config (digits, 8 shots, ptnl 0.5, 2 blocks, n_ctx 4, 2 views) trained for 3 epochs."""
    tr = trainer(digits_inputs)
    return tr, tr.run()


def test_metrics_every_epoch(digits_inputs, three_epochs):
    cfg = digits_inputs[0]
    tr, history = three_epochs
    assert len(history) == 3 and tr.done and tr.epoch == 3
    for e, m in enumerate(history):
        assert set(REQUIRED) <= set(m), set(REQUIRED) - set(m)
        assert m["epoch"] == e
        assert m["alpha"] == alpha_schedule(e, cfg.alpha_base, cfg.alpha_rate)
        assert math.isfinite(m["train_loss"]) and m["train_loss"] > 0
        assert 0 <= m["val_acc"] <= 100 and 0 <= m["test_acc"] <= 100
        assert 0 < m["kept_frac"] <= 1 and 0 <= m["select_precision"] <= 1 and 0 <= m["select_recall"] <= 1
        assert 0 <= m["noise_auroc"] <= 1  # half the sample is noisy, so AUROC is defined
        assert m["epoch_seconds"] > 0
        # plain Python numbers: checkpoints are read back with weights_only=True, which refuses numpy scalars
        assert type(m["epoch"]) is int and all(type(v) is float for k, v in m.items() if k != "epoch")
    # warm-up epoch at constant warmup_lr, then cosine over all epochs
    assert history[0]["lr"] == pytest.approx(cfg.warmup_lr)
    for e in (1, 2):
        assert history[e]["lr"] == pytest.approx(cfg.lr * 0.5 * (1 + math.cos(math.pi * e / cfg.epochs)))
    # the sample is 8 shots x 10 classes, half of them noisy (ptnl 0.5)
    s = tr.data.sample
    assert len(s) == 80 and s.is_noisy.sum() == 40
    for m in history:  # kept_frac is a count of the 80 samples
        assert m["kept_frac"] * 80 == pytest.approx(round(m["kept_frac"] * 80), abs=1e-9)


def test_epoch0_selection_uses_feature_similarity(digits_inputs, three_epochs):
    """Before training, G = alpha(0) z(p) + (1 - alpha(0)) z(g) with the initial prompts; the metrics
    of epoch 0 are those of that selection."""
    from rsnl.similarity import feature_similarity, prompt_similarity, select_clean, selection_metrics
    cfg = digits_inputs[0]
    tr = trainer(digits_inputs)
    s = tr.data.sample
    with torch.no_grad():
        z_p = prompt_similarity(tr.train_f, tr.prompts.text_features(), s.labels)
    z_g = feature_similarity(tr.train_f, s.labels)
    alpha = alpha_schedule(0, cfg.alpha_base, cfg.alpha_rate)
    assert alpha == 0.2
    g = alpha * z_p + (1 - alpha) * z_g
    keep = select_clean(g, s.labels, "gmm", reg_covar=cfg.gmm_reg_covar, seed=cfg.seed)
    expect = selection_metrics(keep, s.is_noisy, g)
    m0 = three_epochs[1][0]
    for k, v in expect.items():
        assert m0[k] == pytest.approx(v, abs=1e-12), k


def test_same_config_twice_gives_identical_metrics(digits_inputs, three_epochs):
    again = trainer(digits_inputs).run()
    assert without_time(again) == without_time(three_epochs[1])


def test_seed_changes_the_run(digits_inputs, three_epochs):
    other = trainer(digits_inputs, seed=2, epochs=1).run()
    assert other[0]["train_loss"] != three_epochs[1][0]["train_loss"]


def test_exact_resume(digits_inputs, tmp_path):
    full = trainer(digits_inputs, epochs=4)
    full_history = full.run()

    part = trainer(digits_inputs, epochs=4)
    part.train_epoch()
    part.train_epoch()
    part.save(tmp_path / "ckpt.pt")
    del part

    fresh = trainer(digits_inputs, epochs=4)
    fresh.load_state_dict(load_checkpoint(tmp_path / "ckpt.pt"))
    assert fresh.epoch == 2 and len(fresh.history) == 2
    resumed = fresh.run()
    assert without_time(resumed) == without_time(full_history)
    assert torch.equal(fresh.prompts.ctx, full.prompts.ctx)
    assert not torch.equal(full.prompts.ctx, trainer(digits_inputs, epochs=4).prompts.ctx)  # it did train

    # a finished checkpoint has nothing left to do
    done = trainer(digits_inputs, epochs=4)
    done.load_state_dict(full.state_dict())
    assert done.run() == full_history


def test_resume_with_another_config_is_refused(digits_inputs):
    tr = trainer(digits_inputs, epochs=2)
    tr.train_epoch()
    state = tr.state_dict()
    for change, key in (({"lr": 0.01}, "lr"), ({"epochs": 3}, "epochs"), ({"blocks": 3}, "blocks")):
        other = trainer(digits_inputs, **{"epochs": 2, **change})
        with pytest.raises(ConfigError) as e:
            other.load_state_dict(state)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith("checkpoint: made with a different config") and f"({key})" in msg
    # runtime settings may differ (another machine, another cache folder)
    same = trainer(digits_inputs, epochs=2, cache_dir="/elsewhere", num_workers=2)
    same.load_state_dict(state)
    assert same.epoch == 1


# ---- losses --------------------------------------------------------------------------------------


def test_losses_on_hand_example():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0], [1.0, 3.0, 0.5]])
    y = torch.tensor([0, 2, 0])
    z = [math.exp(2) + 1 + math.exp(-1), 3.0, math.e + math.exp(3) + math.exp(0.5)]
    p = [math.exp(2) / z[0], 1 / 3, math.e / z[2]]  # softmax probability of the (noisy) label
    q = 0.7
    ce = sum(-math.log(v) for v in p) / 3
    gce = sum((1 - v ** q) / q for v in p) / 3
    mae = sum(2 * (1 - v) for v in p) / 3
    assert noisy_label_loss(logits, y, "ce").item() == pytest.approx(ce, rel=1e-6)
    assert noisy_label_loss(logits, y, "gce", q).item() == pytest.approx(gce, rel=1e-6)
    assert noisy_label_loss(logits, y, "mae").item() == pytest.approx(mae, rel=1e-6)
    # MAE is the L1 distance between softmax and one-hot
    l1 = (logits.softmax(-1) - F.one_hot(y, 3)).abs().sum(-1).mean()
    assert noisy_label_loss(logits, y, "mae").item() == pytest.approx(l1.item(), rel=1e-6)
    # GCE tends to CE as q -> 0
    assert noisy_label_loss(logits, y, "gce", 1e-4).item() == pytest.approx(ce, rel=1e-3)
    with pytest.raises(ValueError, match="loss 'focal'"):
        noisy_label_loss(logits, y, "focal")


@pytest.mark.parametrize("loss", ["gce", "mae"])
def test_robust_losses_train(digits_inputs, loss):
    h = trainer(digits_inputs, loss=loss, epochs=2).run()
    assert all(math.isfinite(m["train_loss"]) for m in h)
    assert 0 < h[0]["train_loss"] < (1 / 0.7 if loss == "gce" else 2)  # both are bounded


# ---- baselines and options -----------------------------------------------------------------------


def test_coop_baseline_keeps_everything(digits_inputs):
    h = trainer(digits_inputs, blocks=1, selector="none", epochs=2).run()
    assert all(m["kept_frac"] == 1.0 and m["select_recall"] == 1.0 for m in h)
    assert all(m["select_precision"] == pytest.approx(0.5) for m in h)  # ptnl 0.5


def test_ratio_selector_and_no_views(digits_inputs):
    tr = trainer(digits_inputs, selector="ratio", select_ratio=0.25, aug_views=0, epochs=1)
    assert tr.views is None
    h = tr.run()
    assert h[0]["kept_frac"] == pytest.approx(0.25)  # ceil(0.25 * 8) = 2 of 8 per class


def test_class_specific_front_context_trains(digits_inputs):
    tr = trainer(digits_inputs, csc=True, class_token_position="front", epochs=1)
    assert tr.prompts.ctx.shape == (2, 10, 4, 64)
    before = tr.prompts.ctx.detach().clone()
    h = tr.run()
    assert math.isfinite(h[0]["train_loss"]) and not torch.equal(before, tr.prompts.ctx)


def test_nonfinite_loss_names_epoch(digits_inputs):
    """lr 1e10: the warm-up epoch 0 is fine, epoch 1 blows the context up."""
    tr = trainer(digits_inputs, lr=1e10)
    with pytest.raises(NonFiniteError) as e:
        tr.run()
    msg = str(e.value)
    assert msg.startswith("epoch 1: train_loss is nan") and "lower lr" in msg
    assert len(tr.history) == 1 and tr.epoch == 1  # the failed epoch is not recorded


def test_nan_feature_raises(digits_inputs):
    cfg, clip, bank = digits_inputs
    data = trial_data(cfg, bank)
    data.train_views = data.train_views.clone()
    data.train_views[:, 5] = float("nan")  # one sample's augmented views (selection uses view 0)
    tr = Trainer(cfg, data, clip.model, clip.tokenizer, bank.classnames)
    with pytest.raises(NonFiniteError, match=r"^epoch 0: train_loss is nan"):
        tr.train_epoch()


def test_preflight_checks(digits_inputs):
    cfg = digits_inputs[0]
    with pytest.raises(ConfigError, match="^ctx_init: with blocks > 1"):
        preflight(cfg.replace(ctx_init="a photo of a", blocks=2))
    with pytest.raises(DataError, match="shots is 500"):
        preflight(cfg.replace(shots=500))
    assert preflight(cfg.replace(ctx_init="a photo of a", blocks=1)).name == "digits"


def test_unwritable_cache_folder_is_one_line_in_preflight(digits_inputs, tmp_path, monkeypatch, capsys):
    """A cache folder that cannot be created (under a regular file: refused even for root) is named with
    its key in preflight, before any model or feature work, not as a traceback from features or pretrain."""
    cfg = digits_inputs[0]
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    bad = blocker / "cache"
    with pytest.raises(ConfigError) as e:
        preflight(cfg.replace(cache_dir=str(bad)))
    msg = str(e.value)
    assert msg.startswith(f"cache_dir: {bad} ") and "\n" not in msg and "writable folder" in msg
    # $RSNL_CACHE when cache_dir is not set
    monkeypatch.setenv("RSNL_CACHE", str(bad))
    with pytest.raises(ConfigError, match=r"^\$RSNL_CACHE: .*a-file/cache "):
        preflight(cfg.replace(cache_dir=None))
    # the command line: one line, exit 2
    assert main(["--config", str(REPO / "rsnl/configs/digits.yaml"), "--set", f"cache_dir={bad}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"rsnl: error: cache_dir: {bad} ")
    # a writable one passes, and the probe leaves nothing behind
    good = tmp_path / "new" / "cache"
    assert preflight(cfg.replace(cache_dir=str(good))).name == "digits"
    assert good.is_dir() and not list(good.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu():
    with pytest.raises(ConfigError, match="no CUDA GPU is visible"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")


def test_json_safe():
    assert json.loads(json.dumps(json_safe({"a": float("nan"), "b": 1.5, "c": float("inf"), "d": 3}))) == \
        {"a": None, "b": 1.5, "c": None, "d": 3}


# ---- command line --------------------------------------------------------------------------------


def cli(*args, cache, timeout=180):
    env = {"OMP_NUM_THREADS": "1", **os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "rsnl.train", "--config", str(REPO / "rsnl/configs/digits.yaml"),
                        "--set", f"cache_dir={cache}", *args], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=timeout)
    return p, time.perf_counter() - start


QUICK = ["--set", "epochs=2", "--set", "shots=4", "--set", "aug_views=1", "--set", "blocks=2", "--set", "device=cpu"]


@pytest.fixture(scope="module")
def cli_cache(digits_inputs):
    """The session's digits feature cache: the CLI's views 0-1, val and test are hits there."""
    return digits_inputs[0].cache_dir


def test_cli_run_out_and_resume(tmp_path, cli_cache):
    out = tmp_path / "run"
    p, _ = cli(*QUICK, "--out", str(out), cache=cli_cache)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.strip().splitlines()
    final = json.loads(lines[-1])
    assert final["epoch"] == 1 and 0 <= final["test_acc"] <= 100 and set(REQUIRED) <= set(final)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    digest = final.pop("noise_manifest_sha256")
    assert [m["epoch"] for m in metrics] == [0, 1] and metrics[-1] == final
    # every write is atomic: no temporary file is left beside the run's three files
    assert sorted(f.name for f in out.iterdir()) == ["checkpoint.pt", "metrics.jsonl", "noise_manifest.csv"]
    manifest = (out / "noise_manifest.csv").read_text()  # the draw, named by image ids and class names
    assert hashlib.sha256(manifest.encode()).hexdigest() == digest
    assert manifest.splitlines()[0] == "split,image,label,true_label" and "digits#" in manifest

    # resuming the finished run with the same config trains nothing and ends with the same line
    p2, _ = cli(*QUICK, "--out", str(out), "--resume", cache=cli_cache)
    assert p2.returncode == 0, p2.stderr[-2000:]
    assert p2.stdout.strip().splitlines()[-1] == lines[-1]
    assert (out / "metrics.jsonl").read_text().count("\n") == 2

    # a longer run is another config: refused before any model or feature work, the old run untouched
    before = (out / "checkpoint.pt").read_bytes()
    p3, elapsed = cli(*QUICK, "--set", "epochs=3", "--out", str(out), "--resume", cache=cli_cache)
    assert p3.returncode == 2 and p3.stdout == ""
    err = p3.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rsnl: error: checkpoint: made with a different config (epochs)")
    assert (out / "checkpoint.pt").read_bytes() == before
    assert elapsed < 20


@pytest.mark.parametrize("damage", ["truncated", "foreign_dict", "random_bytes", "not_a_dict", "empty"])
def test_cli_resume_from_unreadable_checkpoint_is_one_line(digits_inputs, tmp_path, capsys, damage):
    """A damaged or foreign checkpoint.pt is named in one line (exit 2), not a traceback from torch.load."""
    out = tmp_path / "run"
    out.mkdir()
    ckpt = out / "checkpoint.pt"
    if damage in ("truncated", "empty"):
        tr = trainer(digits_inputs, epochs=1)
        tr.save(ckpt)
        raw = ckpt.read_bytes()
        ckpt.write_bytes(raw[: len(raw) // 2] if damage == "truncated" else b"")
    elif damage == "foreign_dict":
        torch.save({"model": torch.zeros(3), "epoch": 4}, ckpt)
    elif damage == "not_a_dict":
        torch.save([1, 2, 3], ckpt)
    else:
        ckpt.write_bytes(os.urandom(4096))
    assert main(["--config", str(REPO / "rsnl/configs/digits.yaml"), "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"rsnl: error: --resume: {ckpt} is not a readable rsnl checkpoint"), err


def test_cli_bad_set_is_one_line_and_fast(cli_cache):
    p, elapsed = cli("--set", "noise_rat=0.5", cache=cli_cache)
    assert p.returncode == 2 and p.stdout == ""
    err = p.stderr.strip().splitlines()
    assert err == ["rsnl: error: noise_rat: unknown key (did you mean 'noise_rate'?)"], p.stderr
    assert elapsed < 20  # interpreter start and imports included


@pytest.mark.parametrize("bad,message", [
    ("blocks=four", "blocks: must be an integer, got 'four'"),
    ("noise_rate=1.5", "noise_rate: 1.5 is out of range; allowed: [0.0, 1.0)"),
    ("selector=gmmm", "selector: 'gmmm' is not allowed (did you mean 'gmm'?); allowed: gmm, ratio, ot, none"),
    ("blocks", "--set 'blocks': expected key=value"),
])
def test_cli_bad_set_in_process(bad, message, capsys):
    assert main(["--config", str(REPO / "rsnl/configs/digits.yaml"), "--set", bad]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err == f"rsnl: error: {message}\n"


def test_cli_usage_errors_in_process(tmp_path, capsys):
    cfg = str(REPO / "rsnl/configs/digits.yaml")
    assert main(["--config", cfg, "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "rsnl: error: --resume: needs --out DIR, the folder of the run to continue"
    assert main(["--config", cfg, "--out", str(tmp_path / "none"), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rsnl: error: --resume:") and "checkpoint.pt does not exist" in err
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["--config", cfg, "--set", "pretrained=/no/such/file.pt"]) == 2
    assert capsys.readouterr().err.strip() == "rsnl: error: pretrained: checkpoint file /no/such/file.pt does not exist"
    assert main(["--config", cfg, "--set", "backbone=RN5O"]) == 2
    assert "did you mean 'RN50'" in capsys.readouterr().err
    assert main(["--config", cfg, "--set", "dataset=dtd", "--set", f"data_root={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rsnl: error: DTD not found under data_root") and "\n" not in err


def test_drop_last_drops_each_epochs_incomplete_batch(digits_inputs):
    """drop_last (the original code's loader): 80 samples at batch 32 train on 64 per epoch; with fewer
    samples than a batch the one partial batch still trains, as there."""
    base = dict(blocks=1, selector="none", epochs=1, aug_views=0)
    assert len(trainer(digits_inputs, **base).data.sample) == 80  # digits: 10 classes x 8 shots
    start = trainer(digits_inputs, **base).prompts.ctx.clone()
    runs = {}
    for bs in (32, 128):
        for drop in (False, True):
            tr = trainer(digits_inputs, **base, batch_size=bs, drop_last=drop)
            runs[bs, drop] = (tr.run()[0], tr.prompts.ctx)
            assert not torch.equal(tr.prompts.ctx, start)
    assert torch.equal(runs[128, True][1], runs[128, False][1])
    assert without_time([runs[128, True][0]]) == without_time([runs[128, False][0]])
    assert not torch.equal(runs[32, True][1], runs[32, False][1])
    assert runs[32, True][0]["train_loss"] != runs[32, False][0]["train_loss"]


def test_original_schedule_indexing(digits_inputs):
    """warmup_recount restarts the cosine after warm-up (Dassl); alpha_lag 1 gives epoch e alpha(e - 1)."""
    import math
    tr = trainer(digits_inputs, epochs=4, warmup_recount=True, alpha_lag=1)
    lrs = [m["lr"] for m in tr.run()]
    lr = tr.cfg.lr
    assert lrs == pytest.approx([1e-5, lr, lr * 0.5 * (1 + math.cos(math.pi / 4)), lr * 0.5])
    alphas = [m["alpha"] for m in tr.history]
    a, r = tr.cfg.alpha_base, tr.cfg.alpha_rate
    assert alphas == pytest.approx([a, a, a * math.exp(1 / r), a * math.exp(2 / r)])
    plain = trainer(digits_inputs, epochs=4)
    plain.run()
    assert [m["lr"] for m in plain.history][1] == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi / 4)))
    assert [m["alpha"] for m in plain.history][1] == pytest.approx(a * math.exp(1 / r))


def test_each_epoch_reports_both_sides_of_g_and_the_blocks_cosine(digits_inputs):
    from rsnl.similarity import block_cosine, class_cosine, clean_auroc, feature_similarity, prompt_similarity
    tr = trainer(digits_inputs, blocks=3, epochs=2, warmup_epochs=0, lr=0.05)
    sample = tr.data.sample
    text0 = tr.prompts.text_features().detach()
    history = tr.run()
    # the feature side rests on frozen features: one value, every epoch
    expected = clean_auroc(feature_similarity(tr.train_f, sample.labels), sample.is_noisy)
    assert [m["feature_auroc"] for m in history] == [expected, expected]
    # epoch 0 reads the prompts as initialised
    assert history[0]["prompt_auroc"] == clean_auroc(prompt_similarity(tr.train_f, text0, sample.labels),
                                                     sample.is_noisy)
    assert history[0]["block_cosine"] == pytest.approx(block_cosine(text0))
    assert history[1]["block_cosine"] != history[0]["block_cosine"], "the prompts moved"
    assert math.isnan(trainer(digits_inputs, blocks=1, epochs=1).run()[0]["block_cosine"])
    # the classes' cosine is read after the epoch's steps, from the features the accuracies use
    assert history[-1]["class_cosine"] == pytest.approx(class_cosine(tr.prompts.text_features().detach()))
    assert history[0]["class_cosine"] != pytest.approx(class_cosine(text0), abs=1e-9), "read after the steps"


def test_m_identical_blocks_at_m_times_the_lr_train_exactly_like_one_block(digits_inputs):
    """Why more blocks learn more slowly: the loss is on the mean of the block logits, so each block gets
    1/m of the gradient. m identical blocks at m times the lr (warm-up lr too; no weight decay, which the
    mean does not scale) take the steps of one block: they stay identical and every metric matches."""
    cfg = digits_inputs[0]
    same = dict(selector="none", loss="ce", weight_decay=0.0, epochs=3)
    one = trainer(digits_inputs, blocks=1, **same)
    three = trainer(digits_inputs, blocks=3, lr=3 * cfg.lr, warmup_lr=3 * cfg.warmup_lr, **same)
    slow = trainer(digits_inputs, blocks=3, **same)
    with torch.no_grad():
        for t in (three, slow):
            t.prompts.ctx.copy_(one.prompts.ctx.expand_as(t.prompts.ctx))
    start = one.prompts.ctx[0].detach().clone()
    h1, h3 = one.run(), three.run()
    slow.run()
    for a, b in zip(h1, h3):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
        assert (b["val_acc"], b["test_acc"]) == (a["val_acc"], a["test_acc"])
    for block in three.prompts.ctx:
        torch.testing.assert_close(block, one.prompts.ctx[0], rtol=1e-4, atol=1e-6)
    # at the protocol's lr the three blocks move less than half as far (a third, had the gradients not
    # grown where they lag): the same prompt, learning slower
    moved = lambda ctx: float((ctx.detach() - start).norm())
    assert moved(slow.prompts.ctx[0]) < 0.5 * moved(one.prompts.ctx[0])
