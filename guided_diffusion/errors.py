"""
User-facing errors and the wrapper that turns them into a clear message and a non-zero exit.
"""

import sys
from typing import Any, Callable, List, Optional


class UserError(Exception):
    """A problem the user can fix (bad flag, missing or mismatched file, no network); the message says how."""


class CheckpointError(UserError):
    """A checkpoint is missing, corrupt, or does not fit the model built from the flags."""


class DataError(UserError):
    """A dataset directory or file cannot be used (missing, empty, unreadable)."""


class DownloadError(UserError):
    """A file could not be downloaded; the message names the URL and where to place the file by hand."""


class InputCheck:
    """Collects every problem with a command's flags and files, so that one error names them all before any heavy
    work starts (instead of one at a time, minutes apart).

    ``check(fn, *args)`` runs a validating function and records the UserError it raises (returning None), or returns
    its result; ``check.problem(msg)`` records a problem directly; ``check.done()`` raises one UserError listing all.
    """

    def __init__(self) -> None:
        self.problems: List[str] = []

    def __call__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Optional[Any]:
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            self.problem(str(exc))
            return None

    def problem(self, message: str) -> None:
        """Record one problem (a message that says what is wrong and how to fix it)."""
        if message not in self.problems:
            self.problems.append(message)

    def done(self) -> None:
        """Raise one UserError naming every recorded problem (nothing when there is none)."""
        if len(self.problems) == 1:
            raise UserError(self.problems[0])
        if self.problems:
            raise UserError("%d problems with this command:\n" % len(self.problems)
                            + "\n".join("  %d. %s" % (i + 1, p) for i, p in enumerate(self.problems)))


def run_cli(main: Callable[[], None]) -> None:
    """Run an entry script's main(), reporting UserErrors as `error: ...` with exit status 2.

    Under mpirun a rank that fails with a UserError or an exit status other than the coordinated ones ends every
    rank of the job with one line naming it (`job_failure`); other exceptions and crashes reach the handlers the
    package installs at import (`job_failure.end_job_when_this_rank_fails`).
    """
    from . import job_failure

    in_job = job_failure.in_multi_rank_job()
    try:
        main()
    except UserError as exc:
        if in_job:
            job_failure.fail_rank(str(exc), 2)
        sys.stderr.write("error: %s\n" % exc)
        sys.stderr.flush()
        raise SystemExit(2)
    except KeyboardInterrupt as exc:
        if in_job:
            job_failure.fail_rank("interrupted", 130)
        sys.stderr.write("interrupted\n")
        raise SystemExit(130)
    except SystemExit as exc:
        code = job_failure.exit_code_of(exc)
        if in_job and code not in job_failure.COORDINATED_EXIT_CODES:
            job_failure.fail_rank(exc.code if isinstance(exc.code, str) else "", code)
        raise
