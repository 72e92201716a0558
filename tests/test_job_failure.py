"""Tests for guided_diffusion.job_failure (through errors.run_cli): under `mpirun -np 2` a rank that fails, by an
exception, a UserError, a non-zero exit or a crash by signal, ends the whole job promptly with a non-zero status and
one line naming the rank; the other rank, waiting in an all-reduce, does not hang. Exits every rank takes together
(0, and the run guard's 143) finalize normally. Outside mpirun nothing changes."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from guided_diffusion import job_failure

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MPIRUN = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2"]
needs_mpirun = pytest.mark.skipif(shutil.which("mpirun") is None,
                                  reason="OpenMPI is not installed (make setup installs it)")

# Rank 1 fails in the way argv[1] names while rank 0 waits for it in an all-reduce (a collective that never
# completes unless the job is ended); "ok" and "coordinated" end on both ranks.
DRIVER = textwrap.dedent('''
    import os, sys, time
    sys.path.insert(0, %(repo)r)
    import guided_diffusion
    import jittor as jt
    from guided_diffusion import dist_util
    from guided_diffusion.errors import UserError, run_cli

    mode = sys.argv[1]

    def main():
        rank = dist_util.get_rank()
        x = jt.ones(4)
        x.mpi_all_reduce("add").sync()  # both ranks are up and compiled
        if rank == 1:
            if mode == "exception":
                raise RuntimeError("a deliberate failure")
            if mode == "user_error":
                raise UserError("a deliberate user error: use --flag 1")
            if mode == "exit":
                raise SystemExit(3)
            if mode == "segfault":
                os.kill(os.getpid(), 11)
                time.sleep(30)
        if mode == "coordinated":
            raise SystemExit(143)
        total = x.mpi_all_reduce("add").numpy()
        print("rank %%d done %%g" %% (rank, total[0]), flush=True)

    if mode == "uncaught":  # outside run_cli: the package's excepthook ends the job
        jt.ones(4).mpi_all_reduce("add").sync()
        if dist_util.get_rank() == 1:
            raise RuntimeError("a deliberate failure outside main")
        jt.ones(4).mpi_all_reduce("add").sync()
    else:
        run_cli(main)
''') % {"repo": REPO}


def _run_job(tmp_path, mode: str, timeout: float = 240.0):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    start = time.time()
    proc = subprocess.run(MPIRUN + [sys.executable, str(script), mode], capture_output=True, text=True,
                          timeout=timeout, cwd=str(tmp_path))
    return proc, time.time() - start


def test_rank_and_size_are_read_from_mpiruns_environment(monkeypatch):
    for var in ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_RANK", "PMI_SIZE", "PMIX_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert job_failure.job_rank_and_size() == (0, 1) and not job_failure.in_multi_rank_job()
    monkeypatch.setenv("PMI_RANK", "3")
    monkeypatch.setenv("PMI_SIZE", "4")
    assert job_failure.job_rank_and_size() == (3, 4) and job_failure.in_multi_rank_job()
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    assert job_failure.job_rank_and_size() == (1, 2)


def test_exit_codes_of_system_exit_follow_python():
    assert job_failure.exit_code_of(SystemExit()) == 0
    assert job_failure.exit_code_of(SystemExit(143)) == 143
    assert job_failure.exit_code_of(SystemExit("a message")) == 1
    assert 143 in job_failure.COORDINATED_EXIT_CODES and 130 in job_failure.COORDINATED_EXIT_CODES
    assert 2 not in job_failure.COORDINATED_EXIT_CODES


def test_outside_mpirun_an_exception_propagates_unchanged(monkeypatch):
    from guided_diffusion.errors import run_cli
    for var in ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_RANK", "PMI_SIZE"):
        monkeypatch.delenv(var, raising=False)

    def fails():
        raise ValueError("plain")

    with pytest.raises(ValueError, match="plain"):
        run_cli(fails)


@needs_mpirun
@pytest.mark.parametrize("mode, status, words", [
    ("exception", 1, "error: rank 1 of 2 failed: RuntimeError: a deliberate failure"),
    ("user_error", 2, "error: rank 1 of 2 failed: a deliberate user error: use --flag 1"),
    ("exit", 3, "error: rank 1 of 2 failed: exit status 3"),
    ("uncaught", 1, "error: rank 1 of 2 failed: RuntimeError: a deliberate failure outside main"),
])
def test_a_failing_rank_ends_the_job_instead_of_leaving_the_other_waiting(tmp_path, mode, status, words):
    proc, seconds = _run_job(tmp_path, mode)
    out = proc.stdout + proc.stderr
    print("%s: exit %d after %.1f s" % (mode, proc.returncode, seconds))
    assert proc.returncode == status, out[-3000:]
    assert words in out, out[-3000:]
    assert "rank 0 done" not in out  # rank 0 never got past the all-reduce rank 1 left
    assert seconds < 120, "the job took %.0f s to end" % seconds


@needs_mpirun
def test_a_segfault_on_one_rank_ends_the_job_with_the_signal_named(tmp_path):
    proc, seconds = _run_job(tmp_path, "segfault")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "rank 1" in out and "signal 11" in out, out[-3000:]
    assert "Fatal Python error: Segmentation fault" in out  # the Python stacks of the crashed rank
    assert seconds < 120


@needs_mpirun
@pytest.mark.parametrize("mode, status", [("ok", 0), ("coordinated", 143)])
def test_exits_every_rank_takes_together_finalize_normally(tmp_path, mode, status):
    proc, _ = _run_job(tmp_path, mode)
    out = proc.stdout + proc.stderr
    assert proc.returncode == status, out[-3000:]
    assert "failed" not in out, out[-3000:]
    if mode == "ok":
        assert "rank 0 done 2" in out and "rank 1 done 2" in out
