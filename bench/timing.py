"""Shared timing helpers for the benchmark scripts: first call (compile) apart from the steady state."""

import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict

import guided_diffusion  # noqa: F401  (Jittor's environment first)
import jittor as jt


def sync(value=None) -> None:
    """Wait until Jittor has finished every queued computation (or the given Var)."""
    if value is not None and hasattr(value, "sync"):
        value.sync()
    jt.sync_all(True)


def measure(fn: Callable[[], object], repeats: int = 3) -> Dict[str, float]:
    """Time `fn` once cold (includes kernel compilation) and `repeats` more times warm (median).

    Wall and process CPU time (all threads) are both reported: the machine is shared, so wall time alone says
    little; `compile_s` is the first call's excess over the steady median (Jittor's kernel compilation and cache
    loading).
    """
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    sync(fn())
    first = time.perf_counter() - t0
    times, cpus = [], []
    with _StderrCapture() as captured:
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            sync(fn())
            times.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
    median = statistics.median(times)
    return {"first_call_s": round(first, 4), "compile_s": round(max(first - median, 0.0), 4),
            "steady_median_s": round(median, 4), "steady_min_s": round(min(times), 4),
            "steady_cpu_median_s": round(statistics.median(cpus), 4), "repeats": repeats,
            "compiles_in_steady": captured.text.count("Compiling Operators"),
            "load1_before": round(load_before, 2), "load1_after": round(os.getloadavg()[0], 2)}


class _StderrCapture:
    """Collects what is written to file descriptor 2 (Jittor's "Compiling Operators" lines come from C++)."""

    def __enter__(self):
        sys.stderr.flush()
        self._file = tempfile.TemporaryFile(mode="w+b")
        self._saved = os.dup(2)
        os.dup2(self._file.fileno(), 2)
        self.text = ""
        return self

    def __exit__(self, *exc):
        sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._file.seek(0)
        self.text = self._file.read().decode("utf-8", "replace")
        self._file.close()
        sys.stderr.write(self.text)
        return False


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far, in GiB."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 3)


def emit(record: Dict) -> None:
    """Print one JSON line with the machine context added."""
    record = dict(record)
    record.setdefault("device", "cuda" if jt.flags.use_cuda else "cpu")
    record.setdefault("machine", platform.machine())
    record.setdefault("omp_threads", os.environ.get("OMP_NUM_THREADS", "default(%d)" % (os.cpu_count() or 0)))
    record["peak_rss_gib"] = peak_rss_gib()
    print(json.dumps(record), flush=True)
    sys.stdout.flush()
