"""Shared pytest setup: make the checkout importable without installing it (PYTHONPATH not needed), and keep
the tests away from the user's own exported weights (LEARNED_OPTIM_HOME points at an empty folder)."""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

_HOME = tempfile.TemporaryDirectory(prefix="learned_optim_home_")  # removed when the test process exits
os.environ["LEARNED_OPTIM_HOME"] = _HOME.name


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` need a GPU: skipped (with the reason) where torch sees none."""
    import pytest
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run scripts/gpu_check.sh on a GPU machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
