"""Shared pytest fixtures. Tests are offline and CPU-only.

Data fixtures (generators in tests/helpers.py; each returns a fresh data_root under tmp_path):
  coop_dtd_root          <root>/dtd/images/... + dtd/split_zhou_DescribableTextures.json
                         (5 DTD class names, 16/8/8 images per class in train/val/test, 24x24 JPEG)
  torchvision_dtd_root   <root>/dtd/dtd/images/... + dtd/dtd/labels/{train,val,test}1.txt (same sizes)
  imagefolder_root       <root>/{train,val,test}/<class>/*.png (same sizes)
Append other fixtures below, each self-contained.
"""

import contextlib
import os
from pathlib import Path

import pytest

from rsnl.testing import make_coop_tree, make_imagefolder_tree, make_torchvision_dtd_tree

# No test may reach a model hub: pretrained weights come from files the tests make.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
CONFIGS = Path(__file__).resolve().parents[1] / "rsnl" / "configs"


# ---- data (rsnl/data.py) -------------------------------------------------------------------------


@pytest.fixture
def coop_dtd_root(tmp_path):
    """A data_root holding a small DTD in CoOp's layout."""
    root = tmp_path / "coop_data"
    make_coop_tree(root)
    return root


@pytest.fixture
def torchvision_dtd_root(tmp_path):
    """A data_root holding a small DTD in torchvision's layout (no CoOp split JSON)."""
    root = tmp_path / "tv_data"
    make_torchvision_dtd_tree(root)
    return root


@pytest.fixture
def imagefolder_root(tmp_path):
    """A data_root for the `imagefolder` dataset."""
    root = tmp_path / "folder_data"
    make_imagefolder_tree(root)
    return root


# ---- models and features (rsnl/models.py, rsnl/features.py, rsnl/train.py) --------------------------


@pytest.fixture(scope="session")
def tiny_clip():
    """One random-init rsnl-tiny (rsnl.models.LoadedClip), frozen; tests must not change its weights."""
    from rsnl.models import load_clip

    return load_clip("rsnl-tiny", None)


@pytest.fixture(scope="session")
def digits_inputs(tmp_path_factory, tiny_clip):
    """(base TrialConfig, LoadedClip, FeatureBank) for digits + rsnl-tiny with 2 augmented views,
    features built once into a session cache. Derive trial configs with cfg.replace(...)."""
    from rsnl.config import TrialConfig
    from rsnl.data import load_dataset
    from rsnl.features import build_feature_bank

    cache = tmp_path_factory.mktemp("digits_cache")
    cfg = TrialConfig(dataset="digits", backbone="rsnl-tiny", pretrained=None, shots=8, noise_type="ptnl",
                      noise_rate=0.5, seed=1, epochs=3, batch_size=16, n_ctx=4, blocks=2, aug_views=2,
                      device="cpu", cache_dir=str(cache))
    with one_torch_thread():
        bank = build_feature_bank(load_dataset("digits"), tiny_clip.model, tiny_clip.preprocess,
                                  tiny_clip.identity, aug_views=cfg.aug_views, cache_dir=cache,
                                  tokenizer=tiny_clip.tokenizer)
    return cfg, tiny_clip, bank


@contextlib.contextmanager
def one_torch_thread():
    """One intra-op torch thread for small CPU models: on this shared 2-core machine, under load from
    other processes, two OpenMP threads made the core tests ~3x slower (digits features: 23 s vs 3 s)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def torch_one_thread():
    """one_torch_thread() for a whole test module (pytestmark = pytest.mark.usefixtures(...))."""
    with one_torch_thread():
        yield


# ---- Ray studies (tune/, analysis/) --------------------------------------------------------------


@pytest.fixture(scope="session")
def ray_env(tmp_path_factory):
    """Environment for a Ray started by a test or a subprocess: no auth token in ~/.ray, session files
    under the test's tmp dir. Returns the dict of variables (also set in os.environ)."""
    ray_tmp = tmp_path_factory.mktemp("ray")
    env = {"RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": str(ray_tmp), "RAY_USAGE_STATS_ENABLED": "0",
           "HF_HUB_OFFLINE": "1"}
    os.environ.update(env)
    return env


@pytest.fixture
def env(ray_env):
    """The environment of a launch.py run with a Ray of its own (short RAY_TMPDIR: Ray's unix socket paths
    stay under 107 bytes)."""
    import shutil
    import tempfile
    path = tempfile.mkdtemp(prefix="rsnl-ray-", dir="/tmp")
    yield {**os.environ, **ray_env, "RAY_TMPDIR": path}
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def s3(monkeypatch):
    """An S3-compatible server (moto) on 127.0.0.1 with an empty bucket `rsnl`; yields a storage URI in it.
    The credentials it takes are in os.environ while it runs."""
    moto_server = pytest.importorskip("moto.server")
    creds = {"AWS_ACCESS_KEY_ID": "rsnl-test", "AWS_SECRET_ACCESS_KEY": "rsnl-test", "AWS_DEFAULT_REGION": "us-east-1"}
    for k, v in creds.items():
        monkeypatch.setenv(k, v)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    import boto3
    boto3.client("s3", endpoint_url=f"http://{host}:{port}").create_bucket(Bucket="rsnl")
    yield f"s3://rsnl/studies?endpoint_override={host}:{port}&scheme=http&region=us-east-1"
    server.stop()


@pytest.fixture(scope="session")
def ray_session(ray_env):
    """One local Ray for the whole test session (2 CPUs), shut down at the end."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=ray_env["RAY_TMPDIR"], log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def study_cache(tmp_path_factory):
    """A feature cache shared by the session's studies (digits + rsnl-tiny)."""
    return tmp_path_factory.mktemp("study_cache")


@pytest.fixture(scope="session")
def grid_experiment(ray_session, tmp_path_factory, study_cache):
    """A finished miniature ablation (tests/studies.py:grid_study): its experiment folder."""
    from studies import grid_study, run

    storage = tmp_path_factory.mktemp("grid_storage")
    _, path, _ = run(grid_study(storage, study_cache))
    return path


@pytest.fixture(scope="session")
def optuna_experiment(ray_session, tmp_path_factory, study_cache):
    """A finished miniature Optuna search with a group of 2 seeds: its experiment folder."""
    from studies import optuna_study, run

    storage = tmp_path_factory.mktemp("optuna_storage")
    _, path, _ = run(optuna_study(storage, study_cache))
    return path


# ---- the test-bed: Fashion-MNIST and rsnl's stand-in VLM (rsnl/pretrain.py) ------------------------


def fashion_mnist_missing() -> str | None:
    """Why the test-bed cannot run here, or None."""
    from rsnl.data import _find_fashion_mnist

    if _find_fashion_mnist(None) is None:
        return "Fashion-MNIST not found: apt-get install dataset-fashion-mnist (.ci/run installs it)"
    return None


@pytest.fixture(scope="session")
def standin_cache(tmp_path_factory):
    """A cache folder holding the real stand-in (built here once per session, 1-2 minutes) and the
    test-bed's image features; skips when Fashion-MNIST is absent."""
    reason = fashion_mnist_missing()
    if reason:
        pytest.skip(reason)
    from rsnl.pretrain import ensure_standin

    cache = tmp_path_factory.mktemp("standin_cache")
    ensure_standin("rsnl-tiny", "fashion-mnist", cache, log=lambda *_: None)
    return cache


@pytest.fixture(scope="session")
def testbed_inputs(standin_cache):
    """(base TrialConfig, LoadedClip, FeatureBank) of the test-bed's dataset config (rsnl/configs/
    fashion-mnist.yaml) with the session's stand-in. Derive trial configs with cfg.replace(...)."""
    from rsnl.config import TrialConfig, load_yaml
    from rsnl.inputs import load_inputs

    values = {**load_yaml(CONFIGS / "fashion-mnist.yaml"), "cache_dir": str(standin_cache), "device": "cpu",
              "download": False}
    cfg = TrialConfig.from_dict(values)
    clip, bank = load_inputs(cfg)
    return cfg, clip, bank
