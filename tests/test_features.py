"""rsnl.features: frozen image features in a content-keyed disk cache."""

import numpy as np
import pytest
import torch
from rsnl.testing import DTD_CLASSES, make_coop_tree, make_image, touch_later

from rsnl.data import load_dataset
from rsnl.features import build_feature_bank, cache_key, train_transform

COUNTS = {"train": 6, "val": 3, "test": 3}
C = len(DTD_CLASSES)

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def build(ds, clip, cache, aug_views=2, **kw):
    stats = {}
    bank = build_feature_bank(ds, clip.model, clip.preprocess, clip.identity, aug_views=aug_views,
                              cache_dir=cache, stats=stats, **kw)
    return bank, stats


def entry_path(cache, clip, images, transform, view):
    key = cache_key(clip.identity, images, transform, view, "fp32")
    return cache / key[:2] / f"{key}.pt"


def assert_same_bank(a, b):
    for name in ("train", "val", "test", "train_views"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for name in ("train_labels", "val_labels", "test_labels"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A small CoOp-layout DTD (5 classes, 6/3/3 images each), shared read-only by this module."""
    root = tmp_path_factory.mktemp("feat_data")
    make_coop_tree(root, counts=COUNTS)
    return root


@pytest.fixture(scope="module")
def built(tree, tiny_clip, tmp_path_factory):
    """(dataset, cache dir, bank, stats) of a first build with 2 augmented views."""
    ds = load_dataset("dtd", str(tree))
    cache = tmp_path_factory.mktemp("feat_cache")
    bank, stats = build(ds, tiny_clip, cache)
    return ds, cache, bank, stats


def test_bank_shapes_and_norms(built):
    ds, cache, bank, stats = built
    assert stats == {"computed": 5}  # train views 0, 1, 2 + val + test
    assert bank.dataset == "dtd" and bank.classnames == DTD_CLASSES and bank.dim == 64
    assert bank.train.shape == (C * 6, 64) and bank.val.shape == (C * 3, 64) and bank.test.shape == (C * 3, 64)
    assert bank.train_views.shape == (2, C * 6, 64)
    for t in (bank.train, bank.val, bank.test, bank.train_views):
        assert t.dtype == torch.float32
        torch.testing.assert_close(t.norm(dim=-1), torch.ones(t.shape[:-1]), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(bank.train_labels, ds.train.labels)
    assert bank.nbytes() == 4 * 64 * (C * 6 * 3 + C * 3 * 2)


def test_features_are_the_model_outputs(built, tiny_clip):
    """View 0 is the test-time preprocess through encode_image, L2-normalised."""
    ds, cache, bank, stats = built
    idx = [0, 7, 29]
    x = torch.stack([tiny_clip.preprocess(ds.train.load(i)) for i in idx])
    with torch.no_grad():
        f = torch.nn.functional.normalize(tiny_clip.model.encode_image(x), dim=-1)
    torch.testing.assert_close(bank.train[idx], f, atol=1e-5, rtol=0)


def test_second_build_computes_nothing(built, tiny_clip, tree):
    ds, cache, bank, _ = built
    again, stats = build(ds, tiny_clip, cache)
    assert stats == {"hits": 5}
    assert_same_bank(bank, again)
    # a reloaded dataset object (same files) hits the same entries
    _, stats = build(load_dataset("dtd", str(tree)), tiny_clip, cache)
    assert stats == {"hits": 5}


def test_key_depends_on_weights_view_and_transform(built, tiny_clip):
    ds, *_ = built
    pre = tiny_clip.preprocess
    base = cache_key(tiny_clip.identity, ds.train, pre, 0, "fp32")
    assert base == cache_key(tiny_clip.identity, ds.train, pre, 0, "fp32")
    others = {
        cache_key("rsnl-tiny|file-sha256:0123", ds.train, pre, 0, "fp32"),
        cache_key(tiny_clip.identity, ds.val, pre, 0, "fp32"),
        cache_key(tiny_clip.identity, ds.train, pre, 1, "fp32"),
        cache_key(tiny_clip.identity, ds.train, train_transform(pre), 0, "fp32"),
        cache_key(tiny_clip.identity, ds.train, pre, 0, "bf16"),
    }
    assert base not in others and len(others) == 5
    # the key does not depend on the object's address (a rebuilt transform is the same key)
    assert cache_key(tiny_clip.identity, ds.train, train_transform(pre), 1, "fp32") == \
        cache_key(tiny_clip.identity, ds.train, train_transform(pre), 1, "fp32")


def test_changed_image_changes_key_and_only_its_row(tmp_path, tiny_clip):
    root = tmp_path / "data"
    make_coop_tree(root, counts=COUNTS)
    ds = load_dataset("dtd", str(root))
    cache = tmp_path / "cache"
    first, stats = build(ds, tiny_clip, cache, aug_views=0)
    assert stats == {"computed": 3}
    key_before = cache_key(tiny_clip.identity, ds.train, tiny_clip.preprocess, 0, "fp32")

    i = 4
    path = ds.train.sources[i]
    make_image(path, label=3, seed=12345)  # other content (another class's colour), same name
    touch_later(path)
    assert cache_key(tiny_clip.identity, ds.train, tiny_clip.preprocess, 0, "fp32") != key_before

    second, stats = build(ds, tiny_clip, cache, aug_views=0)
    assert stats == {"computed": 1, "hits": 2}  # train recomputed, val and test reused
    assert not torch.allclose(second.train[i], first.train[i], atol=1e-3)
    rest = [j for j in range(len(ds.train)) if j != i]
    torch.testing.assert_close(second.train[rest], first.train[rest], atol=1e-6, rtol=0)
    assert torch.equal(second.val, first.val) and torch.equal(second.test, first.test)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "bad_checksum"])
def test_damaged_cache_entry_is_rebuilt(built, tiny_clip, tmp_path, damage):
    ds, cache_src, bank, _ = built
    cache = tmp_path / "cache"
    # work on a copy of the module's cache so other tests keep theirs
    import shutil
    shutil.copytree(cache_src, cache)
    path = entry_path(cache, tiny_clip, ds.train, tiny_clip.preprocess, 0)
    assert path.is_file()
    raw = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        path.write_bytes(raw[:100] + bytes(b ^ 0xFF for b in raw[100:400]) + raw[400:])
    elif damage == "empty":
        path.write_bytes(b"")
    else:  # a readable file whose tensor no longer matches its checksum
        entry = torch.load(path, weights_only=True)
        entry["features"] = entry["features"] + 1.0
        torch.save(entry, path)

    again, stats = build(ds, tiny_clip, cache)
    assert stats == {"computed": 1, "hits": 4}
    assert_same_bank(bank, again)
    # the entry was rewritten whole: the next build reads it
    _, stats = build(ds, tiny_clip, cache)
    assert stats == {"hits": 5}
    assert not list(cache.rglob("*.tmp"))


def test_augmented_views_are_deterministic_and_differ_from_view0(built, tiny_clip, tmp_path):
    ds, _, bank, _ = built
    fresh, stats = build(ds, tiny_clip, tmp_path / "fresh_cache", batch_size=7)  # other batching too
    assert stats == {"computed": 5}
    torch.testing.assert_close(fresh.train_views, bank.train_views, atol=1e-5, rtol=0)
    torch.testing.assert_close(fresh.train, bank.train, atol=1e-5, rtol=0)
    v0, v1, v2 = bank.train, bank.train_views[0], bank.train_views[1]
    for a, b in ((v0, v1), (v0, v2), (v1, v2)):
        diff = (a - b).norm(dim=-1)
        assert (diff > 1e-4).float().mean() > 0.9, "augmented views should change (almost) every image"


def test_no_aug_views(built, tiny_clip):
    ds, cache, bank, _ = built
    plain, stats = build(ds, tiny_clip, cache, aug_views=0)
    assert plain.train_views is None and stats == {"hits": 3}
    assert torch.equal(plain.train, bank.train)


def test_default_cache_dir_follows_env(monkeypatch, tmp_path):
    from rsnl.files import default_cache_dir
    monkeypatch.setenv("RSNL_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"


def test_atomic_write_failure_keeps_old_content_and_leaves_no_temp(tmp_path):
    from rsnl.files import atomic_write
    path = tmp_path / "f.bin"
    atomic_write(path, b"old")

    def half_then_fail(f):
        f.write(b"new, but not all of it")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(path, half_then_fail)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f.bin"]


# ---- the cache serves features of these bytes only, and leaves no lock or temp file ----------------


def test_image_bytes_changed_with_same_size_and_mtime_is_a_miss(tmp_path, tiny_clip):
    """Images are keyed by content: other pixels in a file of the same size and mtime are new features."""
    import os
    root = tmp_path / "data"
    make_coop_tree(root, counts=COUNTS, ext="bmp")  # uncompressed: other pixels, same file size
    ds = load_dataset("dtd", str(root))
    cache = tmp_path / "cache"
    first, stats = build(ds, tiny_clip, cache, aug_views=0)
    assert stats == {"computed": 3}

    i = 4
    path = ds.train.sources[i]
    before = os.stat(path)
    make_image(path, label=3, seed=12345)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)

    second, stats = build(load_dataset("dtd", str(root)), tiny_clip, cache, aug_views=0)
    assert stats == {"computed": 1, "hits": 2}
    assert not torch.allclose(second.train[i], first.train[i], atol=1e-3)
    assert torch.equal(second.val, first.val)


def test_fingerprint_follows_content_not_path_or_mtime(tmp_path):
    import shutil
    from rsnl.testing import touch_later
    root = tmp_path / "data"
    make_coop_tree(root, counts=COUNTS)
    a = load_dataset("dtd", str(root)).val
    fp = a.fingerprint()
    touch_later(a.sources[0])  # same bytes, later mtime: the same features
    assert a.fingerprint() == fp
    shutil.copytree(root, tmp_path / "moved")  # the same dataset elsewhere: the same entries
    assert load_dataset("dtd", str(tmp_path / "moved")).val.fingerprint() == fp


def test_replaced_weights_file_with_same_mtime_is_a_miss(tmp_path, tiny_clip):
    import os

    from rsnl.models import load_clip
    ds = load_dataset("dtd", str(make_coop_tree(tmp_path / "data", counts=COUNTS).parent))
    weights = tmp_path / "w.pt"

    def save(seed):
        g = torch.Generator().manual_seed(seed)
        torch.save({k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                    for k, v in tiny_clip.model.state_dict().items()}, weights)

    save(1)
    first = load_clip("rsnl-tiny", str(weights))
    cache = tmp_path / "cache"
    bank, stats = build(ds, first, cache, aug_views=0)
    assert stats == {"computed": 3}
    before = os.stat(weights)
    save(2)
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    second = load_clip("rsnl-tiny", str(weights))
    assert second.identity != first.identity
    other, stats = build(ds, second, cache, aug_views=0)
    assert stats == {"computed": 3}
    assert not torch.allclose(other.test, bank.test, atol=1e-3)


def test_cache_leaves_no_lock_or_temp_files(built, tiny_clip, tmp_path):
    """Locks are removed by their holder; a temp file left by a killed writer goes with the next write."""
    ds, _, bank, _ = built
    cache = tmp_path / "cache"
    _, stats = build(ds, tiny_clip, cache)
    assert stats == {"computed": 5}
    assert not list(cache.rglob("*.lock")) and not list(cache.rglob("*.tmp"))
    path = entry_path(cache, tiny_clip, ds.val, tiny_clip.preprocess, 0)
    path.unlink()
    stale = path.parent / f".{path.name}.killed.tmp"  # as atomic_write names its temp files
    stale.write_bytes(b"half an entry")
    _, stats = build(ds, tiny_clip, cache)
    assert stats == {"computed": 1, "hits": 4}
    assert not list(cache.rglob("*.lock")) and not list(cache.rglob("*.tmp"))


def test_lock_is_exclusive_across_processes_while_holders_remove_it(tmp_path):
    """Three processes add 1 to a file 40 times each under locked(): none is lost although each holder
    deletes the lock file (a waiter on a deleted lock file must not think it holds the lock)."""
    import subprocess
    import sys
    counter = tmp_path / "counter"
    counter.write_text("0")
    code = ("import sys, time\nfrom rsnl.files import locked\nfrom pathlib import Path\np = Path(sys.argv[1])\n"
            "for _ in range(40):\n    with locked(p):\n        n = int(p.read_text())\n        time.sleep(0.001)\n"
            "        p.write_text(str(n + 1))\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(counter)]) for _ in range(3)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    assert counter.read_text() == "120"
    assert not (tmp_path / "counter.lock").exists()
