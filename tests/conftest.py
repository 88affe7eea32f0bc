"""Shared fixtures: the real assets folder (CAFT_ASSETS, default ../shared) and offline settings."""

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))  # for `tiny_models`

from caft.assets import assets_dir  # noqa: E402


@pytest.fixture(scope="session")
def assets() -> Path:
    folder = assets_dir()
    if not folder.is_dir():
        pytest.skip(f"real assets not found at {folder}; set CAFT_ASSETS to the shared assets folder")
    return folder


@pytest.fixture(scope="session")
def stories_model_dir(assets) -> Path:
    folder = assets / "models" / "stories260k"
    if not (folder / "config.json").is_file():
        pytest.skip(f"stories260k model not found at {folder}")
    return folder
