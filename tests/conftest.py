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

# Device switch: GDJT_TEST_DEVICE=cuda runs the suite with jt.flags.use_cuda=1 (and fails at once without CUDA),
# GDJT_TEST_DEVICE=cpu keeps it on the CPU even where a GPU exists; unset, the package's default applies (CUDA when
# a GPU is present). The same tests run either way; only those of CPU_ONLY_MODULES are skipped on CUDA.
TEST_DEVICE = os.environ.get("GDJT_TEST_DEVICE", "").strip().lower()
CPU_ONLY_MODULES = {
    "test_cpu_kernels.py": "the fused CPU kernels (guided_diffusion/cpu/kernels.py) are not used on CUDA",
    "test_winograd.py": "the Winograd convolution is the CPU path (cuDNN convolves on CUDA)",
    "test_nn_fast_paths.py": "the forward-only fast paths of nn.py are CPU kernels",
}
if TEST_DEVICE not in ("", "cpu", "cuda"):
    raise pytest.UsageError("GDJT_TEST_DEVICE must be 'cpu' or 'cuda', not %r" % TEST_DEVICE)
if TEST_DEVICE == "cuda" and not jt.has_cuda:
    raise pytest.UsageError(
        "GDJT_TEST_DEVICE=cuda but Jittor found no CUDA (jt.has_cuda is false): check nvidia-smi and Jittor's "
        "nvcc_path / CUDA libraries (README, \"CUDA machines\")")
if TEST_DEVICE:
    jt.flags.use_cuda = int(TEST_DEVICE == "cuda")


def pytest_report_header(config):
    """Name the device the tests run on."""
    return "guided-diffusion-jittor: tests on %s (GDJT_TEST_DEVICE=%s)" % (
        "cuda" if jt.flags.use_cuda else "cpu", TEST_DEVICE or "unset")


def pytest_collection_modifyitems(config, items):
    """On CUDA, skip the tests of CPU-only code paths (CPU_ONLY_MODULES)."""
    if not jt.flags.use_cuda:
        return
    for item in items:
        reason = CPU_ONLY_MODULES.get(os.path.basename(str(item.fspath)))
        if reason:
            item.add_marker(pytest.mark.skip(reason="CPU only: " + reason))


@pytest.fixture
def fixtures_dir() -> str:
    """Path of tests/fixtures."""
    return FIXTURES


@pytest.fixture(autouse=True)
def _seed_everything():
    """Every test starts from the same random state (and, with GDJT_TEST_DEVICE set, on that device)."""
    if TEST_DEVICE:
        jt.flags.use_cuda = int(TEST_DEVICE == "cuda")
    jt.set_global_seed(0)
    np.random.seed(0)
    yield
