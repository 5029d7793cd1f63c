"""rsnl.data: every dataset source on generated trees, and the one-line messages for bad input."""

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from rsnl.testing import (
    DEFAULT_COUNTS,
    DTD_CLASSES,
    corrupt_file,
    make_coop_tree,
    make_imagefolder_tree,
    make_torchvision_dtd_tree,
    touch_later,
)

from rsnl.data import (
    DataError,
    Dataset,
    ImageSet,
    check_shots,
    list_datasets,
    load_dataset,
)

SPLITS = ("train", "val", "test")
N_CLASSES = len(DTD_CLASSES)


def error_line(excinfo, *needles) -> str:
    """The DataError's message, asserted to be one line that contains every needle."""
    msg = str(excinfo.value)
    assert "\n" not in msg and msg.strip() == msg
    for needle in needles:
        assert str(needle) in msg, f"{needle!r} not in {msg!r}"
    return msg


def assert_labels_match_folders(imageset: ImageSet):
    """Generated files live in <class>/..., so each file's folder must be its label's class name."""
    for label, src in zip(imageset.labels, imageset.sources):
        assert Path(src).parent.name == imageset.classnames[label]


# ---- CoOp layout ---------------------------------------------------------------------------------


def test_coop_dtd_lists_splits_labels_and_classnames(coop_dtd_root):
    ds = load_dataset("dtd", str(coop_dtd_root))
    assert isinstance(ds, Dataset) and ds.name == "dtd"
    assert ds.classnames == DTD_CLASSES
    for split in SPLITS:
        s = getattr(ds, split)
        assert s.name == f"dtd/{split}"
        assert s.classnames == DTD_CLASSES
        assert len(s) == N_CLASSES * DEFAULT_COUNTS[split]
        assert s.labels.dtype == np.int64 and s.labels.shape == (len(s),)
        assert np.bincount(s.labels).tolist() == [DEFAULT_COUNTS[split]] * N_CLASSES
        assert all(isinstance(p, str) and os.path.isfile(p) for p in s.sources)
        assert_labels_match_folders(s)
    # no file appears in two splits
    all_sources = ds.train.sources + ds.val.sources + ds.test.sources
    assert len(set(all_sources)) == len(all_sources)


def test_load_returns_rgb_of_file_size(coop_dtd_root):
    s = load_dataset("dtd", coop_dtd_root).train
    img = s.load(3)
    assert img.mode == "RGB" and img.size == (24, 24)
    # a greyscale file comes back as RGB too
    from PIL import Image

    Image.new("L", (10, 7), 128).save(s.sources[0])
    img = s.load(0)
    assert img.mode == "RGB" and img.size == (10, 7)


def test_fingerprint_is_stable_and_sees_content_changes(coop_dtd_root):
    a = load_dataset("dtd", coop_dtd_root).train
    b = load_dataset("dtd", coop_dtd_root).train
    assert a.fingerprint() == b.fingerprint()
    assert len(a.fingerprint()) == 64 and int(a.fingerprint(), 16) >= 0
    before = a.fingerprint()
    touch_later(a.sources[5])  # a later mtime is not other pixels
    assert a.fingerprint() == before
    data = bytearray(Path(a.sources[5]).read_bytes())
    data[-3] ^= 0xFF  # one byte, same size
    Path(a.sources[5]).write_bytes(bytes(data))
    assert a.fingerprint() != before
    # splits and subsets differ from each other
    ds = load_dataset("dtd", coop_dtd_root)
    assert len({ds.train.fingerprint(), ds.val.fingerprint(), ds.test.fingerprint()}) == 3
    assert ds.train.subset([0, 1]).fingerprint() != ds.train.fingerprint()


def test_subset_keeps_order_name_and_classes(coop_dtd_root):
    s = load_dataset("dtd", coop_dtd_root).train
    sub = s.subset(np.array([7, 2, 7]))
    assert len(sub) == 3 and sub.name == s.name and sub.classnames == s.classnames
    assert sub.labels.tolist() == [s.labels[7], s.labels[2], s.labels[7]]
    assert sub.sources == [s.sources[7], s.sources[2], s.sources[7]]


def test_coop_non_dtd_dataset_uses_label_order_not_sorted_names(tmp_path):
    classes = ["River", "AnnualCrop", "Forest"]  # label order differs from alphabetical order
    make_coop_tree(tmp_path, classes, {"train": 4, "val": 2, "test": 3}, dataset="eurosat")
    assert (tmp_path / "eurosat" / "2750" / "River").is_dir()
    ds = load_dataset("eurosat", tmp_path)
    assert ds.name == "eurosat" and ds.classnames == classes
    assert [len(ds.train), len(ds.val), len(ds.test)] == [12, 6, 9]
    assert ds.test.name == "eurosat/test"
    for s in (ds.train, ds.val, ds.test):
        assert_labels_match_folders(s)


def test_coop_dataset_with_empty_image_dir(tmp_path):
    # stanford_cars' impaths are relative to the dataset folder itself (image_dir "")
    make_coop_tree(tmp_path, ["a b", "c d"], {"train": 2, "val": 1, "test": 1}, dataset="stanford_cars")
    ds = load_dataset("stanford_cars", tmp_path)
    assert ds.train.sources[0] == str(tmp_path / "stanford_cars" / "a b" / "a b_0001.jpg")
    assert ds.train.load(0).mode == "RGB"


# ---- DTD in torchvision's layout -----------------------------------------------------------------


def test_torchvision_dtd_layout(torchvision_dtd_root):
    ds = load_dataset("dtd", torchvision_dtd_root)
    assert ds.classnames == sorted(DTD_CLASSES)
    for split in SPLITS:
        s = getattr(ds, split)
        assert s.name == f"dtd/{split}" and s.classnames == ds.classnames
        assert len(s) == N_CLASSES * DEFAULT_COUNTS[split]
        assert_labels_match_folders(s)
    assert ds.val.load(0).size == (24, 24)


def test_torchvision_dtd_maps_split_labels_by_name(tmp_path):
    # val lists only two of three classes: torchvision numbers them 0, 1 within val; we must not
    make_torchvision_dtd_tree(tmp_path, ["banded", "blotchy", "braided"], {"train": 2, "val": 1, "test": 1})
    labels = tmp_path / "dtd" / "dtd" / "labels" / "val1.txt"
    labels.write_text("".join(line + "\n" for line in labels.read_text().split() if not line.startswith("banded")))
    ds = load_dataset("dtd", tmp_path)
    assert ds.val.labels.tolist() == [1, 2]
    assert_labels_match_folders(ds.val)


def test_coop_layout_wins_when_both_present(tmp_path):
    make_torchvision_dtd_tree(tmp_path, ["zigzagged"], {"train": 1, "val": 1, "test": 1})
    make_coop_tree(tmp_path)
    assert load_dataset("dtd", tmp_path).classnames == DTD_CLASSES


def test_dtd_download_goes_through_torchvision(tmp_path, monkeypatch):
    import torchvision.datasets.dtd as tv_dtd

    calls = []

    def fake_download(url, download_root, md5=None, **kw):  # what the archive would unpack to
        calls.append(url)
        make_torchvision_dtd_tree(Path(download_root).parent, ["banded", "bumpy"], {"train": 2, "val": 1, "test": 1})

    monkeypatch.setattr(tv_dtd, "download_and_extract_archive", fake_download)
    ds = load_dataset("dtd", tmp_path / "new_root", download=True)
    assert len(calls) == 1 and ds.classnames == ["banded", "bumpy"] and len(ds.train) == 4


def test_dtd_download_failure_is_one_line(tmp_path, monkeypatch):
    import torchvision.datasets.dtd as tv_dtd

    def no_network(*args, **kw):
        raise OSError("[Errno -3] Temporary failure in name resolution\nmore detail")

    monkeypatch.setattr(tv_dtd, "download_and_extract_archive", no_network)
    with pytest.raises(DataError) as e:
        load_dataset("dtd", tmp_path, download=True)
    error_line(e, "downloading DTD", str(tmp_path / "dtd"), "name resolution", "DATASETS.md")


def test_dtd_nothing_present_says_where_it_looked_quickly(tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(DataError) as e:
        load_dataset("dtd", tmp_path)
    assert time.perf_counter() - t0 < 1.0
    error_line(
        e,
        str(tmp_path / "dtd" / "split_zhou_DescribableTextures.json"),
        str(tmp_path / "dtd" / "dtd" / "images"),
        str(tmp_path / "dtd" / "dtd" / "labels"),
        "download: true",
        "DATASETS.md",
    )


# ---- digits --------------------------------------------------------------------------------------


def test_digits_real_images_fixed_stratified_split():
    ds = load_dataset("digits", root="/ignored/path")
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    assert ds.name == "digits" and ds.classnames == names
    assert [len(ds.train), len(ds.val), len(ds.test)] == [1078, 359, 360]  # 1797 images, 60/20/20
    for split in SPLITS:
        s = getattr(ds, split)
        assert s.classnames == names and s.labels.dtype == np.int64
        counts = np.bincount(s.labels, minlength=10)
        share = {"train": 0.6, "val": 0.2, "test": 0.2}[split]
        full = np.array([178, 182, 177, 183, 181, 182, 181, 179, 174, 180])  # sklearn's class sizes
        assert np.all(np.abs(counts - share * full) <= 1)  # stratified
        if split != "test":
            assert counts.min() >= 16
    arr = ds.train.sources[0]
    assert arr.shape == (32, 32, 3) and arr.dtype == np.uint8
    assert np.array_equal(arr[..., 0], arr[..., 2]) and arr.max() > 200 and arr.min() == 0
    img = ds.train.load(0)
    assert img.mode == "RGB" and img.size == (32, 32)
    # disjoint splits: no image (by content) in two splits
    keys = [a.tobytes() for s in (ds.train, ds.val, ds.test) for a in s.sources]
    assert len(keys) == 1797
    # deterministic across calls, also for the cache key
    again = load_dataset("digits")
    for split in SPLITS:
        assert np.array_equal(getattr(ds, split).labels, getattr(again, split).labels)
        assert getattr(ds, split).fingerprint() == getattr(again, split).fingerprint()


# ---- imagefolder ---------------------------------------------------------------------------------


def test_imagefolder(imagefolder_root):
    (imagefolder_root / "train" / "banded" / "notes.txt").write_text("not an image")
    ds = load_dataset("imagefolder", imagefolder_root)
    assert ds.classnames == sorted(DTD_CLASSES)
    for split in SPLITS:
        s = getattr(ds, split)
        assert s.name == f"imagefolder/{split}" and len(s) == N_CLASSES * DEFAULT_COUNTS[split]
        assert_labels_match_folders(s)
    assert ds.test.load(0).mode == "RGB"


def test_imagefolder_keeps_underscores_and_accepts_extensions(tmp_path):
    make_imagefolder_tree(tmp_path, ["sea_shell", "Apple"], {"train": 1, "val": 1, "test": 1}, ext="JPEG")
    ds = load_dataset("imagefolder", tmp_path)
    assert ds.classnames == ["Apple", "sea_shell"] and len(ds.train) == 2


def test_imagefolder_class_mismatch(imagefolder_root):
    (imagefolder_root / "val" / "extra_class").mkdir()
    with pytest.raises(DataError) as e:
        load_dataset("imagefolder", imagefolder_root)
    error_line(e, str(imagefolder_root / "val"), "extra_class")


def test_imagefolder_missing_split_folder(imagefolder_root):
    os.rename(imagefolder_root / "test", imagefolder_root / "testing")
    with pytest.raises(DataError) as e:
        load_dataset("imagefolder", imagefolder_root)
    error_line(e, str(imagefolder_root / "test"), "not found")


# ---- bad input: one line naming the path or key --------------------------------------------------


@pytest.mark.parametrize("name", ["dtd", "eurosat", "imagefolder"])
def test_root_not_set(name):
    with pytest.raises(DataError) as e:
        load_dataset(name, None)
    error_line(e, "data_root", name)


def test_missing_root(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as e:
        load_dataset("oxford_pets", missing)
    error_line(e, str(missing), "data_root")


def test_missing_split_json(tmp_path):
    (tmp_path / "eurosat" / "2750").mkdir(parents=True)
    with pytest.raises(DataError) as e:
        load_dataset("eurosat", tmp_path)
    error_line(e, str(tmp_path / "eurosat" / "split_zhou_EuroSAT.json"), "DATASETS.md")


def test_wrong_image_dir(tmp_path):
    base = make_coop_tree(tmp_path, counts={"train": 1, "val": 1, "test": 1})
    os.rename(base / "images", base / "imgs")
    with pytest.raises(DataError) as e:
        load_dataset("dtd", tmp_path)
    error_line(e, str(base / "images" / "banded" / "banded_0001.jpg"), "not found")


def test_unknown_dataset_suggests_close_name():
    with pytest.raises(DataError) as e:
        load_dataset("dtdd", "/tmp")
    msg = error_line(e, "'dtdd'", "did you mean 'dtd'")
    assert all(name in msg for name in list_datasets())
    assert isinstance(e.value, ValueError)


def test_registry_lists_coop_datasets():
    assert list_datasets() == sorted(
        ["caltech101", "digits", "dtd", "eurosat", "fashion-mnist", "food101", "imagefolder", "oxford_flowers",
         "oxford_pets", "stanford_cars", "sun397", "ucf101"]
    )


def test_malformed_json(coop_dtd_root):
    path = coop_dtd_root / "dtd" / "split_zhou_DescribableTextures.json"
    path.write_text('{"train": [["banded/banded_0001.jpg", 0, "banded"],')
    with pytest.raises(DataError) as e:
        load_dataset("dtd", coop_dtd_root)
    error_line(e, str(path), "not valid JSON", "line 1")


def _edit_split(root, edit):
    path = Path(root) / "dtd" / "split_zhou_DescribableTextures.json"
    content = json.loads(path.read_text())
    edit(content)
    path.write_text(json.dumps(content))
    return path


def test_missing_split_key(coop_dtd_root):
    path = _edit_split(coop_dtd_root, lambda c: c.pop("val"))
    with pytest.raises(DataError) as e:
        load_dataset("dtd", coop_dtd_root)
    error_line(e, str(path), "'val'")


def test_malformed_row(coop_dtd_root):
    path = _edit_split(coop_dtd_root, lambda c: c["test"].__setitem__(2, ["x.jpg", "0"]))
    with pytest.raises(DataError) as e:
        load_dataset("dtd", coop_dtd_root)
    error_line(e, str(path), "'test'", "row 2", "[impath (str), label (int), classname (str)]")


def test_label_out_of_range(coop_dtd_root):
    def bump(c):  # class 4 ("bumpy") labelled 7 everywhere: labels 0..3 and 7 for five names
        for split in SPLITS:
            for row in c[split]:
                if row[1] == 4:
                    row[1] = 7

    path = _edit_split(coop_dtd_root, bump)
    with pytest.raises(DataError) as e:
        load_dataset("dtd", coop_dtd_root)
    error_line(e, str(path), "label 7", "out of range", "0..4", "'train'")


def test_label_with_two_names(coop_dtd_root):
    path = _edit_split(coop_dtd_root, lambda c: c["val"][0].__setitem__(2, "stripy"))
    with pytest.raises(DataError) as e:
        load_dataset("dtd", coop_dtd_root)
    error_line(e, str(path), "'val'", "row 0", "'stripy'", "'banded'")


@pytest.mark.parametrize("entry", ["ABS", "../../../outside.jpg", "banded/../../../../outside.jpg"])
def test_split_entry_outside_data_root_is_refused(coop_dtd_root, entry):
    """An image path that is absolute or climbs out of data_root is refused, even where the file exists:
    a split file names images of its dataset, not any file on the machine."""
    outside = coop_dtd_root.parent / "outside.jpg"
    outside.write_bytes((coop_dtd_root / "dtd" / "images" / "banded" / "banded_0001.jpg").read_bytes())
    if entry == "ABS":
        entry = str(outside)
    else:  # both relative entries resolve to the same file beside data_root
        assert os.path.normpath(coop_dtd_root / "dtd" / "images" / entry) == str(outside)
    path = _edit_split(coop_dtd_root, lambda c: c["val"][3].__setitem__(0, entry))
    with pytest.raises(DataError) as e:
        load_dataset("dtd", coop_dtd_root)
    error_line(e, str(path), "'val'", "row 3", repr(entry), "data_root")


def test_split_entry_with_dots_inside_data_root_is_allowed(coop_dtd_root):
    entry = "bumpy/../banded/banded_0001.jpg"
    _edit_split(coop_dtd_root, lambda c: c["train"][1].__setitem__(0, entry))
    s = load_dataset("dtd", coop_dtd_root).train
    assert s.ids[1] == entry and s.load(1).size == (24, 24)


def test_corrupt_image_named_when_loaded(coop_dtd_root):
    bad = corrupt_file(load_dataset("dtd", coop_dtd_root).train.sources[9])
    s = load_dataset("dtd", coop_dtd_root).train  # listing does not decode: a bad file lists fine
    s.load(10)
    with pytest.raises(DataError) as e:
        s.load(9)
    error_line(e, str(bad), "dtd/train #9")


def test_truncated_image_is_caught(coop_dtd_root):
    s = load_dataset("dtd", coop_dtd_root).val
    data = Path(s.sources[4]).read_bytes()
    Path(s.sources[4]).write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as e:
        s.load(4)
    error_line(e, s.sources[4])


def test_image_over_pixel_limit_is_one_line(coop_dtd_root, monkeypatch):
    """A file over rsnl's pixel limit is refused from its header, before it is decoded (a decompression bomb)."""
    from PIL import Image

    from rsnl import data
    s = load_dataset("dtd", coop_dtd_root).train
    Image.new("RGB", (300, 200), (10, 20, 30)).save(s.sources[2], format="PNG")  # 60,000 pixels
    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 50_000)
    with pytest.raises(DataError) as e:
        s.load(2)
    error_line(e, s.sources[2], "dtd/train #2", "300x200", "50000", "MAX_IMAGE_PIXELS")
    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 60_000)  # at the limit is allowed
    assert s.load(2).size == (300, 200)


@pytest.mark.parametrize("pillow_limit", [20_000, 59_999])  # Pillow errors over 2x its limit, warns over 1x
def test_pillow_decompression_bomb_is_one_line(coop_dtd_root, monkeypatch, pillow_limit):
    from PIL import Image
    s = load_dataset("dtd", coop_dtd_root).train
    Image.new("RGB", (300, 200), (10, 20, 30)).save(s.sources[2], format="PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pillow_limit)
    with pytest.raises(DataError) as e:
        s.load(2)
    error_line(e, s.sources[2], "DecompressionBomb", "exceeds limit")


def test_missing_file_named_by_fingerprint(coop_dtd_root):
    s = load_dataset("dtd", coop_dtd_root).test
    os.remove(s.sources[3])
    with pytest.raises(DataError) as e:
        s.fingerprint()
    error_line(e, s.sources[3])


def test_check_shots(coop_dtd_root):
    s = load_dataset("dtd", coop_dtd_root).train
    check_shots(s.labels, s.classnames, 16, s.name)  # 16 per class: exactly enough
    keep = np.flatnonzero(s.labels != 1)[: -4]  # "bumpy" (label 4) loses 4 images, "blotchy" all
    sub = s.subset(np.concatenate([keep, np.flatnonzero(s.labels == 1)[:12]]))
    with pytest.raises(DataError) as e:
        check_shots(sub.labels, sub.classnames, 16, "dtd/train")
    msg = error_line(e, "class 'blotchy' has 12 images in dtd/train, shots is 16")
    assert "2 classes" in msg and "shots <= 12" in msg
    with pytest.raises(DataError) as e:
        check_shots(s.labels, s.classnames, 0, "dtd/train")
    error_line(e, "shots")


def test_check_shots_counts_absent_class():
    with pytest.raises(DataError) as e:
        check_shots(np.array([0, 0, 1, 1]), ["a", "b", "c"], 2, "x/train")
    error_line(e, "class 'c' has 0 images in x/train, shots is 2")


def test_imageset_rejects_mismatched_lengths():
    with pytest.raises(DataError) as e:
        ImageSet("x/train", ["a"], np.zeros(3), ["p1", "p2"])
    error_line(e, "x/train", "2 images", "3 labels")


def test_torchvision_partition_is_named_once_and_split_zhou_wins(tmp_path, capsys):
    """torchvision's DTD partition is not CoOp's split_zhou: loading it says so (one line, once per
    process); a split_zhou JSON beside torchvision's images is preferred."""
    import rsnl.data

    make_torchvision_dtd_tree(tmp_path)
    rsnl.data._noted.clear()
    for _ in range(2):
        ds = load_dataset("dtd", str(tmp_path))
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("rsnl: note: DTD: using torchvision's partition 1")
    assert "split_zhou_DescribableTextures.json" in err[0]
    assert [len(s) for s in (ds.train, ds.val, ds.test)] == [80, 40, 40]

    # CoOp's split over the same files: every test image of torchvision's list becomes a train image
    rows = {"train": [[i, int(y), ds.classnames[y]] for i, y in zip(ds.test.ids, ds.test.labels)],
            "val": [[i, int(y), ds.classnames[y]] for i, y in zip(ds.val.ids, ds.val.labels)],
            "test": [[i, int(y), ds.classnames[y]] for i, y in zip(ds.train.ids, ds.train.labels)]}
    (tmp_path / "dtd" / "split_zhou_DescribableTextures.json").write_text(json.dumps(rows))
    coop = load_dataset("dtd", str(tmp_path))
    assert capsys.readouterr().err == ""
    assert coop.train.ids == ds.test.ids and coop.test.ids == ds.train.ids
    assert coop.train.load(0).size == ds.test.load(0).size
