"""Tests of guided_diffusion.checkpoint: torch containers without torch, atomic saves, and their errors."""

import argparse
import collections
import os
import pickle

import jittor as jt
import numpy as np
import pytest

from guided_diffusion.checkpoint import atomic_write, load_file, save_file
from guided_diffusion.errors import CheckpointError

CKPT_FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "checkpoint")


@pytest.mark.parametrize("name", ["torch_zip_format.pt", "torch_legacy_format.pt"])
def test_torch_written_files_load_with_exact_values_dtypes_and_shapes(name):
    loaded = load_file(os.path.join(CKPT_FIXTURES, name))
    expected = np.load(os.path.join(CKPT_FIXTURES, "expected_tensors.npz"))
    assert loaded["step"] == 3
    assert isinstance(loaded["args"], argparse.Namespace) and loaded["args"].model == "DiT-S/8"
    model = loaded["model"]
    assert list(model.keys()) == ["w", "wt", "half", "i64", "scalar", "view", "bf16"]
    for key in expected.files:
        np.testing.assert_array_equal(model[key].astype(np.float64), expected[key].astype(np.float64))
        assert model[key].shape == expected[key].shape
    assert model["half"].dtype == np.float16
    assert model["i64"].dtype == np.int64 and model["i64"][1] == 2 ** 40
    assert model["scalar"].shape == ()


def test_saved_file_round_trips_nested_containers(tmp_path):
    obj = {
        "model": collections.OrderedDict([("a.weight", np.arange(6, dtype=np.float32).reshape(2, 3))]),
        "args": argparse.Namespace(lr=1e-4, name="x"),
        "step": 7,
        "scalar": np.array(2.5, dtype=np.float32),
        "half": np.ones(4, dtype=np.float16),
        "long": np.array([1, 2 ** 40], dtype=np.int64),
        "transposed": np.arange(6, dtype=np.float32).reshape(2, 3).T,
        "var": jt.array(np.ones((2, 2), dtype=np.float32)),
        "nested": [(1, "two"), {"three": 3.0}],
    }
    path = str(tmp_path / "ckpt.pt")
    save_file(obj, path)
    back = load_file(path)
    assert isinstance(back["model"], collections.OrderedDict)
    np.testing.assert_array_equal(back["model"]["a.weight"], obj["model"]["a.weight"])
    assert back["args"] == obj["args"] and back["step"] == 7
    assert back["scalar"].shape == () and back["scalar"] == 2.5
    assert back["half"].dtype == np.float16 and back["long"].dtype == np.int64
    np.testing.assert_array_equal(back["transposed"], obj["transposed"])
    np.testing.assert_array_equal(back["var"], np.ones((2, 2), dtype=np.float32))
    assert back["nested"] == [(1, "two"), {"three": 3.0}]


def test_failed_save_leaves_the_previous_file_and_no_temporary(tmp_path):
    path = str(tmp_path / "model000010.pt")
    save_file({"w": np.zeros(3, dtype=np.float32)}, path)
    with pytest.raises(Exception):
        save_file({"w": np.zeros(3, dtype=np.complex64)}, path)  # unsupported dtype fails mid-write
    np.testing.assert_array_equal(load_file(path)["w"], np.zeros(3, dtype=np.float32))
    assert os.listdir(tmp_path) == ["model000010.pt"]


def test_atomic_write_replaces_only_on_success(tmp_path):
    path = str(tmp_path / "notes.txt")
    with atomic_write(path, "w") as f:
        f.write("first")
    with pytest.raises(RuntimeError):
        with atomic_write(path, "w") as f:
            f.write("second")
            raise RuntimeError("interrupted")
    assert open(path).read() == "first"
    assert os.listdir(tmp_path) == ["notes.txt"]


def test_missing_file_is_a_clear_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_file(str(tmp_path / "absent.pt"))


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04truncated zip"])
def test_corrupt_file_is_a_clear_checkpoint_error(tmp_path, content):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="corrupt|not a PyTorch checkpoint"):
        load_file(str(path))


def test_truncated_real_checkpoint_is_reported_as_corrupt(tmp_path):
    data = open(os.path.join(CKPT_FIXTURES, "torch_zip_format.pt"), "rb").read()
    path = tmp_path / "cut.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        load_file(str(path))


def test_pickled_code_is_refused_not_executed(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch %s" % (tmp_path / "pwned"),))

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"x": Evil()}, protocol=2))
    with pytest.raises(CheckpointError):
        load_file(str(path))
    assert not (tmp_path / "pwned").exists()
