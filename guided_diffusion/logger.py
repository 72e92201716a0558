"""
Logger for training runs: key/value diagnostics and messages written to stdout, log.txt and progress.csv.

The API follows the reference's logger (itself taken from OpenAI baselines). Only the output formats this project
uses are kept: "stdout", "log", "csv" and "json" (TensorBoard is dropped).
"""

import datetime
import json
import os
import os.path as osp
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Dict, Iterable, List, Optional

DEBUG = 10
INFO = 20
WARN = 30
ERROR = 40
DISABLED = 50


class KVWriter(object):
    """Interface of writers that receive a dict of diagnostics at every dumpkvs()."""

    def writekvs(self, kvs: Dict[str, Any]) -> None:
        raise NotImplementedError


class SeqWriter(object):
    """Interface of writers that receive free-form messages from log()."""

    def writeseq(self, seq: Iterable[Any]) -> None:
        raise NotImplementedError


class HumanOutputFormat(KVWriter, SeqWriter):
    """An ASCII table of the key/values (and plain message lines) for a terminal or log.txt."""

    def __init__(self, filename_or_file):
        if isinstance(filename_or_file, str):
            self.file = open(filename_or_file, "at")  # a continued run appends to its log
            self.own_file = True
        else:
            assert hasattr(filename_or_file, "read") or hasattr(filename_or_file, "write"), (
                "expected file or str, got %s" % filename_or_file
            )
            self.file = filename_or_file
            self.own_file = False

    def writekvs(self, kvs: Dict[str, Any]) -> None:
        key2str = {}
        for (key, val) in sorted(kvs.items()):
            if hasattr(val, "__float__"):
                valstr = "%-8.3g" % val
            else:
                valstr = str(val)
            key2str[self._truncate(key)] = self._truncate(valstr)

        if len(key2str) == 0:
            print("WARNING: tried to write empty key-value dict")
            return
        keywidth = max(map(len, key2str.keys()))
        valwidth = max(map(len, key2str.values()))

        dashes = "-" * (keywidth + valwidth + 7)
        lines = [dashes]
        for (key, val) in sorted(key2str.items(), key=lambda kv: kv[0].lower()):
            lines.append("| %s%s | %s%s |" % (key, " " * (keywidth - len(key)), val, " " * (valwidth - len(val))))
        lines.append(dashes)
        self.file.write("\n".join(lines) + "\n")
        self.file.flush()

    def _truncate(self, s: str) -> str:
        maxlen = 30
        return s[: maxlen - 3] + "..." if len(s) > maxlen else s

    def writeseq(self, seq: Iterable[Any]) -> None:
        seq = list(seq)
        for (i, elem) in enumerate(seq):
            self.file.write(str(elem))
            if i < len(seq) - 1:
                self.file.write(" ")
        self.file.write("\n")
        self.file.flush()

    def close(self) -> None:
        if self.own_file:
            self.file.close()


class JSONOutputFormat(KVWriter):
    """One JSON object per dumpkvs() (progress.json)."""

    def __init__(self, filename: str):
        self.file = open(filename, "at")  # a continued run appends to its rows

    def writekvs(self, kvs: Dict[str, Any]) -> None:
        for k, v in sorted(kvs.items()):
            if hasattr(v, "dtype"):
                kvs[k] = float(v)
        self.file.write(json.dumps(kvs) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class CSVOutputFormat(KVWriter):
    """progress.csv: one row per dumpkvs(); the header grows (and old rows are padded) when new keys appear.

    An existing file (a continued run) keeps its rows: new rows are appended under its header.
    """

    def __init__(self, filename: str):
        self.sep = ","
        self.keys: List[str] = []
        if os.path.isfile(filename):
            self.file = open(filename, "r+t")
            header = self.file.readline().rstrip("\n")
            self.keys = header.split(self.sep) if header else []
            self.file.seek(0, os.SEEK_END)
        else:
            self.file = open(filename, "w+t")

    def writekvs(self, kvs: Dict[str, Any]) -> None:
        extra_keys = list(kvs.keys() - self.keys)
        extra_keys.sort()
        if extra_keys:
            self.keys.extend(extra_keys)
            self.file.seek(0)
            lines = self.file.readlines()
            self.file.seek(0)
            for (i, k) in enumerate(self.keys):
                if i > 0:
                    self.file.write(",")
                self.file.write(k)
            self.file.write("\n")
            for line in lines[1:]:
                self.file.write(line[:-1])
                self.file.write(self.sep * len(extra_keys))
                self.file.write("\n")
        for (i, k) in enumerate(self.keys):
            if i > 0:
                self.file.write(",")
            v = kvs.get(k)
            if v is not None:
                self.file.write(str(v))
        self.file.write("\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def make_output_format(format: str, ev_dir: str, log_suffix: str = "") -> KVWriter:
    """Build the writer named by `format` ("stdout", "log", "json" or "csv") inside ev_dir."""
    os.makedirs(ev_dir, exist_ok=True)
    if format == "stdout":
        return HumanOutputFormat(sys.stdout)
    elif format == "log":
        return HumanOutputFormat(osp.join(ev_dir, "log%s.txt" % log_suffix))
    elif format == "json":
        return JSONOutputFormat(osp.join(ev_dir, "progress%s.json" % log_suffix))
    elif format == "csv":
        return CSVOutputFormat(osp.join(ev_dir, "progress%s.csv" % log_suffix))
    else:
        raise ValueError("Unknown log format %r (use stdout, log, json or csv)" % (format,))


# ================================================================
# API
# ================================================================


def logkv(key: str, val: Any) -> None:
    """Log a value of some diagnostic; called once per iteration per key (the last value wins)."""
    get_current().logkv(key, val)


def logkv_mean(key: str, val: Any) -> None:
    """Like logkv, but averages every value logged under `key` until the next dumpkvs()."""
    get_current().logkv_mean(key, val)


def logkvs(d: Dict[str, Any]) -> None:
    """Log a dictionary of key-value pairs."""
    for (k, v) in d.items():
        logkv(k, v)


def dumpkvs() -> Dict[str, Any]:
    """Write all of the diagnostics from the current iteration and clear them."""
    return get_current().dumpkvs()


def getkvs() -> Dict[str, Any]:
    """The diagnostics logged since the last dumpkvs()."""
    return get_current().name2val


def log(*args, level: int = INFO) -> None:
    """Write the sequence of args, separated by spaces, to every message writer (stdout, log.txt)."""
    get_current().log(*args, level=level)


def debug(*args) -> None:
    """log() at level DEBUG."""
    log(*args, level=DEBUG)


def info(*args) -> None:
    """log() at level INFO."""
    log(*args, level=INFO)


def warn(*args) -> None:
    """log() at level WARN."""
    log(*args, level=WARN)


def error(*args) -> None:
    """log() at level ERROR."""
    log(*args, level=ERROR)


def set_level(level: int) -> None:
    """Set the logging threshold on the current logger."""
    get_current().set_level(level)


def set_comm(comm) -> None:
    """Set the communicator used to average diagnostics across ranks (unsupported here; see Logger)."""
    get_current().set_comm(comm)


def get_dir() -> str:
    """The directory log files (and training checkpoints) are written to."""
    return get_current().get_dir()


record_tabular = logkv
dump_tabular = dumpkvs


@contextmanager
def profile_kv(scopename: str):
    """Add the wall time spent in the block to the diagnostic "wait_<scopename>"."""
    logkey = "wait_" + scopename
    tstart = time.time()
    try:
        yield
    finally:
        get_current().name2val[logkey] += time.time() - tstart


def profile(n: str):
    """Decorator that times every call of the function as profile_kv(n)."""

    def decorator_with_name(func):
        def func_wrapper(*args, **kwargs):
            with profile_kv(n):
                return func(*args, **kwargs)

        return func_wrapper

    return decorator_with_name


# ================================================================
# Backend
# ================================================================


def get_current() -> "Logger":
    """The active Logger, configured with the defaults on first use."""
    if Logger.CURRENT is None:
        _configure_default_logger()
    return Logger.CURRENT


class Logger(object):
    """Holds the diagnostics of the current iteration and the writers they go to."""

    DEFAULT = None  # A logger with no output files; used by the module functions before configure()
    CURRENT = None  # Current logger being used by the free functions above

    def __init__(self, dir: Optional[str], output_formats: List[KVWriter], comm=None):
        self.name2val = defaultdict(float)  # values this iteration
        self.name2cnt = defaultdict(int)
        self.level = INFO
        self.dir = dir
        self.output_formats = output_formats
        if comm is not None:
            # The reference averages diagnostics over an mpi4py communicator; this port has no mpi4py and the
            # training scripts never pass one (each rank logs its own values, as in the reference scripts).
            raise NotImplementedError("logging with an MPI communicator is not supported; pass comm=None")
        self.comm = comm

    def logkv(self, key: str, val: Any) -> None:
        self.name2val[key] = val

    def logkv_mean(self, key: str, val: Any) -> None:
        oldval, cnt = self.name2val[key], self.name2cnt[key]
        self.name2val[key] = oldval * cnt / (cnt + 1) + val / (cnt + 1)
        self.name2cnt[key] = cnt + 1

    def dumpkvs(self) -> Dict[str, Any]:
        d = dict(self.name2val)
        out = d.copy()
        for fmt in self.output_formats:
            if isinstance(fmt, KVWriter):
                fmt.writekvs(d)
        self.name2val.clear()
        self.name2cnt.clear()
        return out

    def log(self, *args, level: int = INFO) -> None:
        if self.level <= level:
            self._do_log(args)

    def set_level(self, level: int) -> None:
        self.level = level

    def set_comm(self, comm) -> None:
        if comm is not None:
            raise NotImplementedError("logging with an MPI communicator is not supported; pass comm=None")
        self.comm = comm

    def get_dir(self) -> Optional[str]:
        return self.dir

    def close(self) -> None:
        for fmt in self.output_formats:
            fmt.close()

    def _do_log(self, args) -> None:
        for fmt in self.output_formats:
            if isinstance(fmt, SeqWriter):
                fmt.writeseq(map(str, args))


def get_rank_without_mpi_import() -> int:
    """This process's MPI rank read from the launcher's environment (0 without MPI)."""
    for varname in ["PMI_RANK", "OMPI_COMM_WORLD_RANK"]:
        if varname in os.environ:
            return int(os.environ[varname])
    return 0


def configure(dir: Optional[str] = None, format_strs: Optional[List[str]] = None, comm=None,
              log_suffix: str = "") -> None:
    """Start logging into `dir` ($OPENAI_LOGDIR, else a timestamped folder in the temp dir); rank 0 writes
    stdout, log.txt and progress.csv, other ranks log-rank00N.txt."""
    if dir is None:
        dir = os.getenv("OPENAI_LOGDIR")
    if dir is None:
        dir = osp.join(
            tempfile.gettempdir(),
            datetime.datetime.now().strftime("openai-%Y-%m-%d-%H-%M-%S-%f"),
        )
    assert isinstance(dir, str)
    dir = os.path.expanduser(dir)
    os.makedirs(os.path.expanduser(dir), exist_ok=True)

    rank = get_rank_without_mpi_import()
    if rank > 0:
        log_suffix = log_suffix + "-rank%03i" % rank

    if format_strs is None:
        if rank == 0:
            format_strs = os.getenv("OPENAI_LOG_FORMAT", "stdout,log,csv").split(",")
        else:
            format_strs = os.getenv("OPENAI_LOG_FORMAT_MPI", "log").split(",")
    format_strs = filter(None, format_strs)
    output_formats = [make_output_format(f, dir, log_suffix) for f in format_strs]

    if Logger.CURRENT is not None and Logger.CURRENT is not Logger.DEFAULT:
        Logger.CURRENT.close()
    Logger.CURRENT = Logger(dir=dir, output_formats=output_formats, comm=comm)
    if output_formats:
        log("Logging to %s" % dir)


def _configure_default_logger() -> None:
    configure()
    Logger.DEFAULT = Logger.CURRENT


def reset() -> None:
    """Close the current logger and go back to the default one."""
    if Logger.CURRENT is not Logger.DEFAULT:
        Logger.CURRENT.close()
        Logger.CURRENT = Logger.DEFAULT
        log("Reset logger")


@contextmanager
def scoped_configure(dir: Optional[str] = None, format_strs: Optional[List[str]] = None, comm=None):
    """Log into `dir` inside the block, then restore the previous logger."""
    prevlogger = Logger.CURRENT
    configure(dir=dir, format_strs=format_strs, comm=comm)
    try:
        yield
    finally:
        Logger.CURRENT.close()
        Logger.CURRENT = prevlogger
