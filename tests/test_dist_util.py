"""Tests of guided_diffusion.dist_util, alone and under `mpirun -np 2` (Jittor's MPI)."""

import os
import shutil
import subprocess
import sys
import textwrap

import jittor as jt
import numpy as np
import pytest

from guided_diffusion import dist_util

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_single_process_helpers_are_identity():
    assert dist_util.get_rank() == 0 and dist_util.get_world_size() == 1 and dist_util.is_main_process()
    a = np.arange(5, dtype=np.int64)
    gathered = dist_util.all_gather_array(a)
    assert len(gathered) == 1 and np.array_equal(gathered[0], a)
    np.testing.assert_array_equal(dist_util.all_reduce_mean_array(np.array([1.0, 3.0])), [1.0, 3.0])
    layer = jt.nn.Linear(2, 2)
    before = layer.weight.numpy().copy()
    dist_util.sync_params(layer.parameters())
    np.testing.assert_array_equal(layer.weight.numpy(), before)
    dist_util.barrier()
    assert dist_util.dev() in ("cpu", "cuda")


def test_load_state_dict_reads_torch_checkpoints(fixtures_dir):
    state = dist_util.load_state_dict(os.path.join(fixtures_dir, "checkpoint", "torch_zip_format.pt"),
                                      map_location="cpu")
    assert state["step"] == 3


PROBE = textwrap.dedent(
    """
    import sys
    import guided_diffusion
    import jittor as jt, numpy as np
    from guided_diffusion import dist_util as d
    r = d.get_rank()
    assert d.get_world_size() == 2
    parts = d.all_gather_array(np.arange(2 + r, dtype=np.int64) * (r + 1))
    assert [p.tolist() for p in parts] == [[0, 1], [0, 2, 4]], parts
    imgs = d.all_gather_array(np.full((2, 3, 3, 3), r, dtype=np.uint8))
    assert [int(p.max()) for p in imgs] == [0, 1] and imgs[1].dtype == np.uint8
    assert np.allclose(d.all_reduce_mean_array(np.array([r, 2.0 * r])), [0.5, 1.0])
    jt.set_global_seed(100 + r)  # different weights on each rank before the sync
    layer = jt.nn.Linear(4, 3)
    d.sync_params(layer.parameters())
    w = d.all_gather_array(layer.weight.numpy())
    assert np.array_equal(w[0], w[1])
    d.barrier()
    open(sys.argv[1] + "/rank%d.ok" % r, "w").close()
    """
)


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="OpenMPI is not installed (make setup installs it)")
def test_two_ranks_gather_average_and_share_parameters(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    out = subprocess.run(
        ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", sys.executable, str(script), str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert (tmp_path / "rank0.ok").exists() and (tmp_path / "rank1.ok").exists()
