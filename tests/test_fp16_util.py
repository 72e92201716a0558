"""Tests for guided_diffusion/fp16_util.py.

Conversion helpers (convert_module_to_f16/f32, models owner): the test_convert_module_* functions below.
MixedPrecisionTrainer and master-parameter helpers (training owner) go in their own test functions.
"""

import numpy as np

import guided_diffusion  # noqa: F401  (prepares Jittor before it is imported)
from jittor import nn

from guided_diffusion.fp16_util import convert_module_to_f16, convert_module_to_f32


def test_convert_module_to_f16_casts_only_convolution_weights_and_biases_in_place():
    convs = [nn.Conv1d(4, 6, 1), nn.Conv2d(4, 6, 3), nn.Conv3d(4, 6, 1)]
    others = [nn.Linear(4, 6), nn.GroupNorm(2, 4), nn.Embedding(3, 4)]
    for m in convs:
        w, b = m.weight, m.bias
        before = w.numpy().copy()
        convert_module_to_f16(m)
        assert m.weight is w and m.bias is b  # same Vars, so optimizers keep their references
        assert str(m.weight.dtype) == "float16" and str(m.bias.dtype) == "float16"
        np.testing.assert_allclose(m.weight.numpy().astype(np.float32), before, atol=1e-3)
        convert_module_to_f32(m)
        assert str(m.weight.dtype) == "float32" and str(m.bias.dtype) == "float32"
    for m in others:
        convert_module_to_f16(m)
        assert all(str(p.dtype) == "float32" for p in m.parameters())


def test_convert_module_to_f16_handles_convolutions_without_bias():
    m = nn.Conv2d(2, 2, 1, bias=False)
    convert_module_to_f16(m)
    assert str(m.weight.dtype) == "float16" and m.bias is None
    convert_module_to_f32(m)
    assert str(m.weight.dtype) == "float32"


# ---------------------------------------------------------------------------------------------------------------
# MixedPrecisionTrainer and master-parameter helpers (training owner)
# ---------------------------------------------------------------------------------------------------------------

import jittor as jt  # noqa: E402
import pytest  # noqa: E402

from guided_diffusion import logger  # noqa: E402
from guided_diffusion.errors import CheckpointError  # noqa: E402
from guided_diffusion.fp16_util import (  # noqa: E402
    MixedPrecisionTrainer,
    check_overflow,
    get_param_groups_and_shapes,
    make_master_params,
    master_params_to_state_dict,
    state_dict_to_master_params,
)
from guided_diffusion.train_util import AdamW  # noqa: E402


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.fc = nn.Linear(3, 2)

    def execute(self, x):
        return self.fc(self.conv(x).mean(dims=(2, 3)))

    def convert_to_fp16(self):
        pass  # the master-parameter logic under test does not depend on the model's dtype


def _tiny(seed=0):
    jt.set_global_seed(seed)
    return _Tiny()


def _force_fp16_mode(trainer, lg=10.0):
    """Switch a trainer to the fp16 code path (flattened fp32 masters, loss scaling) on any device."""
    trainer.use_fp16 = True
    trainer.lg_loss_scale = lg
    trainer.param_groups_and_shapes = get_param_groups_and_shapes(trainer.named_params)
    trainer.master_params = make_master_params(trainer.param_groups_and_shapes)
    return trainer


def test_param_groups_flatten_to_two_masters_and_round_trip_through_state_dicts():
    model = _tiny()
    named = list(model.named_parameters())
    groups = get_param_groups_and_shapes(named)
    assert [n for n, _ in groups[0][0]] == ["conv.bias", "fc.bias"] and groups[0][1] == (-1,)
    assert [n for n, _ in groups[1][0]] == ["conv.weight", "fc.weight"] and groups[1][1] == (1, -1)
    master = make_master_params(groups)
    assert [tuple(m.shape) for m in master] == [(5,), (1, 3 * 2 * 9 + 2 * 3)]
    sd = master_params_to_state_dict(model, groups, master, use_fp16=True)
    for name, p in named:
        np.testing.assert_array_equal(sd[name], p.numpy())
        assert sd[name].dtype == np.float32
    again = state_dict_to_master_params(model, sd, use_fp16=True)
    for a, b in zip(again, master):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    del sd["fc.weight"]
    with pytest.raises(CheckpointError, match="fc.weight"):
        state_dict_to_master_params(model, sd, use_fp16=False)


def test_fp16_path_unscales_gradients_and_steps_like_fp32():
    x = jt.array(np.random.RandomState(0).randn(4, 2, 5, 5).astype(np.float32))
    results = []
    for fp16 in (False, True):
        model = _tiny()
        trainer = MixedPrecisionTrainer(model=model)
        if fp16:
            _force_fp16_mode(trainer, lg=12.0)
        opt = AdamW(trainer.master_params, lr=1e-2)
        with logger.scoped_configure(format_strs=[]):
            trainer.zero_grad()
            trainer.backward((model(x) ** 2).mean())
            assert trainer.optimize(opt)
            kvs = dict(logger.getkvs())
        results.append(([p.numpy().copy() for p in model.parameters()], kvs))
    (p32, kv32), (p16, kv16) = results
    for a, b in zip(p32, p16):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert kv16["grad_norm"] == pytest.approx(kv32["grad_norm"], rel=1e-5)
    assert kv16["lg_loss_scale"] == 12.0


def test_fp16_overflow_skips_the_step_and_lowers_the_loss_scale(tmp_path):
    model = _tiny()
    trainer = _force_fp16_mode(MixedPrecisionTrainer(model=model), lg=20.0)
    opt = AdamW(trainer.master_params, lr=1e-2)
    before = [p.numpy().copy() for p in model.parameters()]
    x = jt.array(np.random.RandomState(0).randn(2, 2, 5, 5).astype(np.float32))
    with logger.scoped_configure(dir=str(tmp_path), format_strs=["log"]):
        trainer.zero_grad()
        trainer.backward((model(x) * float("inf")).sum())
        assert trainer.optimize(opt) is False
    assert trainer.lg_loss_scale == 19.0
    assert opt.n_step == 0
    for a, p in zip(before, model.parameters()):
        np.testing.assert_array_equal(a, p.numpy())
    assert "Found NaN, decreased lg_loss_scale to 19.0" in (tmp_path / "log.txt").read_text()
    assert check_overflow(float("nan")) and check_overflow(float("-inf")) and not check_overflow(1e30)


@pytest.mark.skipif(bool(jt.flags.use_cuda), reason="CPU behaviour")
def test_fp16_request_on_the_cpu_trains_in_float32():
    model = _tiny()
    trainer = MixedPrecisionTrainer(model=model, use_fp16=True)
    assert trainer.use_fp16 is False and trainer.master_params == trainer.model_params
    assert all(str(p.dtype) == "float32" for p in model.parameters())
