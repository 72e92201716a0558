"""Shared timing helpers for the benchmark scripts: first call (compile) apart from the steady state."""

import json
import platform
import resource
import statistics
import sys
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
    """Time `fn` once cold (includes kernel compilation) and `repeats` more times warm (median)."""
    t0 = time.perf_counter()
    sync(fn())
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
    return {"first_call_s": round(first, 4), "steady_median_s": round(statistics.median(times), 4),
            "steady_min_s": round(min(times), 4), "repeats": repeats}


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far, in GiB."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 3)


def emit(record: Dict) -> None:
    """Print one JSON line with the machine context added."""
    record = dict(record)
    record.setdefault("device", "cuda" if jt.flags.use_cuda else "cpu")
    record.setdefault("machine", platform.machine())
    record["peak_rss_gib"] = peak_rss_gib()
    print(json.dumps(record), flush=True)
    sys.stdout.flush()
