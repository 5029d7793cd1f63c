"""Datasets: lists of image files (or in-memory arrays) with labels, split into train / val / test.

Four sources, one result type (`Dataset` of three `ImageSet`s):
  * CoOp layout (the main path, the protocol of docs/method.md): `<root>/<dataset_dir>/<split_json>` with rows
    `[impath, label, classname]` per split, impath relative to `<root>/<dataset_dir>/<image_dir>`.
    Every CoOp dataset that ships such a JSON is one line in `COOP_DATASETS`.
  * DTD in torchvision's layout (`<root>/dtd/dtd/images` + `labels/`), also reachable by download.
  * `digits`: scikit-learn's 8x8 handwritten digits, shipped inside sklearn, so there is always one
    real dataset offline (tests, quickstart).
  * `imagefolder`: `<root>/{train,val,test}/<class>/*.jpg` for one's own data.

Loading only builds file lists (no image is decoded), so it takes milliseconds even for large
datasets; an image is decoded when its features are computed, and a bad one is named then.
Every problem with data is a `DataError` with one line that names the path or key and how to fix it.
This module imports no Ray and no open_clip; torchvision and sklearn are imported only where used.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import sys
import warnings
from dataclasses import dataclass
from functools import partial
from typing import Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

from rsnl.errors import DataError
from rsnl.files import file_digest

SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# Pixels per image, checked from the header before decoding: a guard against decompression bombs (a small
# file that decodes to gigabytes). Pillow's own default; CLIP sees 224x224 anyway.
MAX_IMAGE_PIXELS = 89_478_485


def _one_line(err: BaseException) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())


# --------------------------------------------------------------------------------------------------
# Result types


@dataclass(eq=False, repr=False)  # eq/repr off: numpy labels and thousands of sources make both useless
class ImageSet:
    name: str  # e.g. "dtd/train"; appears in error messages
    classnames: list[str]
    labels: np.ndarray  # int64, shape [N]
    sources: list  # per image: a file path (str) or an HxW / HxWx3 uint8 array (in-memory datasets)
    # per image: its name in the dataset, the same on every machine and layout (noise manifests use it):
    # a path relative to the dataset's image folder, or `<file>#<index>` for in-memory images
    ids: list | None = None

    def __post_init__(self):
        self.classnames = list(self.classnames)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        self.sources = list(self.sources)
        if len(self.sources) != len(self.labels):
            raise DataError(
                f"{self.name}: {len(self.sources)} images but {len(self.labels)} labels; "
                "an ImageSet needs one label per image"
            )
        if self.ids is None:
            self.ids = [s if isinstance(s, str) else f"{self.name}#{i}" for i, s in enumerate(self.sources)]
        self.ids = [str(i) for i in self.ids]
        if len(self.ids) != len(self.sources):
            raise DataError(f"{self.name}: {len(self.ids)} image ids for {len(self.sources)} images")

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return f"ImageSet({self.name!r}, {len(self)} images, {len(self.classnames)} classes)"

    def load(self, i: int) -> Image.Image:
        """Image i as RGB; an unreadable or corrupt file raises DataError naming the file."""
        src = self.sources[i]
        if isinstance(src, np.ndarray):
            if not (src.ndim == 2 or (src.ndim == 3 and src.shape[2] == 3)) or src.dtype != np.uint8:
                raise DataError(f"in-memory image {self.name} #{i} has shape {src.shape} dtype {src.dtype}; "
                                "expected HxW (greyscale) or HxWx3 uint8")
            return Image.fromarray(src).convert("RGB")
        try:
            with warnings.catch_warnings():
                # Pillow only warns between its limit and twice it; here that is an error too
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(src) as im:
                    if im.width * im.height > MAX_IMAGE_PIXELS:
                        raise DataError(
                            f"image {src} ({self.name} #{i}) is {im.width}x{im.height} = {im.width * im.height} "
                            f"pixels, over the limit of {MAX_IMAGE_PIXELS} (rsnl.data.MAX_IMAGE_PIXELS, a guard "
                            "against decompression bombs); shrink the image or remove it from the split")
                    return im.convert("RGB")  # convert() decodes fully, so the file can be closed
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError,
                Image.DecompressionBombWarning) as err:
            raise DataError(_bad_image_message(self, i, src, err)) from None

    def fingerprint(self) -> str:
        """sha256 hex of what the images are: a disk-cache key for features.

        Files count by their bytes (rsnl.files.file_digest, read once per process), not by path, size or
        mtime: a file rewritten with other pixels is a new key whatever its size and dates, and a dataset
        moved elsewhere keeps its key. In-memory arrays count by their bytes.
        """
        h = hashlib.sha256()
        h.update(json.dumps([self.name, self.classnames]).encode())
        h.update(self.labels.astype("<i8").tobytes())
        for i, src in enumerate(self.sources):
            if isinstance(src, np.ndarray):
                arr = np.ascontiguousarray(src)
                h.update(f"array{arr.shape}{arr.dtype.str}".encode())
                h.update(arr.tobytes())
            else:
                try:
                    digest = file_digest(src)
                except OSError as err:
                    raise DataError(_bad_image_message(self, i, src, err)) from None
                h.update(f"file\0{digest}\n".encode())
        return h.hexdigest()

    def subset(self, indices) -> "ImageSet":
        """The images at `indices` (in that order), same name and class list."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return ImageSet(self.name, self.classnames, self.labels[idx], [self.sources[i] for i in idx],
                        [self.ids[i] for i in idx])


@dataclass(eq=False)
class Dataset:
    name: str
    classnames: list[str]
    train: ImageSet
    val: ImageSet
    test: ImageSet


def _bad_image_message(imageset: ImageSet, i: int, path, err: BaseException) -> str:
    return (
        f"image {path} ({imageset.name} #{i}) cannot be read ({_one_line(err)}); "
        "replace or delete the file, or fix the split file that lists it"
    )


# --------------------------------------------------------------------------------------------------
# Checks used before training


def check_shots(labels: np.ndarray, classnames, shots: int, split: str) -> None:
    """Every class must have at least `shots` images in `split` (a name like "dtd/train")."""
    classnames = list(classnames)
    if int(shots) < 1:
        raise DataError(f"shots is {shots}; it must be at least 1")
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(classnames))
    short = np.flatnonzero(counts < shots)
    if len(short):
        c = int(short[0])
        more = f" ({len(short)} classes are short)" if len(short) > 1 else ""
        raise DataError(
            f"class '{classnames[c]}' has {counts[c]} images in {split}, shots is {shots}{more}; "
            f"use shots <= {int(counts.min())} or add images"
        )


# --------------------------------------------------------------------------------------------------
# CoOp layout: a split JSON of [impath, label, classname] rows


# name -> (dataset_dir, image_dir, split_json), the folder names of CoOp's DATASETS.md.
COOP_DATASETS: dict[str, tuple[str, str, str]] = {
    "dtd": ("dtd", "images", "split_zhou_DescribableTextures.json"),
    "oxford_pets": ("oxford_pets", "images", "split_zhou_OxfordPets.json"),
    "caltech101": ("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
    "oxford_flowers": ("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json"),
    "food101": ("food-101", "images", "split_zhou_Food101.json"),
    "stanford_cars": ("stanford_cars", "", "split_zhou_StanfordCars.json"),
    "eurosat": ("eurosat", "2750", "split_zhou_EuroSAT.json"),
    "ucf101": ("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json"),
    "sun397": ("sun397", "SUN397", "split_zhou_SUN397.json"),
}
COOP_DOCS_URL = "https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md"
COOP_DOCS = f"CoOp's DATASETS.md ({COOP_DOCS_URL})"


def _require_root(name: str, root: str | None, folder: str) -> str:
    if root is None or str(root).strip() == "":
        raise DataError(
            f"dataset '{name}' needs data_root: data_root must be set to the folder that holds {folder}/"
        )
    root = os.path.abspath(os.path.expanduser(str(root)))
    if not os.path.isdir(root):
        raise DataError(
            f"data_root {root} does not exist or is not a folder; set data_root to the folder that "
            f"holds {folder}/"
        )
    return root


def _read_split_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
    except json.JSONDecodeError as err:
        raise DataError(
            f"split file {path} is not valid JSON ({err.msg} at line {err.lineno} column {err.colno}); "
            f"get a fresh copy as described in {COOP_DOCS}"
        ) from None
    except OSError as err:
        raise DataError(f"split file {path} cannot be read ({_one_line(err)})") from None
    if not isinstance(content, dict):
        raise DataError(f"split file {path} must hold a JSON object with keys {list(SPLITS)}")
    for split in SPLITS:
        if not isinstance(content.get(split), list):
            raise DataError(
                f"split file {path} has no list under key '{split}'; it needs keys {list(SPLITS)}, "
                "each a list of [impath, label, classname] rows"
            )
    return content


def _coop_classnames(path: str, content: dict) -> list[str]:
    """Class names ordered by label, checking that labels are 0..C-1 and agree with the names."""
    names: dict[int, str] = {}
    for split in SPLITS:
        for r, row in enumerate(content[split]):
            ok = (
                isinstance(row, (list, tuple))
                and len(row) == 3
                and isinstance(row[0], str)
                and isinstance(row[1], int)
                and not isinstance(row[1], bool)
                and isinstance(row[2], str)
            )
            if not ok:
                raise DataError(
                    f"split file {path} key '{split}' row {r} is {str(row)[:80]}; "
                    "each row must be [impath (str), label (int), classname (str)]"
                )
            label, cname = row[1], row[2]
            if names.setdefault(label, cname) != cname:
                raise DataError(
                    f"split file {path} key '{split}' row {r}: label {label} is named '{cname}' here "
                    f"but '{names[label]}' elsewhere; one label must have one class name"
                )
    n = len(names)
    for split in SPLITS:
        for r, row in enumerate(content[split]):
            if not 0 <= row[1] < n:
                raise DataError(
                    f"split file {path} key '{split}' row {r}: label {row[1]} is out of range; "
                    f"with {n} class names labels must be 0..{n - 1}"
                )
    classnames = [names[c] for c in range(n)]
    dup = sorted({c for c in classnames if classnames.count(c) > 1})
    if dup:
        raise DataError(f"split file {path}: class name '{dup[0]}' belongs to several labels")
    return classnames


def _inside(root: str, image_root: str, impath: str, split_file: str, split: str, r: int) -> str:
    """The image's path; an absolute impath or one whose '..' leads out of data_root is refused (by the
    path's text, so a symlinked image folder still works): a split file names its dataset's images only."""
    source = os.path.normpath(os.path.join(image_root, impath))
    if os.path.isabs(impath) or not source.startswith(os.path.join(root, "")):
        raise DataError(
            f"split file {split_file} key '{split}' row {r}: image path {impath!r} is absolute or leads "
            f"outside data_root {root}; image paths must be relative to {image_root}"
        )
    return source


def load_coop(name: str, root: str | None, dataset_dir: str, image_dir: str, split_json: str) -> Dataset:
    """A CoOp-style dataset: `<root>/<dataset_dir>/<split_json>` + images under `<image_dir>`."""
    root = _require_root(name, root, dataset_dir)
    base = os.path.join(root, dataset_dir)
    path = os.path.join(base, split_json)
    if not os.path.isfile(path):
        raise DataError(
            f"split file {path} not found; put {name} at {base} with {split_json} and images under "
            f"{os.path.join(base, image_dir)} as described in {COOP_DOCS}"
        )
    content = _read_split_json(path)
    classnames = _coop_classnames(path, content)
    image_root = os.path.join(base, image_dir)
    sets = {}
    for split in SPLITS:
        rows = content[split]
        sources = [_inside(root, image_root, row[0], path, split, r) for r, row in enumerate(rows)]
        # One stat per split, not per image: catches a wrong image_dir at once while staying O(1);
        # a single missing file is found by fingerprint() or when it is loaded.
        if sources and not os.path.isfile(sources[0]):
            raise DataError(
                f"image {sources[0]} listed in {path} (key '{split}') not found; images must be under "
                f"{image_root} as described in {COOP_DOCS}"
            )
        labels = np.array([row[1] for row in rows], dtype=np.int64)
        sets[split] = ImageSet(f"{name}/{split}", classnames, labels, sources, [row[0] for row in rows])
    return Dataset(name, classnames, sets["train"], sets["val"], sets["test"])


# --------------------------------------------------------------------------------------------------
# DTD: CoOp layout first, else torchvision's layout (optionally downloaded)


def load_dtd(root: str | None, download: bool = False) -> Dataset:
    dataset_dir, image_dir, split_json = COOP_DATASETS["dtd"]
    if root is None or str(root).strip() == "" or not download:
        root = _require_root("dtd", root, dataset_dir)
    root = os.path.abspath(os.path.expanduser(str(root)))
    coop_json = os.path.join(root, dataset_dir, split_json)
    tv_images = os.path.join(root, "dtd", "dtd", "images")
    tv_labels = os.path.join(root, "dtd", "dtd", "labels")
    if os.path.isfile(coop_json):
        # CoOp's split wherever the images are: CoOp's folder, else torchvision's (same <class>/<file> names)
        if not os.path.isdir(os.path.join(root, dataset_dir, image_dir)) and os.path.isdir(tv_images):
            image_dir = os.path.relpath(tv_images, os.path.join(root, dataset_dir))
        return load_coop("dtd", root, dataset_dir, image_dir, split_json)
    if not (os.path.isdir(tv_images) and os.path.isdir(tv_labels)):
        if not download:
            raise DataError(
                f"DTD not found under data_root {root}: looked for {coop_json} (CoOp layout, images in "
                f"{os.path.join(root, dataset_dir, image_dir)}) and {tv_images} + {tv_labels} "
                f"(torchvision layout); get DTD in CoOp's layout (dtd/images + dtd/{split_json}, see "
                f"{COOP_DOCS_URL}) or set download: true to fetch torchvision's layout (needs a network)"
            )
        _download_dtd(root)
    _note_once(f"DTD: using torchvision's partition 1 under {os.path.dirname(tv_images)}; it is not CoOp's "
               f"split_zhou, so accuracies do not compare with published ones; put {split_json} in "
               f"{os.path.join(root, dataset_dir)} to use CoOp's split")
    return _load_dtd_torchvision(root)


_noted: set[str] = set()


def _note_once(line: str) -> None:
    """A one-line notice on stderr, once per process (datasets are loaded by preflight and again by workers)."""
    if line not in _noted:
        _noted.add(line)
        print(f"rsnl: note: {line}", file=sys.stderr, flush=True)


def _download_dtd(root: str) -> None:
    from torchvision.datasets import DTD  # imported here: torchvision is slow to import

    try:
        DTD(root, split="train", partition=1, download=True)
    except Exception as err:  # network errors come in many types; all mean the same to the user
        raise DataError(
            f"downloading DTD into {os.path.join(root, 'dtd')} failed ({_one_line(err)}); without a "
            f"network, copy DTD there in CoOp's layout as described in {COOP_DOCS}"
        ) from None


def _load_dtd_torchvision(root: str) -> Dataset:
    from torchvision.datasets import DTD

    parts = {}
    for split in SPLITS:
        try:
            parts[split] = DTD(root, split=split, partition=1)
        except (OSError, ValueError, RuntimeError) as err:
            raise DataError(
                f"DTD in torchvision's layout under {os.path.join(root, 'dtd', 'dtd')} cannot be read "
                f"for split '{split}' ({_one_line(err)}); re-download it or use CoOp's layout"
            ) from None
    # torchvision numbers classes per split (sorted names in that split's list); map val/test onto
    # train's numbering by name so that a label means the same class in every split.
    classnames = list(parts["train"].classes)
    index = {c: i for i, c in enumerate(classnames)}
    sets = {}
    for split, ds in parts.items():
        # DTD exposes no public file list; _image_files/_labels are stable since torchvision 0.12.
        missing = sorted(set(ds.classes) - set(index))
        if missing:
            raise DataError(
                f"DTD labels file {os.path.join(root, 'dtd', 'dtd', 'labels', split + '1.txt')} has "
                f"class '{missing[0]}' that is not in train1.txt; the label files must share classes"
            )
        labels = np.array([index[ds.classes[y]] for y in ds._labels], dtype=np.int64)
        sources = [str(p) for p in ds._image_files]
        images = os.path.join(root, "dtd", "dtd", "images")  # ids as CoOp's impaths: <class>/<file>
        ids = [os.path.relpath(p, images) for p in sources]
        sets[split] = ImageSet(f"dtd/{split}", classnames, labels, sources, ids)
    return Dataset("dtd", classnames, sets["train"], sets["val"], sets["test"])


# --------------------------------------------------------------------------------------------------
# digits: scikit-learn's 8x8 handwritten digits, real images that need no download

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIGITS_SIZE = 32
DIGITS_SPLIT_SEED = 0  # fixed: the split is part of the dataset, not of a trial's seed


def load_digits_dataset(root: str | None = None, download: bool = False) -> Dataset:
    """1797 digits, upscaled to 32x32 RGB in memory; fixed stratified 60/20/20 split per class."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    grey = np.rint(raw.images * (255.0 / 16.0)).astype(np.uint8)  # values 0..16 -> 0..255
    # Bilinear rather than nearest: 8x8 blocks blown up 4x are hard edges no natural image has;
    # bilinear gives soft strokes closer to what CLIP was trained on (CLIP resizes to 224 anyway).
    images = [
        np.repeat(
            np.asarray(Image.fromarray(g).resize((DIGITS_SIZE, DIGITS_SIZE), Image.BILINEAR))[..., None],
            3,
            axis=2,
        )
        for g in grey
    ]
    targets = raw.target.astype(np.int64)
    rng = np.random.default_rng(DIGITS_SPLIT_SEED)
    parts = {s: [] for s in SPLITS}
    for c in range(len(DIGIT_NAMES)):
        idx = rng.permutation(np.flatnonzero(targets == c))
        n_train, n_val = round(0.6 * len(idx)), round(0.2 * len(idx))
        parts["train"].append(idx[:n_train])
        parts["val"].append(idx[n_train : n_train + n_val])
        parts["test"].append(idx[n_train + n_val :])
    sets = {}
    for split in SPLITS:
        idx = np.sort(np.concatenate(parts[split]))
        sets[split] = ImageSet(f"digits/{split}", DIGIT_NAMES, targets[idx], [images[i] for i in idx],
                               [f"digits#{i}" for i in idx])
    return Dataset("digits", list(DIGIT_NAMES), sets["train"], sets["val"], sets["test"])


# --------------------------------------------------------------------------------------------------
# fashion-mnist: real 28x28 greyscale photos of clothing, available offline as a Debian package.
# The official 60,000 training images are cut once, per class and by a fixed permutation, into four
# disjoint parts; the official 10,000 test images are the test split.

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]  # label order of the dataset (and of torchvision)
FASHION_MNIST_DEBIAN = "/usr/share/datasets/fashion-mnist"  # apt-get install dataset-fashion-mnist
FASHION_MNIST_FILES = {  # name -> md5 of the uncompressed file (the same for every source; Debian
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",  # recompresses, so the .gz differ)
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}
FASHION_MNIST_SPLIT_SEED = 0  # fixed: the partition is part of the dataset, not of a trial's seed
# Per class, in the order of the fixed permutation of that class's 6,000 official training images:
# the few-shot train pool, the validation pool, and the rest is the stand-in VLM's pretraining corpus.
FASHION_MNIST_POOLS = {"train": 500, "val": 500}
FASHION_MNIST_WAYS = (f"install Debian's package (apt-get install dataset-fashion-mnist, files in "
                      f"{FASHION_MNIST_DEBIAN}), set data_root to a folder holding torchvision's "
                      f"FashionMNIST/raw/ (or the four *-ubyte.gz files), or set download: true with a network")


def _fashion_mnist_folders(root: str | None) -> list[str]:
    """Where the files may be, in order: data_root (torchvision's layout, or the files directly),
    Debian's package, and the download folder in rsnl's cache."""
    from rsnl.files import default_cache_dir
    out = []
    if root:
        root = os.path.abspath(os.path.expanduser(str(root)))
        out += [os.path.join(root, "FashionMNIST", "raw"), os.path.join(root, "fashion-mnist"), root]
    out += [FASHION_MNIST_DEBIAN, os.path.join(str(default_cache_dir()), "data", "FashionMNIST", "raw")]
    return out


def _idx_file(folder: str, name: str) -> str | None:
    for candidate in (os.path.join(folder, name + ".gz"), os.path.join(folder, name)):
        if os.path.isfile(candidate):
            return candidate
    return None


def _find_fashion_mnist(root: str | None) -> str | None:
    for folder in _fashion_mnist_folders(root):
        if all(_idx_file(folder, n) for n in FASHION_MNIST_FILES):
            return folder
    return None


def _read_idx(path: str, expect_dims: int) -> np.ndarray:
    """An IDX file (the MNIST format: magic, dims, big-endian sizes, uint8 data), gzipped or not.
    Its content must be the published one (md5), so that every source gives the same partition."""
    import gzip
    try:
        with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise DataError(f"Fashion-MNIST file {path} cannot be read ({_one_line(err)}); "
                        f"get a fresh copy: {FASHION_MNIST_WAYS}") from None
    want = FASHION_MNIST_FILES[os.path.basename(path).removesuffix(".gz")]
    if hashlib.md5(data).hexdigest() != want:
        raise DataError(f"Fashion-MNIST file {path} is not the published file (md5 of its content is not "
                        f"{want}); get a fresh copy: {FASHION_MNIST_WAYS}")
    magic = int.from_bytes(data[:4], "big") if len(data) >= 4 else -1
    dims = magic & 0xFF
    if magic >> 8 != 0x08 or dims != expect_dims or len(data) < 4 + 4 * dims:
        raise DataError(f"Fashion-MNIST file {path} is not a uint8 IDX file with {expect_dims} dimension(s); "
                        f"get a fresh copy: {FASHION_MNIST_WAYS}")
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims)
    if body.size != int(np.prod(shape)):
        raise DataError(f"Fashion-MNIST file {path} holds {body.size} bytes of data, its header says "
                        f"{int(np.prod(shape))}; the file is truncated, get a fresh copy: {FASHION_MNIST_WAYS}")
    return body.reshape(shape)


def _download_fashion_mnist() -> None:
    """Through torchvision, into rsnl's cache (with its progress bars)."""
    import socket
    from urllib.parse import urlsplit

    from torchvision.datasets import FashionMNIST

    from rsnl.files import default_cache_dir
    target = os.path.join(str(default_cache_dir()), "data")
    mirror = urlsplit(FashionMNIST.mirrors[0])
    port = mirror.port or (443 if mirror.scheme == "https" else 80)
    try:  # torchvision would retry for minutes offline; one connect says so in milliseconds
        socket.create_connection((mirror.hostname, port), timeout=5).close()
    except OSError as err:
        raise DataError(f"Fashion-MNIST not found and cannot be downloaded ({mirror.hostname}: "
                        f"{_one_line(err)}); {FASHION_MNIST_WAYS}") from None
    print(f"[rsnl] downloading Fashion-MNIST (30 MB) into {target}", flush=True)
    try:
        FashionMNIST(target, train=True, download=True)
    except Exception as err:  # network errors come in many types; all mean the same to the user
        raise DataError(f"downloading Fashion-MNIST into {target} failed ({_one_line(err)}); "
                        f"{FASHION_MNIST_WAYS}") from None


def fashion_mnist_arrays(root: str | None = None, download: bool = False) -> dict[str, np.ndarray]:
    """The raw dataset: {'train_images' [60000, 28, 28], 'train_labels', 'test_images', 'test_labels'}."""
    folder = _find_fashion_mnist(root)
    if folder is None and download:
        _download_fashion_mnist()
        folder = _find_fashion_mnist(root)
    if folder is None:
        looked = ", ".join(_fashion_mnist_folders(root))
        raise DataError(f"Fashion-MNIST not found (looked in {looked}); {FASHION_MNIST_WAYS}")
    out = {}
    for part, prefix in (("train", "train"), ("test", "t10k")):
        images = _read_idx(_idx_file(folder, f"{prefix}-images-idx3-ubyte"), 3)
        labels = _read_idx(_idx_file(folder, f"{prefix}-labels-idx1-ubyte"), 1).astype(np.int64)
        if len(images) != len(labels) or labels.max(initial=0) >= len(FASHION_MNIST_CLASSES):
            raise DataError(f"Fashion-MNIST in {folder}: {prefix} images and labels do not match "
                            f"({len(images)} images, {len(labels)} labels); get a fresh copy: {FASHION_MNIST_WAYS}")
        out[f"{part}_images"], out[f"{part}_labels"] = images, labels
    return out


def fashion_mnist_partition(train_labels: np.ndarray) -> dict[str, np.ndarray]:
    """Indices into the official training set: {'train', 'val', 'pretrain'}, disjoint, fixed forever.

    Per class, a permutation seeded with FASHION_MNIST_SPLIT_SEED; its first 500 images form the few-shot
    train pool, the next 500 the validation pool, the other 5,000 the pretraining corpus.
    """
    labels = np.asarray(train_labels, dtype=np.int64)
    rng = np.random.default_rng(FASHION_MNIST_SPLIT_SEED)
    parts = {"train": [], "val": [], "pretrain": []}
    n_train, n_val = FASHION_MNIST_POOLS["train"], FASHION_MNIST_POOLS["val"]
    for c in range(len(FASHION_MNIST_CLASSES)):
        idx = rng.permutation(np.flatnonzero(labels == c))
        parts["train"].append(idx[:n_train])
        parts["val"].append(idx[n_train:n_train + n_val])
        parts["pretrain"].append(idx[n_train + n_val:])
    return {k: np.sort(np.concatenate(v)) for k, v in parts.items()}


def load_fashion_mnist(root: str | None = None, download: bool = False) -> Dataset:
    """Few-shot train pool, validation pool and the official test split (28x28 greyscale, in memory).

    The pretraining corpus of the stand-in VLM (rsnl.pretrain) is the rest of the official training
    set; no image of it appears here.
    """
    raw = fashion_mnist_arrays(root, download)
    part = fashion_mnist_partition(raw["train_labels"])
    sets = {}
    for split in ("train", "val"):
        idx = part[split]
        sets[split] = ImageSet(f"fashion-mnist/{split}", FASHION_MNIST_CLASSES, raw["train_labels"][idx],
                               list(raw["train_images"][idx]), [f"train-images-idx3-ubyte#{i}" for i in idx])
    sets["test"] = ImageSet("fashion-mnist/test", FASHION_MNIST_CLASSES, raw["test_labels"],
                            list(raw["test_images"]), [f"t10k-images-idx3-ubyte#{i}" for i in range(10000)])
    return Dataset("fashion-mnist", list(FASHION_MNIST_CLASSES), sets["train"], sets["val"], sets["test"])


# --------------------------------------------------------------------------------------------------
# imagefolder: <root>/{train,val,test}/<class>/*.jpg


def load_imagefolder(root: str | None, download: bool = False) -> Dataset:
    root = _require_root("imagefolder", root, "train, val, test")
    classes: dict[str, list[str]] = {}
    for split in SPLITS:
        folder = os.path.join(root, split)
        if not os.path.isdir(folder):
            raise DataError(
                f"split folder {folder} not found; imagefolder needs {root}/{{train,val,test}}/<class>/*.jpg"
            )
        classes[split] = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    classnames = classes["train"]
    if not classnames:
        raise DataError(f"split folder {os.path.join(root, 'train')} has no class folders; add <class>/*.jpg")
    sets = {}
    for split in SPLITS:
        if classes[split] != classnames:
            diff = sorted(set(classes[split]) ^ set(classnames))
            raise DataError(
                f"split folder {os.path.join(root, split)} has other classes than train (differ: "
                f"{', '.join(diff[:5])}); val and test must have the same class folders as train"
            )
        sources, labels, ids = [], [], []
        for c, cname in enumerate(classnames):
            folder = os.path.join(root, split, cname)
            files = sorted(
                e.path for e in os.scandir(folder) if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)
            )
            sources += files
            labels += [c] * len(files)
            ids += [f"{cname}/{os.path.basename(f)}" for f in files]
        if not sources:
            raise DataError(
                f"split folder {os.path.join(root, split)} holds no images ({', '.join(IMAGE_EXTENSIONS)})"
            )
        sets[split] = ImageSet(f"imagefolder/{split}", classnames, np.array(labels, dtype=np.int64), sources, ids)
    return Dataset("imagefolder", classnames, sets["train"], sets["val"], sets["test"])


# --------------------------------------------------------------------------------------------------
# Registry: name -> loader(root, download) -> Dataset

def _load_coop_entry(name: str, root: str | None, download: bool = False) -> Dataset:
    # CoOp's datasets cannot be downloaded by a script (several need a manual licence step).
    return load_coop(name, root, *COOP_DATASETS[name])


DATASETS: dict[str, Callable[..., Dataset]] = {
    **{name: partial(_load_coop_entry, name) for name in COOP_DATASETS},
    "dtd": load_dtd,  # CoOp layout, or torchvision's layout / download
    "digits": load_digits_dataset,
    "fashion-mnist": load_fashion_mnist,
    "imagefolder": load_imagefolder,
}


def list_datasets() -> list[str]:
    return sorted(DATASETS)


def load_dataset(name: str, root: str | None = None, download: bool = False) -> Dataset:
    """Load a registered dataset's file lists (no image is decoded here)."""
    key = str(name).strip().lower()
    if key not in DATASETS:
        close = difflib.get_close_matches(key, list_datasets(), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise DataError(f"unknown dataset '{name}'; {hint}known datasets: {', '.join(list_datasets())}")
    return DATASETS[key](root, download=download)
