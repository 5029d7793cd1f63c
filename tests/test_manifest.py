"""Noise manifests (rsnl/manifest.py): every trial writes its draw, `noise_file` replays it bit for bit, and a
manifest that does not fit the dataset is refused in one line."""

import hashlib
from pathlib import Path

import pytest

from rsnl.config import ConfigError
from rsnl.data import DataError
from rsnl.manifest import HEADER, read_manifest
from rsnl.inputs import load_inputs, trial_data
from rsnl.trainer import build_trainer

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def without_time(history):
    return [{k: v for k, v in m.items() if k != "epoch_seconds"} for m in history]


@pytest.fixture(scope="module")
def written(digits_inputs, tmp_path_factory):
    """A trial's run and the manifest of its draw, written to a file."""
    cfg, clip, bank = digits_inputs
    trainer = build_trainer(cfg, clip, bank)
    history = trainer.run()
    path = tmp_path_factory.mktemp("manifest") / "noise_manifest.csv"
    path.write_text(trainer.data.manifest)
    return trainer, without_time(history), path


def test_manifest_names_every_sample_by_image_id_and_class_name(written, digits_inputs):
    trainer, _, path = written
    cfg, _, bank = digits_inputs
    lines = path.read_text().splitlines()
    assert lines[0] == ",".join(HEADER)
    train = [line.split(",") for line in lines[1:] if line.startswith("train,")]
    val = [line.split(",") for line in lines[1:] if line.startswith("val,")]
    s = trainer.data.sample
    assert len(train) == len(s) and len(val) == len(trainer.data.val_sample)
    for (split, image, label, true), i, y, t in zip(train, s.indices, s.labels, s.true_labels):
        assert image == bank.train_ids[i] and image.startswith("digits#")
        assert (label, true) == (bank.classnames[y], bank.classnames[t])
    assert sum(label != true for _, _, label, true in train) == int(s.is_noisy.sum()) > 0
    assert trainer.manifest_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_replay_is_bit_for_bit(written, digits_inputs):
    trainer, history, path = written
    cfg, clip, bank = digits_inputs
    replay = build_trainer(cfg.replace(noise_file=str(path)), clip, bank)
    assert replay.data.manifest == trainer.data.manifest and replay.manifest_sha256 == trainer.manifest_sha256
    assert without_time(replay.run()) == history


def test_replay_ignores_the_seed_for_the_draw_only(written, digits_inputs):
    """Another seed with the same manifest: the same images and labels, other prompt init and batches."""
    trainer, history, path = written
    cfg, clip, bank = digits_inputs
    other = build_trainer(cfg.replace(noise_file=str(path), seed=cfg.seed + 1), clip, bank)
    assert (other.data.sample.indices == trainer.data.sample.indices).all()
    assert without_time(other.run()) != history


def rewrite(path: Path, tmp_path, old: str, new: str, count=1) -> Path:
    out = tmp_path / "edited.csv"
    out.write_text(path.read_text().replace(old, new, count))
    return out


@pytest.mark.parametrize("old,new,message", [
    ("split,image,label,true_label", "split,img,label,true_label", "must start with the header"),
    ("train,digits#", "train,nowhere#", "is not in the dataset's train pool"),
    (",one,", ",uno,", "class 'uno' is not a class of the dataset"),
    ("train,", "test,", "split 'test' is not allowed"),
])
def test_a_manifest_that_does_not_fit_is_one_line(written, digits_inputs, tmp_path, old, new, message):
    _, _, path = written
    cfg, _, bank = digits_inputs
    bad = rewrite(path, tmp_path, old, new)
    with pytest.raises(DataError) as e:
        trial_data(cfg.replace(noise_file=str(bad)), bank)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"noise_file: {bad}") and message in msg


def test_a_true_label_that_contradicts_the_dataset_is_refused(written, digits_inputs, tmp_path):
    _, _, path = written
    cfg, _, bank = digits_inputs
    lines = path.read_text().splitlines()
    split, image, label, true = lines[1].split(",")
    wrong = next(c for c in bank.classnames if c != true)
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join([lines[0], f"{split},{image},{label},{wrong}", *lines[2:]]) + "\n")
    with pytest.raises(DataError, match=f"line 2: image '{image}' is a '{true}' in the dataset, the file says"):
        trial_data(cfg.replace(noise_file=str(bad)), bank)


def test_noise_rate_must_describe_the_manifest(written, digits_inputs):
    _, _, path = written
    cfg, _, bank = digits_inputs
    with pytest.raises(ConfigError, match="has 50.0% noisy training labels but the trial says noise_rate 0.25"):
        trial_data(cfg.replace(noise_file=str(path), noise_rate=0.25), bank)


def test_shots_must_describe_the_manifest(written, digits_inputs):
    """An 8-shot draw replayed by a trial that says 4 shots would train on 8 per class and be reported
    under 4: refused, as a disagreeing noise rate is."""
    _, _, path = written
    cfg, _, bank = digits_inputs
    with pytest.raises(ConfigError) as e:
        trial_data(cfg.replace(noise_file=str(path), shots=4), bank)
    assert str(e.value) == (f"noise_file: {path} has 8 train images per class but the trial says shots 4; set shots "
                            f"to the manifest's (reports group by it)")
    with pytest.raises(ConfigError, match="has 8 val images per class but the trial says val_shots 16"):
        trial_data(cfg.replace(noise_file=str(path), val_shots=16), bank)


def test_a_manifest_that_is_not_text_is_one_line(digits_inputs, tmp_path):
    cfg, _, bank = digits_inputs
    for content in (bytes(range(256)) * 8, b"split,image,label,true_label\ntrain,\x00,a,a\n"):
        bad = tmp_path / "manifest.bin"
        bad.write_bytes(content)
        with pytest.raises(DataError) as e:
            trial_data(cfg.replace(noise_file=str(bad)), bank)
        assert str(e.value) == (f"noise_file: {bad} is not a text file; a noise manifest is CSV text starting "
                                f"with the header split,image,label,true_label")


def test_manifest_from_elsewhere_replays_on_both_dtd_layouts(coop_dtd_root, torchvision_dtd_root, tmp_path):
    """A file another codebase could write (CoOp impaths, class names) names the same images in CoOp's and
    torchvision's DTD layouts."""
    from rsnl.config import TrialConfig
    rows = [",".join(HEADER)]
    rows += [f"train,{c}/{c}_{n:04d}.jpg,{label},{c}" for c, n, label in  # 2 per label, one of them noisy
             (("banded", 1, "banded"), ("blotchy", 1, "banded"), ("braided", 1, "braided"), ("bubbly", 1, "braided"),
              ("bumpy", 1, "bumpy"), ("banded", 2, "bumpy"), ("blotchy", 2, "blotchy"), ("braided", 2, "blotchy"))]
    rows += [f"val,{c}/{c}_{n:04d}.jpg,{c},{c}" for c in ("banded", "bumpy") for n in (17, 18)]
    manifest = tmp_path / "elsewhere.csv"
    manifest.write_text("\n".join(rows) + "\n")
    drawn = {}
    for root in (coop_dtd_root, torchvision_dtd_root):
        cfg = TrialConfig(dataset="dtd", data_root=str(root), backbone="rsnl-tiny", pretrained=None, shots=2,
                          noise_rate=0.5, aug_views=0, device="cpu", cache_dir=str(tmp_path / "cache"),
                          noise_file=str(manifest))
        _, bank = load_inputs(cfg)
        data = trial_data(cfg, bank)
        drawn[root] = [bank.train_ids[i] for i in data.sample.indices]
        assert data.sample.noise_fraction == 0.5 and len(data.val_sample) == 4
    assert drawn[coop_dtd_root] == drawn[torchvision_dtd_root] == [r.split(",")[1] for r in rows[1:9]]


def test_read_manifest_checks_duplicates(tmp_path):
    path = tmp_path / "dup.csv"
    path.write_text("split,image,label,true_label\ntrain,a,x,x\ntrain,a,x,x\nval,b,x,x\n")
    with pytest.raises(DataError, match="names an image of the train sample twice"):
        read_manifest(path, {"train": ["a"], "val": ["b"]}, {"train": [0], "val": [0]}, ["x"])
