"""
Values that enter a Jittor graph as runtime inputs (timesteps, step weights), never as constants baked into kernels.
"""

from typing import Sequence

import jittor as jt
import numpy as np


def runtime_var(values, dtype=np.float32) -> jt.Var:
    """A Var holding values that Jittor keeps as a runtime input, never as a constant folded into a kernel.

    Jittor bakes a one-element array into the generated kernel when its value is 0, 1 or 2 (or +-1.0, +-2.0);
    a batch-1 loop would then compile new kernels whenever a timestep (or weight) takes such a value. Building
    two elements and slicing one keeps it a runtime input.
    """
    values = np.ascontiguousarray(values, dtype=dtype)
    if values.size == 1:
        flat = values.reshape(-1)
        return jt.array(np.concatenate([flat, flat]))[:1].reshape(values.shape)
    return jt.array(values)


def weighted_sum(weights, terms: Sequence[jt.Var]) -> jt.Var:
    """sum_j weights[j] * terms[j], the (float64 numpy) weights entering the graph as runtime Vars."""
    w = runtime_var(weights)
    shape = [1] * len(terms[0].shape)
    out = w[0].reshape(shape) * terms[0]
    for j in range(1, len(terms)):
        out = out + w[j].reshape(shape) * terms[j]
    return out
