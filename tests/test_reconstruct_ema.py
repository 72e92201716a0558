"""scripts/reconstruct_ema.py (and guided_diffusion/training/reconstruct.py): post-hoc EMA from power-function EMA
snapshot files, against the coefficients of EDM2's own solve_posthoc_coefficients (tests/fixtures/phema), and its
answers to bad input."""

import os
import subprocess
import sys

import numpy as np
import pytest

from guided_diffusion.checkpoint import load_file, save_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(REPO, "tests", "fixtures", "phema", "edm2_phema.npz")


def run_tool(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, "scripts", "reconstruct_ema.py")] + [str(a) for a in args],
                          capture_output=True, text=True, cwd=REPO, timeout=300)


def write_snapshots(folder, steps, stds, seed=0):
    """phema_<std>_<step>.pt files of random two-tensor state dicts; returns {(std, step): state}."""
    rng = np.random.RandomState(seed)
    os.makedirs(folder, exist_ok=True)
    states = {}
    for step in steps:
        for std in stds:
            state = {"w": rng.randn(3, 4).astype(np.float32), "b": rng.randn(4).astype(np.float32)}
            save_file(state, os.path.join(str(folder), "phema_%.3f_%06d.pt" % (std, step)))
            states[(std, step)] = state
    return states


@pytest.mark.parametrize("step,key", [(None, "coef_step4"), (3, "coef_step3")])
def test_reconstruction_is_the_edm2_combination_of_the_snapshots_and_is_printed(tmp_path, step, key):
    edm2 = np.load(FIXTURE)
    states = write_snapshots(tmp_path / "run", range(1, 5), (0.05, 0.1))
    out = tmp_path / "ema.pt"
    args = ["--log_dir", tmp_path / "run", "--std", "0.08", "--out", out] + (["--step", step] if step else [])
    proc = run_tool(*args)
    assert proc.returncode == 0, proc.stderr
    upto = step or 4
    column = list(edm2["out_stds"]).index(0.08)
    coefficients = edm2[key][:, column]
    sel = [(float(d), int(s)) for s, d in zip(edm2["in_steps"], edm2["in_stds"]) if s <= upto]
    result = load_file(str(out))
    for name in ("w", "b"):
        expected = sum(c * states[k][name].astype(np.float64) for c, k in zip(coefficients, sel))
        np.testing.assert_allclose(result[name], expected, rtol=1e-6, atol=1e-7)
        assert result[name].dtype == np.float32
    assert "from %d snapshots" % len(sel) in proc.stdout
    for (std, s), c in zip(sel, coefficients):
        assert ("%+.6f  %s" % (c, os.path.join(str(tmp_path / "run"), "phema_%.3f_%06d.pt" % (std, s)))) in proc.stdout


def test_a_dit_run_folder_is_searched_in_its_checkpoints_folder(tmp_path):
    states = write_snapshots(tmp_path / "000-DiT-S-4" / "checkpoints", (2, 4), (0.05, 0.1))
    proc = run_tool("--log_dir", tmp_path / "000-DiT-S-4", "--std", "0.1", "--out", tmp_path / "e.pt")
    assert proc.returncode == 0, proc.stderr
    # the std of a stored snapshot at the newest step comes back as that snapshot
    np.testing.assert_allclose(load_file(str(tmp_path / "e.pt"))["w"], states[(0.1, 4)]["w"], rtol=1e-5, atol=1e-6)


def test_no_snapshots_is_an_error_naming_the_flag_to_train_with(tmp_path):
    os.makedirs(tmp_path / "empty")
    proc = run_tool("--log_dir", tmp_path / "empty", "--std", "0.1", "--out", tmp_path / "e.pt")
    assert proc.returncode == 2 and "no power-function EMA snapshots" in proc.stderr and "--ema_std" in proc.stderr


@pytest.mark.parametrize("std", ["0", "-0.1", "0.3"])
def test_a_std_outside_the_range_is_an_error(tmp_path, std):
    write_snapshots(tmp_path / "run", (1, 2), (0.05, 0.1))
    proc = run_tool("--log_dir", tmp_path / "run", "--std", std, "--out", tmp_path / "e.pt")
    assert proc.returncode == 2 and "outside (0, 0.28]" in proc.stderr
    assert not os.path.exists(tmp_path / "e.pt")


def test_a_step_without_snapshots_is_an_error_listing_the_steps(tmp_path):
    write_snapshots(tmp_path / "run", (10, 20), (0.05, 0.1))
    proc = run_tool("--log_dir", tmp_path / "run", "--std", "0.08", "--step", "15", "--out", tmp_path / "e.pt")
    assert proc.returncode == 2 and "--step 15 has no snapshot" in proc.stderr and "10, 20" in proc.stderr


def test_one_snapshot_of_one_std_is_ill_posed_for_another_std(tmp_path):
    write_snapshots(tmp_path / "run", (10,), (0.05,))
    proc = run_tool("--log_dir", tmp_path / "run", "--std", "0.1", "--out", tmp_path / "e.pt")
    assert proc.returncode == 2 and "ill-posed" in proc.stderr and "two stds" in proc.stderr


def test_snapshots_of_one_std_at_several_steps_reconstruct_another_std(tmp_path):
    write_snapshots(tmp_path / "run", (100, 200, 300), (0.05,))
    proc = run_tool("--log_dir", tmp_path / "run", "--std", "0.1", "--out", tmp_path / "e.pt")
    assert proc.returncode == 0, proc.stderr
    assert "from 3 snapshots" in proc.stdout
