"""
Seeds for Python's, numpy's and Jittor's random generators, derived from integer keys.

Jittor's CPU generator is a multiplicative congruential one (minstd): seeds 0 and 1 give the same stream, and
streams whose seeds differ by a constant are shifted copies of each other (u(s + d) = u(s) + u(d) mod 1). Seeds
are therefore never used as given or offset linearly: every stream (the initial weights, a training step on a
rank, a sampling batch) gets its seed by hashing its keys with numpy's SeedSequence.
"""

from typing import Iterable

import jittor as jt
import numpy as np

# Jittor's generator takes seeds in 1 .. 2**31 - 2 (0 behaves as 1).
_SEED_RANGE = 2 ** 31 - 2


def derive_seed(*keys: int) -> int:
    """A well-mixed seed in 1 .. 2**31 - 2 from any number of non-negative integer keys."""
    words = []
    for key in keys:
        key = int(key)
        if key < 0:
            raise ValueError("seed keys must be non-negative, got %d" % key)
        words.extend(_words(key))
        words.append(0x9E3779B9)  # separates keys, so (1, 23) and (12, 3) differ
    state = np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0]
    return int(state % _SEED_RANGE) + 1


def _words(key: int) -> Iterable[int]:
    """The 32-bit words of a non-negative integer (at least one)."""
    out = [key & 0xFFFFFFFF]
    key >>= 32
    while key:
        out.append(key & 0xFFFFFFFF)
        key >>= 32
    return out


def seed_all(*keys: int) -> None:
    """Seed Python, numpy and Jittor from derive_seed(*keys), the same on every MPI rank (put the rank in keys).

    Jittor draws random numbers when an op executes, not when it is created, so pending work (e.g. the random
    initialisation of a model whose weights were then loaded) is executed first: it must not consume the new
    stream.
    """
    jt.sync_all()
    jt.set_global_seed(derive_seed(*keys), different_seed_for_mpi=False)
