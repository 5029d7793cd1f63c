"""Shared pytest fixtures. Tests are offline and CPU-only (DESIGN.md section 6).

Data fixtures (generators in tests/helpers.py; each returns a fresh data_root under tmp_path):
  coop_dtd_root          <root>/dtd/images/... + dtd/split_zhou_DescribableTextures.json
                         (5 DTD class names, 16/8/8 images per class in train/val/test, 24x24 JPEG)
  torchvision_dtd_root   <root>/dtd/dtd/images/... + dtd/dtd/labels/{train,val,test}1.txt (same sizes)
  imagefolder_root       <root>/{train,val,test}/<class>/*.png (same sizes)
Append other fixtures below, each self-contained.
"""

import os

import pytest

from helpers import make_coop_tree, make_imagefolder_tree, make_torchvision_dtd_tree

# No test may reach a model hub (DESIGN.md section 6).
os.environ.setdefault("HF_HUB_OFFLINE", "1")


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
