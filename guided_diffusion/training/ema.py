"""
Weight averages kept during training, behind one small interface: `update(params, step)` after each optimizer step,
`state()` (the averaged weights by checkpoint name) and `load(name, values)`.

* MultiRateEMA: the references' EMA, one copy per rate, ``ema = rate * ema + (1 - rate) * param``; checkpoint names
  ``ema_<rate>`` (files ``ema_<rate>_NNNNNN.pt``).
* PowerFunctionEMA: EDM2's power-function EMA, one copy per relative standard deviation `std`, after optimizer step
  k ``ema = ema + (1 - beta_k) * (param - ema)`` with ``beta_k = (1 - 1/k)^(exp + 1)``; checkpoint names
  ``phema_<std %.3f>`` (files ``phema_0.050_NNNNNN.pt``), the snapshots that scripts/reconstruct_ema.py combines.

The averages live as float32 Vars aligned with the parameter list they average (the master parameters of an ADM
run, the model's parameters for DiT); `snapshot_file_name` builds every EMA file name.
"""

import re
from typing import Dict, List, Optional, Sequence, Tuple, Union

import jittor as jt
import numpy as np

from ..nn import update_ema
from .phema import MAX_STD, power_function_beta


def snapshot_file_name(name: str, step: int) -> str:
    """The file of an averaged-weights state at `step`: ``<name>_NNNNNN.pt`` (e.g. ema_0.9999_000100.pt)."""
    return f"{name}_{step:06d}.pt"


def ema_rate_name(rate: float) -> str:
    """The checkpoint name of the EMA with this rate: ``ema_<rate>`` (the rate as Python prints it)."""
    return f"ema_{rate}"


def ema_std_name(std: float) -> str:
    """The checkpoint name of the power-function EMA with this relative std: ``phema_<std %.3f>``."""
    return f"phema_{std:.3f}"


#: A power-function EMA snapshot file: phema_<std>_<step>.pt
PHEMA_FILE = re.compile(r"^phema_(\d+\.\d+)_(\d+)\.pt$")


def parse_ema_rates(ema_rate: Union[float, str, Sequence[float]]) -> List[float]:
    """ "0.9999,0.999" -> [0.9999, 0.999] (a float becomes a one-element list)."""
    if isinstance(ema_rate, (float, int)):
        return [float(ema_rate)]
    if isinstance(ema_rate, str):
        return [float(x) for x in ema_rate.split(",") if x.strip()]
    return [float(x) for x in ema_rate]


def parse_ema_stds(ema_std: Union[str, Sequence[float], None]) -> List[float]:
    """ "0.05,0.1" -> [0.05, 0.1]; "" or None -> [] (no power-function EMA). Raises ValueError when a value is not a
    number in (0, MAX_STD] or two values print alike (%.3f)."""
    if ema_std is None:
        return []
    values = [float(x) for x in ema_std.split(",") if x.strip()] if isinstance(ema_std, str) else \
        [float(x) for x in ema_std]
    for std in values:
        if not 0.0 < std <= MAX_STD:
            raise ValueError("%g is outside (0, %g]" % (std, MAX_STD))
    names = [ema_std_name(s) for s in values]
    if len(set(names)) != len(names):
        raise ValueError("two stds print alike as %%.3f: %s" % ", ".join(names))
    return values


def _copies(params: Sequence[jt.Var]) -> List[jt.Var]:
    return [jt.array(np.array(p.numpy(), copy=True)).stop_grad() for p in params]


class EMA:
    """The interface of the weight averages: update after each optimizer step, state to save, load to resume."""

    names: List[str]
    averages: List[List[jt.Var]]

    def update(self, params: Sequence[jt.Var], step: int) -> None:
        """Fold the weights after optimizer step `step` (1, 2, ...) into every average."""
        raise NotImplementedError

    def state(self) -> Dict[str, List[jt.Var]]:
        """The averaged weights by checkpoint name (aligned with the averaged parameter list)."""
        return dict(zip(self.names, self.averages))

    def load(self, name: str, values: Sequence[jt.Var]) -> None:
        """Restore the average `name` (one of `names`) from Vars aligned with the averaged parameter list."""
        index = self.names.index(name)
        self.averages[index] = [v.stop_grad() for v in values]

    def vars(self) -> List[jt.Var]:
        """Every averaged Var (for syncing and for the finite-weights check)."""
        return [v for average in self.averages for v in average]


class MultiRateEMA(EMA):
    """The references' EMA: one average per rate, updated as ``rate * ema + (1 - rate) * param``."""

    def __init__(self, params: Sequence[jt.Var], rates: Sequence[float],
                 averages: Optional[List[List[jt.Var]]] = None):
        """Averages start as copies of params, or are the given Vars (e.g. a DiT EMA module's parameters)."""
        self.rates = [float(r) for r in rates]
        self.names = [ema_rate_name(r) for r in self.rates]
        self.averages = averages if averages is not None else [_copies(params) for _ in self.rates]

    def update(self, params: Sequence[jt.Var], step: int) -> None:
        """``ema = rate * ema + (1 - rate) * param`` for every rate (the step number is not used)."""
        for rate, average in zip(self.rates, self.averages):
            update_ema(average, params, rate=rate)


class PowerFunctionEMA(EMA):
    """EDM2's power-function EMA: one average per relative std, with the step-dependent decay of Eq. 127."""

    def __init__(self, params: Sequence[jt.Var], stds: Sequence[float]):
        """Averages start as copies of params (the first update replaces them: beta_1 = 0)."""
        self.stds = [float(s) for s in stds]
        self.names = [ema_std_name(s) for s in self.stds]
        self.averages = [_copies(params) for _ in self.stds]

    def update(self, params: Sequence[jt.Var], step: int) -> None:
        """``ema = ema + (1 - beta) * (param - ema)``, ``beta = (1 - 1/step)^(exp + 1)``, for every std."""
        updated = []
        for std, average in zip(self.stds, self.averages):
            weight = 1.0 - power_function_beta(std, step)
            for avg, param in zip(average, params):
                avg.assign((avg + (param.detach() - avg) * weight).cast(avg.dtype))
                updated.append(avg)
        if updated:
            jt.sync(updated)  # Jittor is lazy: an average never read would otherwise grow its graph every step


def stds_and_steps(file_names: Sequence[str]) -> List[Tuple[float, int, str]]:
    """(std, step, name) of every power-function EMA snapshot among file_names, sorted by step then std."""
    found = []
    for name in file_names:
        m = PHEMA_FILE.match(name)
        if m:
            found.append((float(m.group(1)), int(m.group(2)), name))
    return sorted(found, key=lambda x: (x[1], x[0]))
