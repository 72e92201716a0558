"""End-to-end tests of classifier_sample.py (classifier guidance) on the fixture 64x64 UNet and a tiny classifier."""

import importlib.util
import os
import shlex

import numpy as np
import pytest

import guided_diffusion  # noqa: F401  (prepares Jittor's environment)
from sampling_helpers import (
    CLASSIFIER_FLAGS,
    REPO,
    UNET,
    assert_ok,
    assert_user_error,
    classifier_log_probs,
    load_samples,
    no_samples_npz,
    run_script,
    save_tiny_classifier,
    unet_flags,
)

LABELS = "3,7"


@pytest.fixture(scope="module")
def classifier_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("clf") / "classifier.pt")
    save_tiny_classifier(path)
    return path


def _common(classifier_path):
    return unet_flags() + CLASSIFIER_FLAGS + [
        "--model_path", UNET, "--classifier_path", classifier_path, "--num_samples", 2, "--batch_size", 2,
        "--timestep_respacing", "ddim5", "--use_ddim", "True", "--class_labels", LABELS, "--seed", 3]


@pytest.fixture(scope="module")
def guided_and_unguided(tmp_path_factory, classifier_path):
    """The same command (same seed, so the same noise) without guidance and with a strong classifier scale."""
    out = {}
    for name, scale in (("unguided", 0.0), ("guided", 30.0)):
        logdir = tmp_path_factory.mktemp(name)
        proc = run_script("classifier_sample.py", _common(classifier_path) + ["--classifier_scale", scale], logdir)
        assert_ok(proc)
        out[name] = (logdir, load_samples(os.path.join(logdir, "samples_2x64x64x3.npz")))
    return out


def test_classifier_sample_writes_images_labels_and_grid(guided_and_unguided):
    logdir, data = guided_and_unguided["guided"]
    assert sorted(data) == ["arr_0", "arr_1"]
    assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (2, 64, 64, 3)
    assert data["arr_1"].dtype == np.int64 and data["arr_1"].tolist() == [3, 7]
    assert os.path.exists(os.path.join(logdir, "samples_2x64x64x3.png"))
    assert not os.path.exists(os.path.join(logdir, "samples_2.partial"))


def test_classifier_guidance_raises_log_prob_of_the_labels(guided_and_unguided, classifier_path):
    _, unguided = guided_and_unguided["unguided"]
    _, guided = guided_and_unguided["guided"]
    assert not np.array_equal(unguided["arr_0"], guided["arr_0"])
    lp_unguided = classifier_log_probs(classifier_path, unguided["arr_0"], unguided["arr_1"])
    lp_guided = classifier_log_probs(classifier_path, guided["arr_0"], guided["arr_1"])
    print("log p(y|x): unguided", lp_unguided, "guided", lp_guided)
    assert lp_guided.mean() > lp_unguided.mean(), (lp_guided, lp_unguided)


def test_classifier_sample_reports_missing_classifier(tmp_path):
    args = unet_flags() + ["--model_path", UNET, "--classifier_path", str(tmp_path / "nope.pt")]
    proc = run_script("classifier_sample.py", args, tmp_path)
    assert_user_error(proc, "--classifier_path", "nope.pt", "not found")
    assert no_samples_npz(tmp_path)


def test_classifier_sample_names_every_input_problem_at_once(tmp_path):
    proc = run_script("classifier_sample.py", unet_flags() + ["--timestep_respacing", "ddimX", "--model_path",
                                                              UNET, "--num_samples", "0"], tmp_path)
    assert_user_error(proc, "3 problems", "--timestep_respacing 'ddimX'", "--classifier_path is required",
                      "--num_samples must be at least 1")
    assert "Traceback" not in proc.stderr and no_samples_npz(tmp_path)


def test_classifier_sample_reports_checkpoint_not_fitting_flags(tmp_path, classifier_path):
    args = _common(classifier_path) + ["--class_cond", "False"]  # the fixture UNet is class-conditional
    proc = run_script("classifier_sample.py", args, tmp_path)
    assert_user_error(proc, "--class_cond True")
    assert no_samples_npz(tmp_path)


def test_classifier_sample_rejects_label_outside_the_classes(tmp_path, classifier_path):
    proc = run_script("classifier_sample.py", _common(classifier_path) + ["--class_labels", "1000"], tmp_path)
    assert_user_error(proc, "--class_labels", "0..999")


def test_classifier_sample_runs_ddim_on_a_section_spacing_as_the_reference(tmp_path, classifier_path):
    args = _common(classifier_path) + ["--timestep_respacing", "3,2", "--num_samples", 1, "--batch_size", 1]
    proc = run_script("classifier_sample.py", args, tmp_path)
    assert_ok(proc)
    assert load_samples(os.path.join(tmp_path, "samples_1x64x64x3.npz"))["arr_0"].shape == (1, 64, 64, 3)


README_COMMANDS = [
    # The two classifier_sample.py commands of the original README, with its "--model_path model_path" typo fixed.
    "--batch_size 8 --num_samples 10000 --timestep_respacing 250 --attention_resolutions 32,16,8 --class_cond True "
    "--diffusion_steps 1000 --image_size 256 --learn_sigma True --noise_schedule linear --num_channels 256 "
    "--num_head_channels 64 --num_res_blocks 2 --resblock_updown True --use_scale_shift_norm True "
    "--classifier_scale 10.0 --classifier_path path/to/classifier.pt --model_path /path/to/model.pt",
    "--batch_size 8 --num_samples 64 --timestep_respacing ddim25 --use_ddim True --attention_resolutions 32,16,8 "
    "--class_cond True --diffusion_steps 1000 --image_size 256 --learn_sigma True --noise_schedule linear "
    "--num_channels 256 --num_head_channels 64 --num_res_blocks 2 --resblock_updown True "
    "--use_scale_shift_norm True --classifier_scale 10.0 --classifier_path path/to/classifier.pt "
    "--model_path /path/to/model.pt",
]


@pytest.mark.parametrize("command", README_COMMANDS)
def test_readme_commands_parse_to_the_released_256_setup(command):
    spec = importlib.util.spec_from_file_location("classifier_sample", os.path.join(REPO, "classifier_sample.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = module.create_argparser().parse_args(shlex.split(command))
    assert args.image_size == 256 and args.class_cond and args.learn_sigma and args.num_head_channels == 64
    assert args.classifier_scale == 10.0 and args.model_path == "/path/to/model.pt"
    # the released 256x256 classifier is built by the classifier defaults
    assert (args.classifier_width, args.classifier_depth, args.classifier_attention_resolutions,
            args.classifier_pool) == (128, 2, "32,16,8", "attention")
