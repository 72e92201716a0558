"""Helpers for the end-to-end training tests: stopping a run with a signal, and comparing checkpoint weights."""

import os
import re
import signal
import subprocess
import sys
import time
from typing import List, Mapping, Optional, Sequence

import numpy as np

from guided_diffusion.checkpoint import load_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def training_env(logdir=None, **extra) -> dict:
    """The environment of a training subprocess: OPENAI_LOGDIR (when given), no integration-test shortcut."""
    env = dict(os.environ, **extra)
    if logdir is not None:
        env["OPENAI_LOGDIR"] = str(logdir)
    env.pop("DIFFUSION_TRAINING_TEST", None)
    return env


def start(cmd: Sequence, env: Mapping[str, str], cwd=REPO) -> subprocess.Popen:
    """Start a training command (a list; str() is applied) with its output captured."""
    return subprocess.Popen([str(c) for c in cmd], cwd=str(cwd), env=dict(env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def script_cmd(script: str, args: Sequence) -> List[str]:
    """[python, REPO/script, *args]"""
    return [sys.executable, os.path.join(REPO, script)] + [str(a) for a in args]


def wait_for(path, pattern: str, proc: subprocess.Popen, timeout: float = 300.0) -> re.Match:
    """Poll a (log) file until `pattern` appears in it; fail if the process ends first."""
    regex = re.compile(pattern)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(str(path)):
            with open(str(path)) as f:
                m = regex.search(f.read())
            if m:
                return m
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError("the run ended (exit %s) before %r appeared in %s\n%s" % (
                proc.returncode, pattern, path, err[-3000:]))
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("%r did not appear in %s within %gs" % (pattern, path, timeout))


def stop_with(proc: subprocess.Popen, signum: int = signal.SIGTERM, pids: Optional[Sequence[int]] = None,
              twice: bool = False, timeout: float = 300.0) -> subprocess.CompletedProcess:
    """Send `signum` (to `pids`, default the process; twice in a row when asked) and wait for the exit."""
    for pid in pids or [proc.pid]:
        os.kill(pid, signum)
    if twice:
        time.sleep(0.02)
        for pid in pids or [proc.pid]:
            os.kill(pid, signum)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def finish(proc: subprocess.Popen, timeout: float = 600.0) -> subprocess.CompletedProcess:
    """Wait for a process and return its result."""
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def assert_exit(result: subprocess.CompletedProcess, code: int) -> None:
    """The process ended with `code`; otherwise show its output."""
    assert result.returncode == code, "exit %d (expected %d)\n--- stdout\n%s\n--- stderr\n%s" % (
        result.returncode, code, result.stdout[-3000:], result.stderr[-5000:])


def worst_relative_difference(a_path, b_path, key: Optional[str] = None) -> float:
    """max |a - b| / max(|a|) over the tensors of two checkpoints (inside `key`, e.g. "model", when given)."""
    a, b = load_file(str(a_path)), load_file(str(b_path))
    if key:
        a, b = a[key], b[key]
    assert list(a) == list(b)
    worst = 0.0
    for k in a:
        x, y = np.asarray(a[k], np.float64), np.asarray(b[k], np.float64)
        worst = max(worst, float(np.abs(x - y).max() / max(np.abs(x).max(), 1e-30)))
    return worst


def checkpoint_names(folder) -> List[str]:
    """The .pt files of a folder, sorted."""
    return sorted(f for f in os.listdir(str(folder)) if f.endswith(".pt"))


def stop_and_continue(cmd_for, env_for, *, signum: int, run_dir, full_dir, log_file: str, logged_step: str,
                      final_files: Sequence[str], set_files, cwd=REPO, key=None, twice: bool = False,
                      targets=None) -> dict:
    """The signal test of a training script, in four parts.

    1. The command (cmd_for(dir), in the environment env_for(dir)) runs uninterrupted into full_dir while a
       second copy into run_dir is stopped with `signum` once its log shows `logged_step` (a regex).
    2. The stopped run exits with 128 + signum and its log names the step it stopped after; set_files(step) lists
       the files of the checkpoint set it must have written there (and nothing later).
    3. The same command, rerun, continues from that set to the end.
    4. Its final_files equal the uninterrupted run's (the worst relative difference is returned, with the step).

    targets(proc) chooses the processes that receive the signal (default: the command's own process).
    """
    full = start(cmd_for(full_dir), env_for(full_dir), cwd)
    run = start(cmd_for(run_dir), env_for(run_dir), cwd)
    try:
        wait_for(os.path.join(str(run_dir), log_file), logged_step, run)
        stopped = stop_with(run, signum, pids=targets(run) if targets else None, twice=twice)
    finally:
        if run.poll() is None:
            run.kill()
    assert_exit(stopped, 128 + signum)
    with open(os.path.join(str(run_dir), log_file)) as f:
        log = f.read()
    m = re.search(r"stopped by %s after step (\d+)" % signal.Signals(signum).name, log)
    assert m, log[-3000:]
    step = int(m.group(1))
    for name in set_files(step):
        assert os.path.isfile(os.path.join(str(run_dir), name)), (name, os.listdir(str(run_dir)))
    assert_exit(finish(full), 0)
    rerun = finish(start(cmd_for(run_dir), env_for(run_dir), cwd))
    assert_exit(rerun, 0)
    worst = max(worst_relative_difference(os.path.join(str(full_dir), n), os.path.join(str(run_dir), n), key)
                for n in final_files)
    return {"step": step, "worst_relative_difference": worst, "log": log, "rerun": rerun}


def mpi_rank_pids(proc: subprocess.Popen, timeout: float = 60.0) -> dict:
    """{rank: pid} of the ranks mpirun (proc) started on this machine, read from their environments."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        ranks = {}
        for pid in _descendants(proc.pid):
            try:
                with open("/proc/%d/environ" % pid, "rb") as f:
                    env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
            except OSError:
                continue
            if b"OMPI_COMM_WORLD_RANK" in env:  # the first (topmost) process of a rank, not its children
                ranks.setdefault(int(env[b"OMPI_COMM_WORLD_RANK"]), pid)
        if ranks:
            return ranks
        time.sleep(0.1)
    raise AssertionError("no MPI rank processes found under pid %d" % proc.pid)


def _descendants(pid: int) -> List[int]:
    out = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout.split()
    children = {}
    for child, parent in zip(out[0::2], out[1::2]):
        children.setdefault(int(parent), []).append(int(child))
    found = [pid]  # breadth first: parents before their children
    for parent in found:
        found.extend(children.get(parent, []))
    return found[1:]


def signal_rank_once_logged(job: subprocess.Popen, log_path, pattern: str, rank: int, signum: int,
                            timeout: float = 900.0) -> dict:
    """Once `pattern` appears in `log_path`, send `signum` to MPI rank `rank` of the mpirun `job` and wait for the
    job to end: {"returncode", "seconds" (from the signal to the end), "output"}."""
    try:
        wait_for(log_path, pattern, job, timeout=timeout)
        os.kill(mpi_rank_pids(job)[rank], signum)
        signalled = time.time()
        out, err = job.communicate(timeout=120)
        seconds = time.time() - signalled
    finally:
        if job.poll() is None:
            job.terminate()
            job.communicate()
    return {"returncode": job.returncode, "seconds": seconds, "output": out + err}
