import logging
import os
from pathlib import Path

import pytest


def shared_data() -> Path:
    return Path(os.environ.get("UDML_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture
def cub_root() -> Path:
    root = shared_data() / "CUB_200_2011"
    if not root.is_dir():
        pytest.skip(f"CUB-200-2011 not found at {root}")
    return root


@pytest.fixture
def omniglot_root() -> Path:
    root = shared_data() / "omniglot"
    if not root.is_dir():
        pytest.skip(f"Omniglot not found at {root}")
    return root


@pytest.fixture
def udml_log(caplog):
    """caplog at INFO for the "udml" logger (which propagates: the library configures no console of its own)."""
    caplog.set_level(logging.INFO, logger="udml")
    return caplog
