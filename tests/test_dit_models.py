"""DiT models.py: parity with the PyTorch reference (fixtures), released key layout, configs and CFG behaviour."""

import json
import os
import sys

import numpy as np
import pytest

import guided_diffusion  # noqa: F401  (prepares Jittor before it is imported)
import jittor as jt

from guided_diffusion.checkpoint import load_file
from guided_diffusion.state_dicts import load_state_dict_strict
from guided_diffusion.errors import CheckpointError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "DiT"))
FIX = os.path.join(ROOT, "tests", "fixtures", "dit")

import models  # noqa: E402
from models import DiT, DiT_models, get_2d_sincos_pos_embed  # noqa: E402


def _tol(ref, rel=1e-4):
    return rel * max(1.0, float(np.abs(ref).max()))


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(os.path.join(FIX, "dit_tiny_p4.npz")))


@pytest.fixture(scope="module")
def kwargs():
    with open(os.path.join(FIX, "dit_tiny_p4_kwargs.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def tiny(kwargs):
    model = DiT(**kwargs)
    load_state_dict_strict(model, load_file(os.path.join(FIX, "dit_tiny_p4.pt")), source="dit_tiny_p4.pt")
    model.eval()
    return model


def _var(a):
    a = np.asarray(a)
    return jt.array(a.astype(np.int32) if a.dtype.kind == "i" else a)


def test_pos_embed_init_matches_reference_fixture(ref, kwargs):
    model = DiT(**kwargs)
    np.testing.assert_array_equal(model.pos_embed.numpy(), ref["pos_embed_init"])
    assert model.pos_embed.is_stop_grad()


def test_2d_sincos_pos_embed_reference_values():
    emb = get_2d_sincos_pos_embed(8, 2)
    np.testing.assert_allclose(emb[1], [0.841471, 0.01, 0.540302, 0.99995, 0, 0, 1, 1], atol=1e-6)
    np.testing.assert_allclose(emb[2], [0, 0, 1, 1, 0.841471, 0.01, 0.540302, 0.99995], atol=1e-6)


@pytest.mark.parametrize("no_grad", [False, True])  # True: the fused CPU inference kernels
def test_dit_forward_matches_reference_fixture(tiny, ref, no_grad):
    with jt.flag_scope(no_grad=int(no_grad)):
        out = tiny(_var(ref["x"]), _var(ref["t"]), _var(ref["y"])).numpy()
    assert out.shape == ref["out"].shape
    assert np.abs(out - ref["out"]).max() <= _tol(ref["out"])


def test_forward_with_cfg_matches_reference_fixture(tiny, ref):
    out = tiny.forward_with_cfg(_var(ref["cfg_x"]), _var(ref["cfg_t"]), _var(ref["cfg_y"]),
                                float(ref["cfg_scale"])).numpy()
    assert np.abs(out - ref["cfg_out"]).max() <= _tol(ref["cfg_out"])


def test_forward_with_cfg_guides_first_three_channels_unless_asked(tiny, ref):
    x, t, y = _var(ref["cfg_x"]), _var(ref["cfg_t"]), _var(ref["cfg_y"])
    plain = tiny(jt.concat([x[:1], x[:1]]), t, y).numpy()
    released = tiny.forward_with_cfg(x, t, y, 4.0).numpy()
    all_ch = tiny.forward_with_cfg(x, t, y, 4.0, guide_all_channels=True).numpy()
    # channel 3 and the variance channels pass through unguided in the released behaviour
    np.testing.assert_allclose(released[:, 3:], plain[:, 3:], atol=1e-6)
    expected3 = plain[1, 3] + 4.0 * (plain[0, 3] - plain[1, 3])
    np.testing.assert_allclose(all_ch[0, 3], expected3, atol=1e-4)
    np.testing.assert_allclose(all_ch[:, :3], released[:, :3], atol=1e-6)
    np.testing.assert_allclose(all_ch[:, 4:], released[:, 4:], atol=1e-6)


def test_forward_with_cfg_interval_and_rescale_default_off_and_act_as_asked(tiny, ref):
    x, y = _var(ref["cfg_x"]), _var(ref["cfg_y"])
    n = x.shape[0] // 2
    t = jt.array(np.full((2 * n,), 500, dtype=np.int32))
    released = tiny.forward_with_cfg(x, t, y, 4.0).numpy()
    np.testing.assert_array_equal(tiny.forward_with_cfg(x, t, y, 4.0, guidance_interval=None,
                                                        guidance_rescale=0.0).numpy(), released)
    np.testing.assert_allclose(tiny.forward_with_cfg(x, t, y, 4.0, guidance_interval=(500, 999)).numpy(), released,
                               atol=1e-6)
    plain = tiny(jt.concat([x[:n], x[:n]]), t, y).numpy()
    outside = tiny.forward_with_cfg(x, t, y, 4.0, guidance_interval=(0, 499)).numpy()
    np.testing.assert_allclose(outside, np.concatenate([plain[:n], plain[:n]]), atol=1e-5)
    rescaled = tiny.forward_with_cfg(x, t, y, 4.0, guidance_rescale=0.7).numpy()
    cond = plain[:n, :3]
    std = lambda a: a.reshape(a.shape[0], -1).std(axis=1, ddof=1).reshape(-1, 1, 1, 1)  # noqa: E731
    guided = released[:n, :3]
    np.testing.assert_allclose(rescaled[:n, :3], 0.7 * guided * std(cond) / std(guided) + 0.3 * guided, atol=1e-5)
    np.testing.assert_allclose(rescaled[:, 3:], released[:, 3:], atol=1e-6)


def test_label_dropout_is_on_in_train_mode_and_off_in_eval(kwargs):
    jt.set_global_seed(0)
    model = DiT(**dict(kwargs, class_dropout_prob=1.0))
    table = model.y_embedder.embedding_table.weight
    assert table.shape[0] == kwargs["num_classes"] + 1
    labels = _var(np.array([3, 7]))
    null = model.y_embedder(_var(np.array([kwargs["num_classes"]] * 2)), False).numpy()
    np.testing.assert_array_equal(model.y_embedder(labels, True).numpy(), null)
    assert not np.allclose(model.y_embedder(labels, False).numpy(), null)
    forced = model.y_embedder(labels, False, force_drop_ids=_var(np.array([1, 0]))).numpy()
    np.testing.assert_array_equal(forced[0], null[0])
    np.testing.assert_array_equal(forced[1], model.y_embedder(labels, False).numpy()[1])


def test_released_dit_xl2_keys_and_shapes_match_official_checkpoint():
    with open(os.path.join(FIX, "official_dit_keys.json")) as f:
        official = json.load(f)["DiT-XL-2-256x256.pt"]
    model = DiT_models[official["model"]](input_size=official["input_size"])  # lazy: no forward, no weights computed
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == official["keys"]
    assert sum(int(np.prod(s)) for s in ours.values()) == 675_129_632


def test_registry_has_the_twelve_released_configurations(monkeypatch):
    expected = {
        "XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6),
    }
    monkeypatch.setattr(models, "DiT", lambda **kw: kw)  # capture the factory arguments without building
    assert len(DiT_models) == 12
    for size, (depth, hidden, heads) in expected.items():
        for patch in (2, 4, 8):
            kw = DiT_models["DiT-%s/%d" % (size, patch)](input_size=32)
            assert (kw["depth"], kw["hidden_size"], kw["num_heads"], kw["patch_size"]) == (depth, hidden, heads, patch)


def test_initialization_zeroes_adaln_and_final_layer(kwargs):
    model = DiT(**kwargs)
    for block in model.blocks:
        assert not block.adaLN_modulation[-1].weight.numpy().any()
    assert not model.final_layer.linear.weight.numpy().any()
    assert not model.final_layer.adaLN_modulation[-1].bias.numpy().any()
    w = model.t_embedder.mlp[0].weight.numpy()
    assert 0.015 < w.std() < 0.025  # N(0, 0.02)
    qkv = model.blocks[0].attn.qkv.weight.numpy()
    bound = np.sqrt(6.0 / (qkv.shape[0] + qkv.shape[1]))  # xavier_uniform
    assert np.abs(qkv).max() <= bound and np.abs(qkv).max() > 0.9 * bound


def test_checkpoint_of_another_config_is_refused(kwargs):
    model = DiT(**dict(kwargs, depth=1))
    with pytest.raises(CheckpointError, match="blocks.1"):
        load_state_dict_strict(model, load_file(os.path.join(FIX, "dit_tiny_p4.pt")), source="dit_tiny_p4.pt")


def test_tanh_gelu_matches_formula_and_has_finite_gradients_for_large_inputs():
    values = np.array([-100.0, -12.0, -3.0, -0.5, 0.0, 0.5, 3.0, 12.0, 100.0], dtype=np.float32)
    x = jt.array(values)
    y = models.gelu_tanh(x * 1.0)
    expected = 0.5 * values * (1 + np.tanh(np.sqrt(2 / np.pi) * (values + 0.044715 * values ** 3)))
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-6, atol=1e-6)
    grad = jt.grad((y * y).sum(), x).numpy()
    assert np.all(np.isfinite(grad))
    assert abs(grad[-1] - 2 * 100.0) < 1e-3 and abs(grad[0]) < 1e-6
