"""Tests for guided_diffusion.training.checkpoints: complete atomic sets, the newest one found, the two layouts."""

import os

import jittor as jt
import numpy as np
import pytest

from guided_diffusion.checkpoint import load_file
from guided_diffusion.errors import CheckpointError
from guided_diffusion.run_guard import RunGuard, TrainingDiverged
from guided_diffusion.training.checkpoints import ADMLayout, CheckpointIO, DiTLayout


def _states(value):
    sd = {"w": np.full(3, value, np.float32)}
    return {"model": sd, "opt": {"state": {}, "param_groups": []}, "ema_0.9": sd, "phema_0.050": sd}


def test_an_adm_set_is_written_in_order_with_the_model_file_last_and_found_again(tmp_path):
    logged = []
    io = CheckpointIO(str(tmp_path), ADMLayout(["ema_0.9", "phema_0.050"]), RunGuard(), log=logged.append)
    for step in (1, 2):
        path = io.save(step, lambda: _states(step), [jt.ones(3)])
        assert path == str(tmp_path / ("model%06d.pt" % step))
    assert logged[-4:] == ["saving ema_0.9_000002.pt...", "saving phema_0.050_000002.pt...",
                           "saving opt000002.pt...", "saving model000002.pt..."]
    assert io.newest() == (str(tmp_path / "model000002.pt"), 2)
    os.remove(tmp_path / "phema_0.050_000002.pt")  # a set missing a file is skipped, and refused
    assert io.newest() == (str(tmp_path / "model000001.pt"), 1)
    with pytest.raises(CheckpointError, match="incomplete.*phema_0.050_000002.pt"):
        io.check_complete(str(tmp_path / "model000002.pt"), 2)
    assert float(io.read(str(tmp_path / "model000001.pt"), 1)["ema_0.9"]["w"][0]) == 1.0


def test_a_dit_set_is_the_references_file_with_the_snapshots_written_first(tmp_path):
    io = CheckpointIO(str(tmp_path), DiTLayout(["phema_0.100"]), RunGuard())
    states = {"model": {"w": np.ones(2, np.float32)}, "ema": {"w": np.ones(2, np.float32)}, "opt": {}, "args": None,
              "phema_0.100": {"w": np.zeros(2, np.float32)}}
    assert io.save(12, lambda: states, [jt.ones(2)]) == str(tmp_path / "0000012.pt")
    assert sorted(os.listdir(tmp_path)) == ["0000012.pt", "phema_0.100_000012.pt"]
    assert set(load_file(str(tmp_path / "0000012.pt"))) == {"model", "ema", "opt", "args"}
    assert io.newest() == (str(tmp_path / "0000012.pt"), 12)


def test_non_finite_weights_are_never_written(tmp_path):
    io = CheckpointIO(str(tmp_path), ADMLayout([]), RunGuard())
    with pytest.raises(TrainingDiverged, match="by step 3"):
        io.save(3, lambda: _states(0.0), [jt.array(np.array([1.0, np.inf], np.float32))])
    assert os.listdir(tmp_path) == []
