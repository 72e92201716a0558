"""
The CPU fast paths: fused OpenMP kernels (`kernels`), Winograd convolution (`winograd`), AdamW's update (`adamw`),
the ops that choose among them (`ops`), the one module that decides when they run (`dispatch`), and the routing of
signals away from the threads that run oneDNN's GEMM (`signal_routing`).

Model code imports this package and calls, once per op, ``if cpu.fast_cpu_path(x, ...): return cpu.<op>(...)``
before the plain Jittor computation; on CUDA (or for other dtypes) the plain computation runs.
"""

from .adamw import adamw_step
from .dispatch import fast_cpu_inference_path, fast_cpu_path, inference_only, recomputation
from .kernels import attention_heads, layer_norm_modulate, row_softmax, scale_shift, silu, sum_of_squares
from .ops import batched_matmul, conv1d, conv2d, group_norm, qkv_attention, scaled_dot_product_attention
from .signal_routing import HANDLED_SIGNALS, signals_off_compute_threads

__all__ = [
    "HANDLED_SIGNALS", "adamw_step", "attention_heads", "batched_matmul", "conv1d", "conv2d", "fast_cpu_inference_path",
    "fast_cpu_path", "group_norm", "inference_only", "layer_norm_modulate", "qkv_attention", "recomputation",
    "row_softmax", "scale_shift", "scaled_dot_product_attention", "signals_off_compute_threads", "silu",
    "sum_of_squares",
]
