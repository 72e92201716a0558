"""
The one place that decides whether an op takes a CPU fast path (a fused kernel of this wing) or the plain Jittor op.

Model code (guided_diffusion/nn.py, DiT/models.py) and the trainer ask `fast_cpu_path(...)` once per op; forward-only
kernels also need `inference_only()`, which gradient checkpointing switches off for the forward it will recompute
(`recomputation()`), so that a checkpointed forward and its recompute run the same kernels.
"""

import contextlib
from typing import Iterator, Optional

import jittor as jt

_recomputed_forwards = [0]


def fast_cpu_path(*vs: Optional[jt.Var]) -> bool:
    """True when the fused CPU kernels apply to these Vars: no CUDA, oneDNN loaded, every Var float32 and non-empty."""
    if jt.flags.use_cuda or jt.mkl_ops is None:
        return False
    return all(v is not None and v.dtype == "float32" and v.numel() > 0 for v in vs)


def inference_only() -> bool:
    """True when no gradient will be asked for, so forward-only kernels may run (not inside a checkpointed
    forward, which runs without gradients but is recomputed with them)."""
    return bool(jt.flags.no_grad) and _recomputed_forwards[0] == 0


def fast_cpu_inference_path(*vs: Optional[jt.Var]) -> bool:
    """fast_cpu_path(*vs) for the kernels that exist only without gradients (DiT's attention heads and adaLN)."""
    return inference_only() and fast_cpu_path(*vs)


@contextlib.contextmanager
def recomputation() -> Iterator[None]:
    """Mark a forward pass that gradient checkpointing will recompute with gradients (forward-only kernels off)."""
    _recomputed_forwards[0] += 1
    try:
        yield
    finally:
        _recomputed_forwards[0] -= 1
