"""The test-bed's data: Fashion-MNIST from Debian's package, torchvision's layout or a download, its fixed
partition, and the one-line messages when it is missing or damaged.

The tests that read the real files skip (with the reason) where the data is absent; CI installs it.
"""

import gzip
import hashlib
import http.server
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from rsnl import data
from rsnl.data import DataError, fashion_mnist_partition, load_dataset

SOURCE = data._find_fashion_mnist(None)  # the folder this machine has the files in, if any
needs_data = pytest.mark.skipif(
    SOURCE is None,
    reason="Fashion-MNIST not found: apt-get install dataset-fashion-mnist (.ci/run installs it)")
FILES = list(data.FASHION_MNIST_FILES)


def content(name: str) -> bytes:
    """The uncompressed bytes of one of the dataset's files on this machine."""
    path = data._idx_file(SOURCE, name)
    with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
        return f.read()


@pytest.fixture
def nowhere(tmp_path, monkeypatch):
    """No Fashion-MNIST anywhere: Debian's folder and rsnl's cache point at empty places."""
    monkeypatch.setattr(data, "FASHION_MNIST_DEBIAN", str(tmp_path / "no-debian"))
    monkeypatch.setenv("RSNL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("RSNL_DATA", raising=False)
    return tmp_path


def one_line(excinfo, *needles) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    return msg


# --- the real data -------------------------------------------------------------------------------

@needs_data
def test_splits_sizes_and_classes():
    ds = load_dataset("fashion-mnist")
    assert ds.name == "fashion-mnist" and ds.classnames[0] == "T-shirt/top" and len(ds.classnames) == 10
    for split, per_class in (("train", 500), ("val", 500), ("test", 1000)):
        s = getattr(ds, split)
        assert s.name == f"fashion-mnist/{split}"
        assert np.bincount(s.labels).tolist() == [per_class] * 10
        assert s.sources[0].shape == (28, 28) and s.sources[0].dtype == np.uint8
    image = ds.test.load(0)
    assert image.mode == "RGB" and image.size == (28, 28)


@needs_data
def test_partition_is_disjoint_fixed_and_covers_the_training_set():
    raw = data.fashion_mnist_arrays()
    part = fashion_mnist_partition(raw["train_labels"])
    sets = {k: set(v.tolist()) for k, v in part.items()}
    assert len(sets["train"]) == 5000 and len(sets["val"]) == 5000 and len(sets["pretrain"]) == 50000
    assert not (sets["train"] & sets["val"]) and not (sets["pretrain"] & (sets["train"] | sets["val"]))
    assert sets["train"] | sets["val"] | sets["pretrain"] == set(range(60000))
    again = fashion_mnist_partition(raw["train_labels"].copy())
    assert all(np.array_equal(part[k], again[k]) for k in part)
    # the few-shot pools hold exactly those images; the pretraining corpus and the test split are elsewhere
    ds = load_dataset("fashion-mnist")
    assert np.array_equal(np.stack(ds.train.sources), raw["train_images"][part["train"]])
    assert np.array_equal(np.stack(ds.test.sources), raw["test_images"])


@needs_data
def test_torchvision_layout_under_data_root_gives_the_same_images(tmp_path, nowhere, monkeypatch):
    raw_dir = tmp_path / "root" / "FashionMNIST" / "raw"
    raw_dir.mkdir(parents=True)
    for name in FILES:  # torchvision keeps the extracted files beside the .gz; here only extracted ones
        (raw_dir / name).write_bytes(content(name))
    ds = load_dataset("fashion-mnist", str(tmp_path / "root"))
    ref = load_dataset("fashion-mnist", SOURCE)
    assert np.array_equal(ds.val.labels, ref.val.labels)
    assert all(np.array_equal(a, b) for a, b in zip(ds.val.sources[:50], ref.val.sources[:50]))


@needs_data
def test_download_through_torchvision_into_the_cache(tmp_path, nowhere, monkeypatch):
    """The real download path against a server on 127.0.0.1 that serves the dataset's files."""
    from torchvision.datasets import FashionMNIST

    served = tmp_path / "served"
    served.mkdir()
    for name in FILES:
        (served / f"{name}.gz").write_bytes(gzip.compress(content(name)))

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(served), **kw)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setattr(FashionMNIST, "mirrors", [f"http://127.0.0.1:{server.server_port}/"])
        # archives compressed here differ from the published ones, so torchvision's md5 list is replaced;
        # rsnl checks the uncompressed content against the published checksums either way
        monkeypatch.setattr(FashionMNIST, "resources", [
            (f"{n}.gz", hashlib.md5((served / f"{n}.gz").read_bytes()).hexdigest()) for n in FILES])
        with pytest.raises(DataError):  # without download: true nothing is fetched
            load_dataset("fashion-mnist")
        ds = load_dataset("fashion-mnist", download=True)
    finally:
        server.shutdown()
        server.server_close()
    cached = tmp_path / "cache" / "data" / "FashionMNIST" / "raw"
    assert all((cached / f"{n}.gz").is_file() for n in FILES)
    assert len(ds.test) == 10000
    again = load_dataset("fashion-mnist")  # found in the cache now, no download
    assert np.array_equal(again.train.labels, ds.train.labels)


# --- missing or damaged ------------------------------------------------------------------------

def test_missing_data_is_one_line_naming_the_three_ways(nowhere):
    with pytest.raises(DataError) as e:
        load_dataset("fashion-mnist")
    one_line(e, "Fashion-MNIST not found", "apt-get install dataset-fashion-mnist", "FashionMNIST/raw",
             "download: true")


def test_offline_download_fails_in_seconds_with_one_line(nowhere, monkeypatch):
    from torchvision.datasets import FashionMNIST

    monkeypatch.setattr(FashionMNIST, "mirrors", ["http://rsnl-test.invalid/"])
    t0 = time.perf_counter()
    with pytest.raises(DataError) as e:
        load_dataset("fashion-mnist", download=True)
    assert time.perf_counter() - t0 < 10
    one_line(e, "cannot be downloaded", "rsnl-test.invalid", "apt-get install dataset-fashion-mnist")


def _write_idx(path: Path, array: np.ndarray, compress=True):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    content = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(content) if compress else content)


def test_foreign_or_truncated_files_are_refused_by_name(nowhere):
    root = nowhere / "root"
    root.mkdir()
    _write_idx(root / "train-images-idx3-ubyte.gz", np.zeros((10, 28, 28)))
    _write_idx(root / "train-labels-idx1-ubyte.gz", np.zeros(10))
    _write_idx(root / "t10k-images-idx3-ubyte.gz", np.zeros((10, 28, 28)))
    _write_idx(root / "t10k-labels-idx1-ubyte.gz", np.zeros(10))
    with pytest.raises(DataError) as e:
        load_dataset("fashion-mnist", str(root))
    one_line(e, str(root / "train-images-idx3-ubyte.gz"), "not the published file", "md5")
    (root / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b\x08\x00 truncated")
    with pytest.raises(DataError) as e:
        load_dataset("fashion-mnist", str(root))
    one_line(e, str(root / "train-images-idx3-ubyte.gz"), "cannot be read")


def test_in_memory_greyscale_images_are_checked():
    from rsnl.data import ImageSet
    good = ImageSet("x/train", ["a"], [0, 0], [np.zeros((28, 28), np.uint8), np.zeros((8, 8, 3), np.uint8)])
    assert [good.load(i).size for i in range(2)] == [(28, 28), (8, 8)]
    bad = ImageSet("x/train", ["a"], [0], [np.zeros((28, 28, 2), np.uint8)])
    with pytest.raises(DataError, match="expected HxW"):
        bad.load(0)
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
