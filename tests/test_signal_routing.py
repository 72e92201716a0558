"""Signals reach no thread that runs oneDNN's GEMM while `signals_off_compute_threads` is entered."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import jittor as jt
import numpy as np

from guided_diffusion.cpu import HANDLED_SIGNALS, signals_off_compute_threads
from guided_diffusion.cpu.signal_routing import _WORKER_MASK_HEADER

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each OpenMP thread reports whether SIGTERM is blocked on it (1) or not (0).
_REPORT_SRC = r"""
    const int n = omp_get_max_threads();
    for (int i = 0; i < out0_shape0; i++) out0_p[i] = -1;
    #pragma omp parallel num_threads(n)
    {
        sigset_t now;
        pthread_sigmask(SIG_BLOCK, nullptr, &now);
        out0_p[omp_get_thread_num()] = sigismember(&now, SIGTERM);
    }
"""


def _sigterm_blocked_per_openmp_thread() -> list:
    with jt.flag_scope(use_cuda=0):
        out = jt.code((64,), "int32", [jt.array(np.zeros(1, np.int32))], cpu_header=_WORKER_MASK_HEADER,
                      cpu_src=_REPORT_SRC).numpy()
    return [int(v) for v in out if v >= 0]


def _blocked_in_thread(native_id: int, signum: int) -> bool:
    with open("/proc/self/task/%d/status" % native_id) as f:
        mask = next(int(line.split()[1], 16) for line in f if line.startswith("SigBlk:"))
    return bool(mask >> (signum - 1) & 1)


def test_inside_the_block_the_main_and_openmp_threads_block_the_handled_signals_and_one_thread_takes_them():
    before = _sigterm_blocked_per_openmp_thread()
    assert before and all(v == 0 for v in before), before
    with signals_off_compute_threads():
        assert all(s in signal.pthread_sigmask(signal.SIG_BLOCK, []) for s in HANDLED_SIGNALS)
        per_thread = _sigterm_blocked_per_openmp_thread()
        assert per_thread and all(v == 1 for v in per_thread), per_thread
        receivers = [t for t in threading.enumerate() if t.name == "signal-receiver"]
        assert len(receivers) == 1
        assert not _blocked_in_thread(receivers[0].native_id, signal.SIGTERM)
    assert not any(s in signal.pthread_sigmask(signal.SIG_BLOCK, []) for s in HANDLED_SIGNALS)
    assert all(v == 0 for v in _sigterm_blocked_per_openmp_thread())
    assert not [t for t in threading.enumerate() if t.name == "signal-receiver"]


def test_a_process_forked_inside_the_block_has_the_signals_unblocked():
    with signals_off_compute_threads():
        pid = os.fork()
        if pid == 0:  # the child: exit 0 when none of the signals is blocked
            os._exit(int(any(s in signal.pthread_sigmask(signal.SIG_BLOCK, []) for s in HANDLED_SIGNALS)))
        _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def test_a_handler_still_runs_for_a_signal_sent_inside_the_block():
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        with signals_off_compute_threads():
            os.kill(os.getpid(), signal.SIGTERM)
            deadline = time.time() + 10
            while not seen and time.time() < deadline:
                time.sleep(0.01)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert seen == [signal.SIGTERM]


# Matmuls (oneDNN sgemm) in a loop with a Python SIGTERM handler installed, inside the block; exits 0 if it survives.
_STORM_CHILD = textwrap.dedent("""
    import signal, sys, time
    sys.path.insert(0, %(repo)r)
    import guided_diffusion
    import jittor as jt
    import numpy as np
    from guided_diffusion.cpu import signals_off_compute_threads
    handled = [0]
    signal.signal(signal.SIGTERM, lambda s, f: handled.__setitem__(0, handled[0] + 1))
    rng = np.random.RandomState(0)
    shapes = [(256, 8, 256), (256, 256, 8), (64, 64, 64), (512, 32, 512), (100, 300, 200)]
    mats = [(jt.array(rng.rand(m, k).astype("float32")), jt.array(rng.rand(k, n).astype("float32")))
            for m, k, n in shapes]
    with signals_off_compute_threads():
        print("ready", flush=True)
        start = time.time()
        while time.time() - start < %(seconds)r:
            outs = [jt.nn.matmul(a, b) for a, b in mats]
            jt.sync(outs)
            [o.numpy() for o in outs]
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("survived; handled", handled[0], flush=True)
""")


def test_a_storm_of_sigterms_during_gemm_kernels_leaves_the_heap_intact():
    # Without the routing this child aborts ("corrupted size vs. prev_size") within a few thousand signals.
    child = subprocess.Popen([sys.executable, "-c", _STORM_CHILD % {"repo": REPO, "seconds": 4.0}],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    sent = 0
    while child.poll() is None:
        os.kill(child.pid, signal.SIGTERM)
        sent += 1
        time.sleep(0.0005)
    out, err = child.communicate()
    assert child.returncode == 0, (child.returncode, sent, err[-2000:])
    handled = int(out.split("handled")[1])
    assert sent > 1000 and handled > 0, (sent, handled)
