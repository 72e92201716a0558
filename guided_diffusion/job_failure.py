"""
A rank that fails ends the whole MPI job, instead of leaving the other ranks waiting in a collective forever.

Why this is needed: Jittor calls ``MPI_Finalize`` from a C++ static destructor when a process exits. A rank that
exits early, by a Python exception, a `UserError`, or Jittor turning a SIGSEGV into ``exit(1)``, therefore waits in
``MPI_Finalize`` for ranks that are themselves waiting for it in an all-reduce: mpirun sees no rank end and the job
hangs until a scheduler's wall-time limit. OpenMPI (and MPICH's Hydra) end every rank of a job as soon as one rank
exits without finalizing MPI, or dies by a signal. So, under mpirun, a rank that fails:

* writes one line naming itself and its error (``error: rank 1 of 2 failed: ...``), then leaves with ``os._exit``,
  which skips the static destructors and with them ``MPI_Finalize``; mpirun then stops the other ranks;
* on SIGSEGV, SIGBUS, SIGFPE, SIGILL or SIGABRT, dumps the Python stacks (faulthandler) and dies by the signal
  (Jittor's own handler, replaced here, would call ``exit(1)`` and finalize).

Exits that every rank takes together (0, and the run guard's agreed stop after SIGTERM/SIGINT: 143/130) finalize
normally. A process outside mpirun is not affected.
"""

import faulthandler
import os
import signal
import sys
from typing import Tuple

# Exit statuses that every rank reaches together (the run guard stops all ranks at the same step after a signal).
COORDINATED_EXIT_CODES = (0, 128 + signal.SIGINT, 128 + signal.SIGTERM)
FATAL_SIGNALS = (signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL, signal.SIGABRT)

_RANK_VARIABLES = (("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"), ("PMI_RANK", "PMI_SIZE"),
                   ("PMIX_RANK", "PMI_SIZE"))


def job_rank_and_size() -> Tuple[int, int]:
    """(rank, number of ranks) of the MPI job this process belongs to, read from mpirun's environment; (0, 1)
    outside mpirun. Needs no MPI library, so it works before Jittor is imported."""
    for rank_var, size_var in _RANK_VARIABLES:
        if rank_var in os.environ and size_var in os.environ:
            try:
                return int(os.environ[rank_var]), int(os.environ[size_var])
            except ValueError:
                continue
    return 0, 1


def in_multi_rank_job() -> bool:
    """True when this process is one of several ranks started by mpirun."""
    return job_rank_and_size()[1] > 1


def die_by_fatal_signals() -> None:
    """Make a crash (SIGSEGV, ...) kill this rank by its signal, after dumping the Python stacks to stderr.

    Jittor's handler turns these signals into ``exit(1)``, which finalizes MPI and waits for the other ranks.
    Called after Jittor is imported (Jittor installs its handler at import).
    """
    for signum in FATAL_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)
    faulthandler.enable(file=sys.stderr, all_threads=True)


def end_job_when_this_rank_fails() -> None:
    """Under mpirun, make every way this rank can fail end the job: crashes by signal (`die_by_fatal_signals`) and
    uncaught exceptions anywhere (a sys.excepthook that reports and leaves without finalizing MPI); `errors.run_cli`
    adds input errors and non-zero exits. Called when the package is imported, after Jittor."""
    if not in_multi_rank_job():
        return
    die_by_fatal_signals()
    previous = sys.excepthook

    def report_and_end_job(exc_type, exc, tb):
        if issubclass(exc_type, SystemExit):
            return previous(exc_type, exc, tb)
        previous(exc_type, exc, tb)
        fail_rank(describe_exception(exc), 1)

    sys.excepthook = report_and_end_job


def fail_rank(message: str, code: int) -> None:
    """Write `message` as this rank's one failure line and end the process at once, without finalizing MPI, so
    that mpirun stops every other rank of the job."""
    rank, size = job_rank_and_size()
    code = int(code) if code else 1
    what = ("%s (exit status %d)" % (message.strip(), code)) if message.strip() else "exit status %d" % code
    line = "error: rank %d of %d failed: %s; ending every rank of the job" % (rank, size, what)
    try:
        sys.stdout.flush()
    except Exception:  # a closed or broken stdout must not keep the rank alive
        pass
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except Exception:
        pass
    os._exit(code)


def exit_code_of(exc: SystemExit) -> int:
    """The status a SystemExit ends the process with (a message prints and means 1, as Python does)."""
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    return 1


def describe_exception(exc: BaseException) -> str:
    """A one-line description of an exception: its type and the first line of its message."""
    text = str(exc).strip().splitlines()
    return "%s: %s" % (type(exc).__name__, text[0]) if text else type(exc).__name__
