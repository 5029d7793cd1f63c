"""Small image datasets generated on disk, shared by the tests and the benchmarks (plain functions).

DTD and the other CoOp datasets need a download that CI machines may not have, so the real loading
code in `rsnl.data` is exercised on trees of the same layout made from generated images:

    make_coop_tree(root, classes, counts, dataset="dtd")   <root>/dtd/images/<class>/*.jpg + split JSON
    make_torchvision_dtd_tree(root, classes, counts)       <root>/dtd/dtd/images + labels/{train,val,test}1.txt
    make_imagefolder_tree(root, classes, counts)           <root>/{train,val,test}/<class>/*.png

`counts` is images per class per split, e.g. {"train": 16, "val": 8, "test": 8}. Each image is a small
RGB picture whose mean colour depends on its class (plus per-image noise), so a model can learn from
it. Everything is deterministic.

The pytest fixtures built on these live in tests/conftest.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from rsnl.data import COOP_DATASETS

DTD_CLASSES = ["banded", "blotchy", "braided", "bubbly", "bumpy"]  # the first five of DTD's 47
DEFAULT_COUNTS = {"train": 16, "val": 8, "test": 8}
SPLITS = ("train", "val", "test")


def make_image(path, label: int, seed: int, size: int = 24) -> Path:
    """Write one size x size RGB image whose colour is set by `label`; format from the extension."""
    rng = np.random.default_rng(seed)
    base = np.array([(label * 67) % 256, (label * 131 + 60) % 256, (label * 199 + 120) % 256], dtype=float)
    pixels = np.clip(base + rng.normal(0, 40, size=(size, size, 3)), 0, 255).astype(np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def _files(classes, counts, ext):
    """Yield (split, label, classname, relative path) for every image, numbered per class like DTD."""
    number = {c: 0 for c in classes}
    for split in SPLITS:
        for label, cname in enumerate(classes):
            for _ in range(counts[split]):
                number[cname] += 1
                yield split, label, cname, f"{cname}/{cname}_{number[cname]:04d}.{ext}"


def make_coop_tree(root, classes=DTD_CLASSES, counts=None, dataset: str = "dtd", size: int = 24,
                   ext: str = "jpg") -> Path:
    """CoOp layout of a registered CoOp dataset under `root` (the data_root); returns the dataset dir.

    Labels follow the order of `classes` (not sorted), as in CoOp's split JSONs.
    """
    counts = counts or DEFAULT_COUNTS
    dataset_dir, image_dir, split_json = COOP_DATASETS[dataset]
    base = Path(root) / dataset_dir
    rows = {s: [] for s in SPLITS}
    for k, (split, label, cname, rel) in enumerate(_files(classes, counts, ext)):
        make_image(base / image_dir / rel, label, seed=k, size=size)
        rows[split].append([rel, label, cname])
    (base / split_json).write_text(json.dumps(rows))
    return base


def make_torchvision_dtd_tree(root, classes=DTD_CLASSES, counts=None, size: int = 24) -> Path:
    """torchvision's DTD layout under `root`: dtd/dtd/images/<class>/*.jpg and dtd/dtd/labels/*1.txt."""
    counts = counts or DEFAULT_COUNTS
    data = Path(root) / "dtd" / "dtd"
    lines = {s: [] for s in SPLITS}
    for k, (split, label, cname, rel) in enumerate(_files(classes, counts, "jpg")):
        make_image(data / "images" / rel, label, seed=k, size=size)
        lines[split].append(rel)
    (data / "labels").mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        (data / "labels" / f"{split}1.txt").write_text("".join(line + "\n" for line in lines[split]))
    return data


def make_imagefolder_tree(root, classes=DTD_CLASSES, counts=None, size: int = 24, ext: str = "png") -> Path:
    """<root>/{train,val,test}/<class>/<n>.<ext>; returns root."""
    counts = counts or DEFAULT_COUNTS
    root = Path(root)
    for k, (split, label, cname, rel) in enumerate(_files(classes, counts, ext)):
        make_image(root / split / rel, label, seed=k, size=size)
    return root


def corrupt_file(path) -> Path:
    """Overwrite an image with bytes no decoder accepts, keeping its name."""
    Path(path).write_bytes(b"this is not an image" * 10)
    return Path(path)


def touch_later(path, seconds: float = 10.0) -> None:
    """Move a file's mtime forward, so size+mtime fingerprints see a change on coarse clocks too."""
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + int(seconds * 1e9)))
