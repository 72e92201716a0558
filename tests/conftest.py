"""Shared test set-up: Jittor's environment first, fixed seeds, fixture paths."""

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import guided_diffusion  # noqa: E402,F401  (prepares Jittor's environment before Jittor is imported)
import jittor as jt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

FIXTURES = os.path.join(REPO, "tests", "fixtures")


@pytest.fixture
def fixtures_dir() -> str:
    """Path of tests/fixtures."""
    return FIXTURES


@pytest.fixture(autouse=True)
def _seed_everything():
    """Every test starts from the same random state."""
    jt.set_global_seed(0)
    np.random.seed(0)
    yield
