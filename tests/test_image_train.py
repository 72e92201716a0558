"""End-to-end tests of image_train.py (run as a subprocess, as users run it)."""

import os
import signal
import subprocess
import sys

import numpy as np
from PIL import Image

from guided_diffusion.checkpoint import load_file
from guided_diffusion.state_dicts import load_state_dict_strict
from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults
from training_helpers import script_cmd, stop_and_continue, training_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--image_size", "32", "--num_channels", "16", "--num_res_blocks", "1", "--channel_mult", "1,2",
        "--attention_resolutions", "16", "--diffusion_steps", "50", "--class_cond", "True", "--learn_sigma", "True"]


def make_images(folder, n=4):
    rng = np.random.RandomState(0)
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.randint(0, 256, (36, 40, 3), dtype=np.uint8)).save(
            os.path.join(folder, "c%d_%d.png" % (i % 2, i)))
    return str(folder)


def run_script(args, logdir, script="image_train.py"):
    env = dict(os.environ, OPENAI_LOGDIR=str(logdir))
    env.pop("DIFFUSION_TRAINING_TEST", None)
    return subprocess.run([sys.executable, os.path.join(REPO, script)] + [str(a) for a in args],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=600)


def test_image_train_saves_resumes_exactly_and_keeps_the_resumed_checkpoint(tmp_path):
    data = make_images(tmp_path / "imgs")
    common = ["--data_dir", data, "--batch_size", "2", "--lr_anneal_steps", "2", "--save_interval", "1",
              "--log_interval", "1", "--ema_rate", "0.9999,0.9"] + TINY
    first = run_script(common, tmp_path / "a")
    assert first.returncode == 0, first.stderr[-3000:]
    names = set(os.listdir(tmp_path / "a"))
    assert {"model000001.pt", "model000002.pt", "ema_0.9999_000002.pt", "ema_0.9_000002.pt", "opt000002.pt",
            "log.txt", "progress.csv"} <= names
    assert "model000000.pt" not in names
    resumed_from = (tmp_path / "a" / "model000001.pt").read_bytes()

    second = run_script(common + ["--resume_checkpoint", tmp_path / "a" / "model000001.pt"], tmp_path / "b")
    assert second.returncode == 0, second.stderr[-3000:]
    assert (tmp_path / "a" / "model000001.pt").read_bytes() == resumed_from
    for name in ("model000002.pt", "ema_0.9999_000002.pt", "ema_0.9_000002.pt"):
        a, b = load_file(str(tmp_path / "a" / name)), load_file(str(tmp_path / "b" / name))
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=name + ":" + k)
    log = (tmp_path / "a" / "log.txt").read_text()
    for key in ("| step ", "| samples ", "| loss ", "| mse ", "| vb ", "| loss_q", "| grad_norm ", "| param_norm "):
        assert key in log, key

    # the checkpoint loads into the model that the sampling scripts build from the same flags
    flags = model_and_diffusion_defaults()
    flags.update(image_size=32, num_channels=16, num_res_blocks=1, channel_mult="1,2", attention_resolutions="16",
                 diffusion_steps=50, class_cond=True, learn_sigma=True)
    model, _ = create_model_and_diffusion(**flags)
    load_state_dict_strict(model, load_file(str(tmp_path / "b" / "ema_0.9999_000002.pt")))


def _weights(path):
    return load_file(str(path))


def test_the_same_command_and_seed_give_the_same_weights_and_another_seed_another_run(tmp_path):
    data = make_images(tmp_path / "imgs")
    common = ["--data_dir", data, "--batch_size", "2", "--lr_anneal_steps", "2", "--save_interval", "1",
              "--log_interval", "1"] + TINY
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        proc = run_script(common + ["--seed", seed], tmp_path / name)
        assert proc.returncode == 0, proc.stderr[-3000:]
    for step in (1, 2):
        a, b, c = (_weights(tmp_path / n / ("model%06d.pt" % step)) for n in "abc")
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        # another seed: other initial weights (the first convolution differs by far more than a step's change)
        assert np.abs(a["input_blocks.0.0.weight"] - c["input_blocks.0.0.weight"]).max() > 0.05


def test_image_train_reports_a_missing_data_dir_clearly(tmp_path):
    proc = run_script(["--data_dir", tmp_path / "missing"] + TINY, tmp_path / "log")
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "missing" in proc.stderr and "Traceback" not in proc.stderr


def test_image_train_names_every_input_problem_at_once(tmp_path):
    proc = run_script(["--data_dir", tmp_path / "missing", "--batch_size", "0", "--ema_rate", "1.5",
                       "--resume_checkpoint", tmp_path / "model000005.pt", "--schedule_sampler", "fancy"] + TINY,
                      tmp_path / "log")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    message = proc.stderr[proc.stderr.index("error: "):]
    for fragment in ("5 problems", "--batch_size", "--ema_rate", "--resume_checkpoint", "--schedule_sampler",
                     "missing"):
        assert fragment in message, (fragment, message)
    assert not (tmp_path / "log").exists()  # checked before the log directory is made


def test_image_train_help_lists_the_reference_flags_with_defaults(tmp_path):
    proc = run_script(["--help"], tmp_path / "log")
    assert proc.returncode == 0
    for flag in ("--data_dir", "--schedule_sampler", "--lr ", "--weight_decay", "--lr_anneal_steps", "--batch_size",
                 "--microbatch", "--ema_rate", "--log_interval", "--save_interval", "--resume_checkpoint",
                 "--use_fp16", "--fp16_scale_growth", "--num_channels", "--learn_sigma"):
        assert flag in proc.stdout, flag
    assert "default: 0.0001" in proc.stdout


def test_sigterm_saves_a_whole_set_exits_143_and_a_rerun_ends_with_the_uninterrupted_weights(tmp_path):
    steps = 30
    data = make_images(tmp_path / "imgs")
    cmd = script_cmd("image_train.py", ["--data_dir", data, "--batch_size", 2, "--lr_anneal_steps", steps,
                                        "--save_interval", 1000, "--log_interval", 1, "--ema_rate", "0.9999,0.9"]
                     + TINY)
    out = stop_and_continue(
        lambda d: cmd, lambda d: training_env(d), signum=signal.SIGTERM, twice=True,  # a second signal is harmless
        run_dir=tmp_path / "run", full_dir=tmp_path / "full", log_file="log.txt", logged_step=r"\|\s*step\s*\|\s*2 ",
        final_files=["model%06d.pt" % steps, "ema_0.9999_%06d.pt" % steps, "ema_0.9_%06d.pt" % steps],
        set_files=lambda s: ["ema_0.9999_%06d.pt" % s, "ema_0.9_%06d.pt" % s, "opt%06d.pt" % s, "model%06d.pt" % s])
    print("SIGTERM after step %d; worst relative difference to the uninterrupted run: %g"
          % (out["step"], out["worst_relative_difference"]))
    assert 3 <= out["step"] < steps
    assert out["worst_relative_difference"] == 0.0
    # the stop wrote exactly that set (no later one), and the rerun said where it continued from
    assert "continuing the run in" in (tmp_path / "run" / "log.txt").read_text()
    assert "model%06d.pt" % out["step"] in out["rerun"].stdout + (tmp_path / "run" / "log.txt").read_text()


def test_a_file_size_limit_while_saving_exits_2_naming_the_file_and_keeps_the_earlier_sets(tmp_path):
    data = make_images(tmp_path / "imgs")
    common = ["--data_dir", data, "--batch_size", "2", "--save_interval", "1", "--log_interval", "1"] + TINY
    first = run_script(common + ["--lr_anneal_steps", "1"], tmp_path / "run")
    assert first.returncode == 0, first.stderr[-3000:]
    before = {f: (tmp_path / "run" / f).read_bytes() for f in os.listdir(tmp_path / "run") if f.endswith(".pt")}

    # Like a full disk: once Jittor is imported (it writes its own cache files), writes beyond 200 kB fail with
    # EFBIG (SIGXFSZ ignored) and the script runs as usual.
    wrapper = ("import resource, runpy, signal, sys; import guided_diffusion, jittor; "
               "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
               "resource.setrlimit(resource.RLIMIT_FSIZE, (200000, 200000)); "
               "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    env = dict(os.environ, OPENAI_LOGDIR=str(tmp_path / "run"))
    proc = subprocess.run([sys.executable, "-c", wrapper, os.path.join(REPO, "image_train.py")] + common
                          + ["--lr_anneal_steps", "3"], capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    print(proc.stderr[proc.stderr.find("error:"):])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "could not write ema_0.9999_000002.pt" in proc.stderr and "MB) in %s" % (tmp_path / "run") in proc.stderr
    after = {f: (tmp_path / "run" / f).read_bytes() for f in os.listdir(tmp_path / "run") if f.endswith(".pt")}
    assert after == before and not [f for f in os.listdir(tmp_path / "run") if f.endswith(".tmp")]


def test_an_unreadable_image_is_skipped_with_a_warning_and_counted_in_the_log(tmp_path):
    data = make_images(tmp_path / "imgs", n=4)
    (tmp_path / "imgs" / "c1_broken.png").write_bytes(b"not an image")
    proc = run_script(["--data_dir", data, "--batch_size", "2", "--lr_anneal_steps", "8", "--log_interval", "1"]
                      + TINY, tmp_path / "log")
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (tmp_path / "log" / "log.txt").read_text()
    assert log.count("skipping unreadable image") == 1 and "c1_broken.png" in log
    assert "| bad_images " in log


def test_power_function_emas_follow_the_edm2_recursion_resume_exactly_and_reconstruct(tmp_path):
    """--ema_std 0.05,0.1 with --save_interval 1: every phema_<std>_<k>.pt equals EDM2's recursion applied to the
    raw weights of steps 1..k (model00000k.pt), with the betas EDM2's own code gives (tests/fixtures/phema); a run
    resumed at step 2 continues them bit for bit; reconstruct_ema.py combines them into a loadable model file."""
    edm2 = np.load(os.path.join(REPO, "tests", "fixtures", "phema", "edm2_phema.npz"))
    data = make_images(tmp_path / "imgs")
    common = ["--data_dir", data, "--batch_size", "2", "--lr_anneal_steps", "4", "--save_interval", "1",
              "--log_interval", "1", "--ema_std", "0.05,0.1"] + TINY
    first = run_script(common, tmp_path / "a")
    assert first.returncode == 0, first.stderr[-3000:]
    for i, std in enumerate((0.05, 0.1)):
        assert list(edm2["beta_stds"])[i] == std
        ema = None
        for k in range(1, 5):
            raw = load_file(str(tmp_path / "a" / ("model%06d.pt" % k)))
            beta = edm2["betas"][i, k - 1]
            ema = {n: v.astype(np.float64) for n, v in raw.items()} if ema is None else {
                n: ema[n] + (1 - beta) * (raw[n].astype(np.float64) - ema[n]) for n in ema}
            snapshot = load_file(str(tmp_path / "a" / ("phema_%.3f_%06d.pt" % (std, k))))
            assert list(snapshot) == list(raw)
            for n in raw:
                np.testing.assert_allclose(snapshot[n], ema[n], rtol=1e-5, atol=1e-6, err_msg="%g %d %s" % (std, k, n))
        assert not np.allclose(snapshot["out.2.weight"], raw["out.2.weight"])

    second = run_script(common + ["--resume_checkpoint", tmp_path / "a" / "model000002.pt"], tmp_path / "b")
    assert second.returncode == 0, second.stderr[-3000:]
    for name in ("phema_0.050_000004.pt", "phema_0.100_000004.pt", "model000004.pt"):
        a, b = load_file(str(tmp_path / "a" / name)), load_file(str(tmp_path / "b" / name))
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=name + ":" + k)
    os.remove(tmp_path / "a" / "phema_0.100_000003.pt")  # a set without one of its snapshots is not resumed from
    third = run_script(common + ["--resume_checkpoint", tmp_path / "a" / "model000003.pt"], tmp_path / "c")
    assert third.returncode == 2 and "incomplete" in third.stderr and "phema_0.100_000003.pt" in third.stderr

    out = tmp_path / "ema_0.080.pt"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "reconstruct_ema.py"), "--log_dir",
                           str(tmp_path / "b"), "--std", "0.08", "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    flags = model_and_diffusion_defaults()
    flags.update(image_size=32, num_channels=16, num_res_blocks=1, channel_mult="1,2", attention_resolutions="16",
                 diffusion_steps=50, class_cond=True, learn_sigma=True)
    model, _ = create_model_and_diffusion(**flags)
    load_state_dict_strict(model, load_file(str(out)))
