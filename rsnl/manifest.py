"""Noise manifests: a trial's few-shot draw as a small CSV file that any trial, here or elsewhere, can replay.

Every trial writes its draw (`noise_manifest.csv` in its folder) and reports the file's sha256 as
`noise_manifest_sha256`; `noise_file: PATH` makes a trial read its training and validation samples from
such a file instead of sampling them, so two studies, or two codebases, can train on identical draws.

The format, one row per sample, in the order the trial holds them (the order matters for an identical
run: batches are drawn from positions in it):

    split,image,label,true_label
    train,banded/banded_0003.jpg,blotchy,banded
    val,dotted/dotted_0112.jpg,dotted,dotted

  split       train (the few-shot training sample) or val (the noisy validation sample)
  image       the image's identifier in the dataset (`ImageSet.ids`): the impath of CoOp's split JSON
              (relative to the image folder, e.g. `banded/banded_0003.jpg`; the same in torchvision's DTD
              layout), `<class>/<file>` under the split folder for imagefolder, `<file>#<index>` for
              datasets held in memory (fashion-mnist: `train-images-idx3-ubyte#123`, digits: `digits#5`)
  label       the class name the trial trains with (its noisy label)
  true_label  the class name of the image, as the dataset has it (for the selection metrics only)

Class names, not numbers, so that label orders of other codebases do not matter. A file written elsewhere
must use the dataset's class names (CoOp's for DTD) and its image identifiers.
"""

from __future__ import annotations

import csv
import hashlib
import io
from pathlib import Path

import numpy as np

from rsnl.errors import DataError
from rsnl.files import atomic_write
from rsnl.noise import NoisySample

MANIFEST = "noise_manifest.csv"
HEADER = ["split", "image", "label", "true_label"]
SPLITS = ("train", "val")


def manifest_text(samples: dict[str, NoisySample], ids: dict[str, list[str]], classnames) -> str:
    """CSV text of the samples ({'train': ..., 'val': ...}) with the identifiers of each split's pool."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(HEADER)
    for split in SPLITS:
        s = samples[split]
        for i, y, t in zip(s.indices, s.labels, s.true_labels):
            w.writerow([split, ids[split][i], classnames[y], classnames[t]])
    return buf.getvalue()


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def write_manifest(folder, text: str, name: str = MANIFEST) -> Path:
    return atomic_write(Path(folder) / name, text)


def read_manifest(path, ids: dict[str, list[str]], labels: dict[str, np.ndarray], classnames
                  ) -> dict[str, NoisySample]:
    """The samples a manifest names, checked against the dataset: every image must be in the split's
    pool, every class name a class of the dataset, and each true label the dataset's label of that image.
    Any problem is one DataError line naming the file, the row and what is allowed."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        if "\0" in text:
            raise UnicodeDecodeError("utf-8", b"\0", 0, 1, "NUL character")
        rows = list(csv.reader(io.StringIO(text)))
    except OSError as e:
        raise DataError(f"noise_file: {path} cannot be read ({e.strerror or e})") from None
    except (UnicodeDecodeError, csv.Error):  # a binary file: bytes that are not UTF-8, or NUL characters
        raise DataError(f"noise_file: {path} is not a text file; a noise manifest is CSV text starting with the "
                        f"header {','.join(HEADER)}") from None
    if not rows or [c.strip() for c in rows[0]] != HEADER:
        raise DataError(f"noise_file: {path} must start with the header {','.join(HEADER)}")
    index = {split: {image: i for i, image in enumerate(ids[split])} for split in SPLITS}
    class_of = {c: k for k, c in enumerate(classnames)}
    picked: dict[str, tuple[list, list, list]] = {split: ([], [], []) for split in SPLITS}
    for n, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != 4:
            raise DataError(f"noise_file: {path} line {n} has {len(row)} fields; each row is {','.join(HEADER)}")
        split, image, label, true = row
        if split not in SPLITS:
            raise DataError(f"noise_file: {path} line {n}: split {split!r} is not allowed; allowed: train, val")
        for name in (label, true):
            if name not in class_of:
                raise DataError(f"noise_file: {path} line {n}: class {name!r} is not a class of the dataset "
                                f"({', '.join(classnames[:5])}{', ...' if len(classnames) > 5 else ''})")
        i = index[split].get(image)
        if i is None:
            raise DataError(f"noise_file: {path} line {n}: image {image!r} is not in the dataset's {split} pool")
        if labels[split][i] != class_of[true]:
            raise DataError(f"noise_file: {path} line {n}: image {image!r} is a {classnames[labels[split][i]]!r} "
                            f"in the dataset, the file says {true!r}")
        picked[split][0].append(i)
        picked[split][1].append(class_of[label])
        picked[split][2].append(class_of[true])
    out = {}
    for split, (idx, noisy, true) in picked.items():
        if not idx:
            raise DataError(f"noise_file: {path} has no {split} rows; a manifest names the train and the val sample")
        if len(set(idx)) != len(idx):
            raise DataError(f"noise_file: {path} names an image of the {split} sample twice")
        noisy, true = np.array(noisy, dtype=np.int64), np.array(true, dtype=np.int64)
        out[split] = NoisySample(indices=np.array(idx, dtype=np.int64), labels=noisy, true_labels=true,
                                 is_noisy=noisy != true)
    return out
