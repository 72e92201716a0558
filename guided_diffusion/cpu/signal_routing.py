"""
Signal handlers kept off the threads that compute: the main thread and OpenMP's worker threads.

oneDNN's JIT-generated f32 GEMM kernels (AVX2 and AVX-512, in every release before 3.11.2; Debian 12 ships 2.6.3)
point the stack register at a heap workspace while they run (uxlfoundation/oneDNN#4845). A signal handler that
runs on such a thread pushes its frame onto that heap memory: the process later aborts ("corrupted size vs.
prev_size while consolidating") or computes with overwritten values. Training installs handlers for SIGTERM and
SIGINT (the run guard) and Jittor installs its own for SIGCHLD and SIGQUIT, and every matmul and most of our fused
kernels call that GEMM, so a scheduler's SIGTERM could crash the run it meant to stop.

`signals_off_compute_threads` blocks those signals in the main thread and in every OpenMP worker while a loop runs,
and starts one thread that does nothing but wait: the kernel delivers the signals to it (or to another thread that
runs no GEMM, such as MPI's), Python's C-level handler records them there, and the Python-level handler runs on the
main thread at its next bytecode as usual. A process forked meanwhile gets the signals unblocked again.
"""

import contextlib
import os
import signal
import threading
from typing import Iterator, List, Sequence, Tuple

import jittor as jt
import numpy as np

# The signals with handlers in a training process: the run guard's (SIGTERM, SIGINT) and Jittor's (SIGCHLD, SIGQUIT).
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGQUIT)

# Input: int32 [how, count, signal numbers...]. Every OpenMP thread but the calling one (thread 0, whose mask Python
# sets) applies pthread_sigmask(how, signals). The output is unused (jt.code needs one).
_WORKER_MASK_HEADER = "#include <signal.h>\n#include <omp.h>\n"
_WORKER_MASK_SRC = r"""
    sigset_t set;
    sigemptyset(&set);
    const int how = in0_p[0], count = in0_p[1];
    for (int i = 0; i < count; i++) sigaddset(&set, in0_p[2 + i]);
    #pragma omp parallel
    {
        if (omp_get_thread_num() != 0) pthread_sigmask(how, &set, nullptr);
    }
    out0_p[0] = 0;
"""

# The signals each entered block added to the main thread's mask (innermost last): what a forked child unblocks.
_blocked_by_entered_blocks: List[Tuple[int, ...]] = []


def _set_worker_mask(how: int, signums: Sequence[int]) -> None:
    """Apply pthread_sigmask(how, signums) on every OpenMP worker thread."""
    spec = jt.array(np.array([int(how), len(signums)] + [int(s) for s in signums], dtype=np.int32))
    with jt.flag_scope(use_cuda=0):
        jt.code((1,), "int32", [spec], cpu_header=_WORKER_MASK_HEADER, cpu_src=_WORKER_MASK_SRC).sync()


def _unblock_in_forked_child() -> None:
    for added in _blocked_by_entered_blocks:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, added)


os.register_at_fork(after_in_child=_unblock_in_forked_child)


@contextlib.contextmanager
def signals_off_compute_threads(signums: Sequence[int] = HANDLED_SIGNALS) -> Iterator[None]:
    """Within the block, `signums` reach only a thread that runs no GEMM, never the main thread or OpenMP's workers.

    Exists because a handler running on a thread inside oneDNN's JIT GEMM corrupts the heap (module docstring). Only
    the main thread may enter it (signal masks of Python's main thread are set here); elsewhere it does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signums = tuple(signums)
    wake = threading.Event()
    # Started before the main thread blocks anything, so this thread inherits an open mask and takes the signals.
    receiver = threading.Thread(target=wake.wait, name="signal-receiver", daemon=True)
    receiver.start()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signums)
    added = tuple(s for s in signums if s not in previous)
    _blocked_by_entered_blocks.append(added)
    try:
        _set_worker_mask(signal.SIG_BLOCK, signums)
        yield
    finally:
        try:
            _set_worker_mask(signal.SIG_UNBLOCK, added)
        finally:
            _blocked_by_entered_blocks.pop()
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
            wake.set()
            receiver.join()
