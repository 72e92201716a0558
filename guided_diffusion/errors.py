"""
User-facing errors and the wrapper that turns them into a clear message and a non-zero exit.
"""

import sys
from typing import Callable


class UserError(Exception):
    """A problem the user can fix (bad flag, missing or mismatched file, no network); the message says how."""


class CheckpointError(UserError):
    """A checkpoint is missing, corrupt, or does not fit the model built from the flags."""


class DataError(UserError):
    """A dataset directory or file cannot be used (missing, empty, unreadable)."""


class DownloadError(UserError):
    """A file could not be downloaded; the message names the URL and where to place the file by hand."""


def run_cli(main: Callable[[], None]) -> None:
    """Run an entry script's main(), reporting UserErrors as `error: ...` with exit status 2."""
    try:
        main()
    except UserError as exc:
        sys.stderr.write("error: %s\n" % exc)
        sys.stderr.flush()
        raise SystemExit(2)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        raise SystemExit(130)
