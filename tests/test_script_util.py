"""Tests for guided_diffusion.script_util: flag defaults, argparse helpers and the model/diffusion factories."""

import argparse
import json
import os

import guided_diffusion  # noqa: F401  (prepares Jittor's environment before jittor is imported)
import pytest

from guided_diffusion import checkpoint, state_dicts
from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion import script_util as su
from guided_diffusion.errors import UserError
from guided_diffusion.respace import SpacedDiffusion
from guided_diffusion.unet import EncoderUNetModel, SuperResModel, UNetModel

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "guided_diffusion")


def test_diffusion_and_model_defaults_match_the_reference():
    assert su.diffusion_defaults() == dict(
        learn_sigma=False,
        diffusion_steps=1000,
        noise_schedule="linear",
        timestep_respacing="",
        use_kl=False,
        predict_xstart=False,
        rescale_timesteps=False,
        rescale_learned_sigmas=False,
    )
    expected = dict(
        image_size=64,
        num_channels=128,
        num_res_blocks=2,
        num_heads=4,
        num_heads_upsample=-1,
        num_head_channels=-1,
        attention_resolutions="16,8",
        channel_mult="",
        dropout=0.0,
        class_cond=False,
        use_checkpoint=False,
        use_scale_shift_norm=True,
        resblock_updown=False,
        use_fp16=False,
        use_new_attention_order=False,
        num_classes=1000,  # added (the reference's NUM_CLASSES constant): --num_classes on every script
    )
    expected.update(su.diffusion_defaults())
    assert su.model_and_diffusion_defaults() == expected
    assert su.NUM_CLASSES == 1000


def test_classifier_defaults_match_the_reference():
    assert su.classifier_defaults() == dict(
        image_size=64,
        classifier_use_fp16=False,
        classifier_width=128,
        classifier_depth=2,
        classifier_attention_resolutions="32,16,8",
        classifier_use_scale_shift_norm=True,
        classifier_resblock_updown=True,
        classifier_pool="attention",
        num_classes=1000,  # added: the classifier's output count
    )
    both = su.classifier_and_diffusion_defaults()
    assert set(both) == set(su.classifier_defaults()) | set(su.diffusion_defaults())


def test_sr_defaults_drop_image_size_channel_mult_and_attention_order():
    d = su.sr_model_and_diffusion_defaults()
    assert d == dict(
        num_channels=128,
        num_res_blocks=2,
        num_heads=4,
        num_heads_upsample=-1,
        num_head_channels=-1,
        attention_resolutions="16,8",
        dropout=0.0,
        class_cond=False,
        use_checkpoint=False,
        use_scale_shift_norm=True,
        resblock_updown=False,
        use_fp16=False,
        learn_sigma=False,
        diffusion_steps=1000,
        noise_schedule="linear",
        timestep_respacing="",
        use_kl=False,
        predict_xstart=False,
        rescale_timesteps=False,
        rescale_learned_sigmas=False,
        num_classes=1000,
        large_size=256,
        small_size=64,
    )


def test_free_defaults_are_a_class_conditional_model_with_num_classes():
    d = su.free_model_and_diffusion_defaults()
    assert d["num_classes"] == 10 and d["class_cond"] is True
    assert set(su.model_and_diffusion_defaults()) == set(d)


@pytest.mark.parametrize("text,value", [("yes", True), ("TRUE", True), ("t", True), ("Y", True), ("1", True),
                                        ("no", False), ("False", False), ("f", False), ("n", False), ("0", False)])
def test_str2bool_parses_reference_spellings(text, value):
    assert su.str2bool(text) is value


def test_str2bool_rejects_other_values():
    with pytest.raises(argparse.ArgumentTypeError):
        su.str2bool("maybe")


def test_add_dict_to_argparser_types_flags_after_their_defaults():
    parser = argparse.ArgumentParser()
    su.add_dict_to_argparser(parser, dict(n=3, lr=1e-4, name="x", flag=False, opt=None))
    args = parser.parse_args(["--n", "7", "--lr", "0.5", "--name", "y", "--flag", "True", "--opt", "z"])
    assert (args.n, args.lr, args.name, args.flag, args.opt) == (7, 0.5, "y", True, "z")
    assert isinstance(args.n, int) and isinstance(args.lr, float)
    defaults = parser.parse_args([])
    assert (defaults.n, defaults.lr, defaults.name, defaults.flag, defaults.opt) == (3, 1e-4, "x", False, None)
    with pytest.raises(SystemExit):
        parser.parse_args(["--n", "seven"])


def test_args_to_dict_picks_the_keys():
    args = argparse.Namespace(a=1, b="2", c=3.0)
    assert su.args_to_dict(args, ["a", "c"]) == {"a": 1, "c": 3.0}


class _Recorder:
    """Stands in for a model class and records its constructor arguments."""

    def __init__(self):
        self.kwargs = None

    def __call__(self, **kwargs):
        self.kwargs = kwargs
        return self


@pytest.mark.parametrize(
    "size,mult",
    [(512, (0.5, 1, 1, 2, 2, 4, 4)), (256, (1, 1, 2, 2, 4, 4)), (128, (1, 1, 2, 3, 4)), (64, (1, 2, 3, 4))],
)
def test_create_model_channel_mult_table(monkeypatch, size, mult):
    rec = _Recorder()
    monkeypatch.setattr(su, "UNetModel", rec)
    su.create_model(size, 32, 1, attention_resolutions="32,16,8")
    assert rec.kwargs["channel_mult"] == mult
    assert rec.kwargs["attention_resolutions"] == (size // 32, size // 16, size // 8)


def test_create_model_maps_flags_to_unet_arguments(monkeypatch):
    rec = _Recorder()
    monkeypatch.setattr(su, "UNetModel", rec)
    su.create_model(32, 64, 3, channel_mult="1,2,2,2", learn_sigma=True, class_cond=True, num_classes=11)
    kw = rec.kwargs
    assert kw["channel_mult"] == (1, 2, 2, 2)
    assert kw["out_channels"] == 6 and kw["in_channels"] == 3
    assert kw["num_classes"] == 11
    assert kw["attention_resolutions"] == (2,)
    su.create_model(64, 64, 3)
    assert rec.kwargs["num_classes"] is None and rec.kwargs["out_channels"] == 3
    su.create_model(64, 64, 3, class_cond=True)
    assert rec.kwargs["num_classes"] == 1000


def test_unsupported_image_size_is_a_user_error_naming_the_fix():
    with pytest.raises(UserError) as err:
        su.create_model(48, 32, 1)
    assert "48" in str(err.value) and "channel_mult" in str(err.value)
    with pytest.raises(UserError):
        su.create_classifier(48, False, 32, 1, "16", True, True, "attention")
    with pytest.raises(UserError):
        su.sr_create_model(128, 32, 32, 1, False, False, False, "16", 1, -1, -1, False, 0.0, False, False)


def test_create_classifier_uses_64_head_channels_and_1000_classes(monkeypatch):
    rec = _Recorder()
    monkeypatch.setattr(su, "EncoderUNetModel", rec)
    su.create_classifier(**su.classifier_defaults())
    kw = rec.kwargs
    assert kw["num_head_channels"] == 64 and kw["out_channels"] == 1000
    assert kw["model_channels"] == 128 and kw["num_res_blocks"] == 2
    assert kw["attention_resolutions"] == (2, 4, 8)
    assert kw["channel_mult"] == (1, 2, 3, 4)
    assert kw["pool"] == "attention" and kw["use_scale_shift_norm"] and kw["resblock_updown"]


def test_sr_create_model_builds_a_super_res_model():
    model = su.sr_create_model(64, 32, 32, 1, True, False, False, "8", 1, 32, -1, True, 0.0, True, False)
    assert isinstance(model, SuperResModel)
    assert model.out_channels == 6 and model.channel_mult == (1, 2, 3, 4)
    assert model.in_channels == 6  # the upsampled low-resolution image is concatenated to the input


@pytest.mark.parametrize(
    "flags,loss,var,mean",
    [
        ({}, gd.LossType.MSE, gd.ModelVarType.FIXED_LARGE, gd.ModelMeanType.EPSILON),
        ({"use_kl": True}, gd.LossType.RESCALED_KL, gd.ModelVarType.FIXED_LARGE, gd.ModelMeanType.EPSILON),
        ({"rescale_learned_sigmas": True, "learn_sigma": True}, gd.LossType.RESCALED_MSE,
         gd.ModelVarType.LEARNED_RANGE, gd.ModelMeanType.EPSILON),
        ({"sigma_small": True, "predict_xstart": True}, gd.LossType.MSE, gd.ModelVarType.FIXED_SMALL,
         gd.ModelMeanType.START_X),
    ],
)
def test_create_gaussian_diffusion_picks_types_from_flags(flags, loss, var, mean):
    d = su.create_gaussian_diffusion(steps=100, **flags)
    assert isinstance(d, SpacedDiffusion)
    assert (d.loss_type, d.model_var_type, d.model_mean_type) == (loss, var, mean)
    assert d.num_timesteps == 100


def test_create_gaussian_diffusion_respaces():
    d = su.create_gaussian_diffusion(steps=1000, noise_schedule="cosine", timestep_respacing="ddim25")
    assert d.num_timesteps == 25 and d.timestep_map[:3] == [0, 40, 80]


def test_create_model_and_diffusion_builds_the_fixture_model_that_loads_its_checkpoint():
    with open(os.path.join(FIXTURES, "unet64_cond_flags.json")) as f:
        flags = json.load(f)
    assert set(flags) | {"num_classes"} == set(su.model_and_diffusion_defaults())
    model, diffusion = su.create_model_and_diffusion(**flags)
    assert isinstance(model, UNetModel) and isinstance(diffusion, SpacedDiffusion)
    state_dicts.load_state_dict_strict(model, checkpoint.load_file(os.path.join(FIXTURES, "unet64_cond.pt")))
    assert model.num_classes == 1000
    assert diffusion.model_var_type == gd.ModelVarType.LEARNED_RANGE


def test_create_model_and_diffusion_accepts_free_defaults_with_null_label_row():
    flags = dict(su.free_model_and_diffusion_defaults(), num_channels=32, num_res_blocks=1)
    flags["num_classes"] = flags["num_classes"] + 1
    model, diffusion = su.create_model_and_diffusion(**flags)
    assert tuple(model.label_emb.weight.shape) == (11, 128)
    assert diffusion.num_timesteps == flags["diffusion_steps"]


def test_classifier_and_diffusion_factory_builds_both():
    args = dict(su.classifier_and_diffusion_defaults(), classifier_width=32, classifier_depth=1,
                classifier_attention_resolutions="8", diffusion_steps=100)
    classifier, diffusion = su.create_classifier_and_diffusion(**args)
    assert isinstance(classifier, EncoderUNetModel) and diffusion.num_timesteps == 100
    model, sr_diffusion = su.sr_create_model_and_diffusion(
        **dict(su.sr_model_and_diffusion_defaults(), large_size=64, small_size=32, num_channels=32,
               num_res_blocks=1, attention_resolutions="8", diffusion_steps=100)
    )
    assert isinstance(model, SuperResModel) and sr_diffusion.num_timesteps == 100


def test_num_classes_sets_the_label_table_and_the_classifier_output():
    flags = dict(su.model_and_diffusion_defaults(), image_size=32, num_channels=32, num_res_blocks=1,
                 attention_resolutions="8", class_cond=True, num_classes=3)
    model, _ = su.create_model_and_diffusion(**flags)
    assert tuple(model.label_emb.weight.shape) == (3, 128)
    cflags = dict(su.classifier_and_diffusion_defaults(), image_size=32, classifier_width=32, classifier_depth=1,
                  classifier_attention_resolutions="8", num_classes=5)
    classifier, _ = su.create_classifier_and_diffusion(**cflags)
    assert tuple(classifier.out[2].c_proj.weight.shape)[0] == 5
    sr_flags = dict(su.sr_model_and_diffusion_defaults(), large_size=64, small_size=32, num_channels=32,
                    num_res_blocks=1, attention_resolutions="8", class_cond=True, num_classes=4)
    sr_model, _ = su.sr_create_model_and_diffusion(**sr_flags)
    assert tuple(sr_model.label_emb.weight.shape) == (4, 128)
