"""DiT autoencoder.py: diffusers-format VAE loading (current and legacy names), parity of encode/decode, errors."""

import json
import os
import shutil
import sys

import numpy as np
import pytest

import guided_diffusion  # noqa: F401  (prepares Jittor before it is imported)
import jittor as jt
from safetensors.numpy import load_file as load_safetensors
from safetensors.numpy import save_file as save_safetensors

from guided_diffusion.errors import CheckpointError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "DiT"))
FIX = os.path.join(ROOT, "tests", "fixtures", "dit")
VAE_DIR = os.path.join(FIX, "vae_tiny")

from autoencoder import AutoencoderKL  # noqa: E402


def _tol(ref, rel=1e-4):
    return rel * max(1.0, float(np.abs(ref).max()))


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(os.path.join(FIX, "vae_tiny_io.npz")))


@pytest.fixture(scope="module")
def vae():
    return AutoencoderKL.from_pretrained(VAE_DIR)


def test_vae_encode_matches_reference_fixture(vae, ref):
    post = vae.encode(jt.array(ref["x"])).latent_dist
    for name, got in (("latent_mean", post.mean), ("latent_logvar", post.logvar)):
        got = got.numpy()
        assert got.shape == ref[name].shape
        assert np.abs(got - ref[name]).max() <= _tol(ref[name]), name


def test_vae_decode_matches_reference_fixture(vae, ref):
    got = vae.decode(jt.array(ref["latent_mean"])).sample.numpy()
    assert got.shape == ref["decoded"].shape
    assert np.abs(got - ref["decoded"]).max() <= _tol(ref["decoded"])


def test_posterior_mode_std_and_sample(vae, ref):
    post = vae.encode(jt.array(ref["x"])).latent_dist
    np.testing.assert_array_equal(post.mode().numpy(), post.mean.numpy())
    np.testing.assert_allclose(post.std.numpy(), np.exp(0.5 * ref["latent_logvar"]), rtol=1e-3)
    jt.set_global_seed(0)
    a = post.sample().numpy()
    jt.set_global_seed(0)
    b = post.sample().numpy()
    np.testing.assert_array_equal(a, b)
    z = (a - post.mean.numpy()) / post.std.numpy()
    assert 0.7 < z.std() < 1.3 and abs(z.mean()) < 0.3


def test_legacy_attention_key_names_load(tmp_path, vae, ref):
    state = load_safetensors(os.path.join(VAE_DIR, "diffusion_pytorch_model.safetensors"))
    rename = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for key, value in state.items():
        for new, old in rename.items():
            key = key.replace(".attentions.0.%s." % new, ".attentions.0.%s." % old)
        legacy[key] = value
    assert any(".query." in k for k in legacy) and not any(".to_q." in k for k in legacy)
    folder = tmp_path / "legacy_vae"
    folder.mkdir()
    shutil.copy(os.path.join(VAE_DIR, "config.json"), folder / "config.json")
    save_safetensors(legacy, str(folder / "diffusion_pytorch_model.safetensors"))
    old = AutoencoderKL.from_pretrained(str(folder))
    got = old.decode(jt.array(ref["latent_mean"])).sample.numpy()
    np.testing.assert_array_equal(got, vae.decode(jt.array(ref["latent_mean"])).sample.numpy())


def test_full_size_vae_keys_match_official_sd_vae_ft_ema():
    with open(os.path.join(FIX, "official_vae_keys.json")) as f:
        official = json.load(f)["stabilityai/sd-vae-ft-ema"]
    model = AutoencoderKL.from_config(official["config"])  # lazy: no forward, no weights computed
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == official["keys"]
    assert sum(int(np.prod(s)) for s in ours.values()) == 83_653_863


def test_missing_vae_folder_names_the_fix(tmp_path):
    with pytest.raises(CheckpointError, match="sd-vae-ft-ema"):
        AutoencoderKL.from_pretrained(str(tmp_path / "stabilityai" / "sd-vae-ft-ema"))


def test_vae_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    folder = tmp_path / "bad_vae"
    folder.mkdir()
    with open(os.path.join(VAE_DIR, "config.json")) as f:
        config = json.load(f)
    config["layers_per_block"] = 2
    (folder / "config.json").write_text(json.dumps(config))
    shutil.copy(os.path.join(VAE_DIR, "diffusion_pytorch_model.safetensors"), folder)
    with pytest.raises(CheckpointError, match="missing keys"):
        AutoencoderKL.from_pretrained(str(folder))


def test_corrupt_vae_weights_are_reported(tmp_path):
    folder = tmp_path / "corrupt_vae"
    folder.mkdir()
    shutil.copy(os.path.join(VAE_DIR, "config.json"), folder / "config.json")
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        AutoencoderKL.from_pretrained(str(folder))
