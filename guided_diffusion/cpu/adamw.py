"""
AdamW's update as one multi-threaded CPU kernel per parameter (Jittor's AdamW formula and operation order).
"""

from typing import Mapping, Sequence

import jittor as jt
import numpy as np

_ADAMW_HEADER = "#include <cmath>\n"

# Inputs p, g, m, v, scalars = [1 - lr * wd, b0, 1 - b0, b1, 1 - b1, sqrt(1 - b1^n), eps, lr / (1 - b0^n)];
# outputs p', m', v' computed as jt.optim.AdamW.step does.
_ADAMW_SRC = r"""
    const long size = in0->num;
    const float* __restrict__ k = in4_p;
    const float decay = k[0], b0 = k[1], c0 = k[2], b1 = k[3], c1 = k[4], sbc2 = k[5], eps = k[6], step = k[7];
    #pragma omp parallel for schedule(static) if(size >= (1 << 16))
    for (long i = 0; i < size; i++) {
        const float g = in1_p[i];
        const float p = in0_p[i] * decay;
        const float m = b0 * in2_p[i] + c0 * g;
        const float v = b1 * in3_p[i] + c1 * g * g;
        const float denom = std::sqrt(v) / sbc2 + eps;
        out0_p[i] = p - step * m / denom;
        out1_p[i] = m;
        out2_p[i] = v;
    }
"""


def adamw_step(param_groups: Sequence[Mapping], n_step: int, defaults: Mapping) -> None:
    """Update every parameter of jt.optim.AdamW-style param_groups (with "grads" set) in place, step n_step.

    The per-step scalars travel as a small array (not constants baked into the kernel), so a changing learning
    rate or step count never compiles a new kernel. defaults supplies lr, betas, eps and weight_decay where a group
    has none.
    """
    n = float(n_step)
    for pg in param_groups:
        lr = pg.get("lr", defaults["lr"])
        b0, b1 = pg.get("betas", defaults["betas"])
        scalars = jt.array(np.array([
            1 - lr * pg.get("weight_decay", defaults["weight_decay"]), b0, 1 - b0, b1, 1 - b1,
            np.sqrt(1 - b1 ** n), pg.get("eps", defaults["eps"]), lr / (1 - b0 ** n)], dtype=np.float32))
        for p, g, v, m in zip(pg["params"], pg["grads"], pg["values"], pg["m"]):
            if p.is_stop_grad():
                continue
            new_p, new_m, new_v = jt.code([p.shape] * 3, ["float32"] * 3, [p, g, m, v, scalars],
                                          cpu_header=_ADAMW_HEADER, cpu_src=_ADAMW_SRC)
            m.update(new_m)
            v.update(new_v)
            p.update(new_p)
