"""
The optimizer of every trainer and its learning-rate schedules.

AdamW is Jittor's (decoupled weight decay, as torch's), stepped once per call with explicit gradients (the fused
CPU kernel when it applies), with a torch-style state dict ({"state": {i: {"step", "exp_avg", "exp_avg_sq"}},
"param_groups": [...]}) so that optimizer checkpoints restore exactly and load in torch.
"""

from typing import Any, Dict, Mapping, Sequence

import jittor as jt
import numpy as np

from .. import cpu
from ..errors import CheckpointError


class AdamW(jt.optim.AdamW):
    """Jittor's AdamW (decoupled weight decay, as torch's) stepped once per call with explicit gradients, with a
    torch-style state dict so that optimizer checkpoints restore exactly."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(list(params), lr, eps=eps, betas=tuple(betas), weight_decay=weight_decay)
        for pg in self.param_groups:
            pg.setdefault("lr", lr)

    def step_with_grads(self, params: Sequence[jt.Var], grads: Sequence[jt.Var]) -> None:
        """One AdamW update with the given gradients (aligned with params)."""
        by_id = {id(p): g for p, g in zip(params, grads)}
        for pg in self.param_groups:
            pg["grads"] = [by_id[id(p)] if id(p) in by_id else jt.zeros_like(p) for p in pg["params"]]
        self.n_step += 1  # the bias-correction step count (Jittor counts backward() calls instead)
        tensors = [v for pg in self.param_groups for v in pg["params"] + pg["grads"]]
        if cpu.fast_cpu_path(*tensors):
            cpu.adamw_step(self.param_groups, self.n_step, dict(lr=self.lr, betas=self.betas, eps=self.eps,
                                                                weight_decay=self.weight_decay))
            return
        jt.optim.AdamW.step(self)

    def state_dict(self) -> Dict[str, Any]:
        """{"state": per-parameter moments and step, "param_groups": hyper-parameters}, as torch's AdamW."""
        state: Dict[int, Dict[str, Any]] = {}
        groups = []
        index = 0
        for pg in self.param_groups:
            ids = []
            for p, m, v in zip(pg["params"], pg["m"], pg["values"]):
                if self.n_step > 0:
                    state[index] = {
                        "step": np.array(float(self.n_step), dtype=np.float32),
                        "exp_avg": np.array(m.numpy(), copy=True),
                        "exp_avg_sq": np.array(v.numpy(), copy=True),
                    }
                ids.append(index)
                index += 1
            groups.append({
                "lr": float(pg.get("lr", self.lr)),
                "betas": tuple(float(b) for b in pg.get("betas", self.betas)),
                "eps": float(pg.get("eps", self.eps)),
                "weight_decay": float(pg.get("weight_decay", self.weight_decay)),
                "amsgrad": False,
                "maximize": False,
                "foreach": None,
                "capturable": False,
                "differentiable": False,
                "fused": None,
                "params": ids,
            })
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: Mapping[str, Any], source: str = "optimizer checkpoint") -> None:
        """Restore moments, step count and hyper-parameters; a layout that does not fit raises CheckpointError."""
        try:
            groups = list(state_dict["param_groups"])
            state = state_dict["state"]
        except (KeyError, TypeError):
            raise CheckpointError("%s is not an AdamW state dict: delete it or resume without it" % source)
        if len(groups) != len(self.param_groups) or any(
            len(g["params"]) != len(pg["params"]) for g, pg in zip(groups, self.param_groups)
        ):
            raise CheckpointError(
                "%s has %s parameters, the optimizer %s: it belongs to another model (or to a run with another "
                "--use_fp16 setting, whose optimizer holds flattened parameters)"
                % (source, [len(g["params"]) for g in groups], [len(pg["params"]) for pg in self.param_groups])
            )
        n_step = 0
        for g, pg in zip(groups, self.param_groups):
            for i, (key, p) in enumerate(zip(g["params"], pg["params"])):
                s = state.get(key, state.get(str(key)))
                if s is None:
                    continue
                m, v = np.asarray(s["exp_avg"]), np.asarray(s["exp_avg_sq"])
                if tuple(m.shape) != tuple(p.shape) or tuple(v.shape) != tuple(p.shape):
                    raise CheckpointError("%s: state of parameter %d has shape %s, the parameter %s: it belongs "
                                          "to another model" % (source, key, m.shape, tuple(p.shape)))
                pg["m"][i] = jt.array(m.astype(np.float32)).stop_grad()
                pg["values"][i] = jt.array(v.astype(np.float32)).stop_grad()
                n_step = int(round(float(np.asarray(s["step"]).reshape(-1)[0])))
            for k in ("lr", "eps", "weight_decay"):
                if k in g:
                    pg[k] = float(g[k])
            if "betas" in g:
                pg["betas"] = tuple(float(b) for b in g["betas"])
        self.n_step = n_step


def set_lr(opt, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for param_group in opt.param_groups:
        param_group["lr"] = lr


def linear_anneal_lr(opt, base_lr: float, frac_done: float) -> None:
    """Linearly decay the learning rate of every parameter group to 0 at frac_done = 1 (the references' anneal)."""
    set_lr(opt, base_lr * (1 - frac_done))
