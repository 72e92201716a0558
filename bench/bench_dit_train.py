"""DiT training from images vs from pre-extracted features, and --grad-checkpoint: `python bench/bench_dit_train.py`.

Runs the real scripts (DiT/extract_features.py, DiT/train.py) in fresh processes on a folder of random 256-px images
with a VAE of the SD VAE's architecture (random weights: the time does not depend on their values) and prints one
JSON line per measurement:

* extraction: images per second (each image and its mirror go through the VAE encoder);
* train steps per second, images path vs feature path, for each --models (the median of the logged rates after the
  first step, which compiles), and the ratio;
* peak resident memory and steps per second of --grad-model with and without --grad-checkpoint (feature path, so the
  VAE's memory does not hide the DiT's).
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, ROOT, os.path.join(ROOT, "DiT")]  # bench/, the repository root, DiT's modules
from timing import emit  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from autoencoder import AutoencoderKL  # noqa: E402
from guided_diffusion.state_dicts import module_state_dict  # noqa: E402

DIT = os.path.join(ROOT, "DiT")
#: The architecture of stabilityai/sd-vae-ft-ema / -mse (their config.json's fields that shape the network).
SD_VAE_CONFIG = dict(
    _class_name="AutoencoderKL", act_fn="silu", block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, in_channels=3,
    out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, sample_size=256,
    scaling_factor=0.18215,
)
STEPS_RE = re.compile(r"Train Steps/Sec: ([\d.]+)")


def make_vae_folder(folder: str) -> None:
    """A diffusers-layout VAE folder with the SD VAE's architecture and random weights."""
    from safetensors.numpy import save_file

    os.makedirs(folder, exist_ok=True)
    vae = AutoencoderKL.from_config(SD_VAE_CONFIG)
    save_file({k: np.ascontiguousarray(v) for k, v in module_state_dict(vae).items()},
              os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(SD_VAE_CONFIG, f)


def make_image_folder(folder: str, n: int, size: int) -> None:
    """`n` random RGB images of size x size in two class folders."""
    rng = np.random.RandomState(0)
    for i in range(n):
        path = os.path.join(folder, "class%d" % (i % 2), "%04d.png" % i)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(rng.randint(0, 256, size=(size, size, 3), dtype=np.uint8)).save(path)


def run_script(args, cwd: str):
    """Run a DiT script; returns (stdout + stderr, wall seconds, peak resident memory of the process in GiB)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable] + args, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit("%s failed (exit %d):\n%s" % (" ".join(args[:1]), proc.returncode, out[-4000:]))
    return out, wall, round(usage.ru_maxrss / 2 ** 20, 3)


def train(work: str, model: str, source: list, steps: int, batch: int, image_size: int, vae: str, extra=()):
    """Train `steps` steps (one per epoch); returns (median steps/s after the first logged step, peak RSS GiB)."""
    results = tempfile.mkdtemp(dir=work, prefix="results-")
    args = [os.path.join(DIT, "train.py"), "--model", model, "--image-size", str(image_size), "--num-classes", "2",
            "--batch-size", str(batch), "--epochs", str(steps), "--log-every", "1", "--ckpt-every", "1000000",
            "--vae-path", vae, "--results-dir", results, "--global-seed", "0"] + source + list(extra)
    out, _, rss = run_script(args, work)
    shutil.rmtree(results, ignore_errors=True)  # the final checkpoint (up to GBs)
    rates = [float(r) for r in STEPS_RE.findall(out)]
    if len(rates) < 2:
        raise SystemExit("train.py logged %d rates:\n%s" % (len(rates), out[-3000:]))
    return statistics.median(rates[1:]), rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8, help="global batch of every training run")
    parser.add_argument("--steps", type=int, default=4, help="training steps per run (the first compiles)")
    parser.add_argument("--models", default="DiT-S/2,DiT-B/4", help="models timed on both paths")
    parser.add_argument("--grad-model", default="DiT-B/2", help="model timed with and without --grad-checkpoint")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed after)")
    args = parser.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="bench_dit_train-")
    try:
        vae, data, feats = (os.path.join(work, n) for n in ("vae", "data", "features"))
        make_vae_folder(vae)
        make_image_folder(data, args.batch, args.image_size)  # one step per epoch

        extract = [os.path.join(DIT, "extract_features.py"), "--data-path", data, "--features-path", feats,
                   "--image-size", str(args.image_size), "--vae-path", vae, "--batch-size", str(args.batch)]
        run_script(extract + ["--max-shards", "0"], work)  # compiles the encoder (and writes the features)
        shutil.rmtree(feats)
        _, wall, rss = run_script(extract, work)  # warm: the kernels are cached
        emit(dict(bench="dit_extract_features", image_size=args.image_size, images=args.batch,
                  images_per_s=round(args.batch / wall, 3), wall_s=round(wall, 2), process_peak_rss_gib=rss,
                  note="wall time of the whole warm process (start-up, VAE load, encoding of each image and mirror)"))

        for model in filter(None, args.models.split(",")):  # --models "" times only --grad-model
            rates = {}
            for path, source in (("images", ["--data-path", data]), ("features", ["--feature-path", feats])):
                rates[path], rss = train(work, model, source, args.steps, args.batch, args.image_size, vae)
                emit(dict(bench="dit_train_step", model=model, path=path, image_size=args.image_size,
                          batch=args.batch, steps_per_s=round(rates[path], 4), process_peak_rss_gib=rss))
            emit(dict(bench="dit_train_speedup", model=model, image_size=args.image_size, batch=args.batch,
                      features_over_images=round(rates["features"] / rates["images"], 2)))

        plain = checkpointed = None
        for extra in ((), ("--grad-checkpoint",)):
            rate, rss = train(work, args.grad_model, ["--feature-path", feats], args.steps, args.batch,
                              args.image_size, vae, extra)
            emit(dict(bench="dit_grad_checkpoint", model=args.grad_model, grad_checkpoint=bool(extra),
                      image_size=args.image_size, batch=args.batch, steps_per_s=round(rate, 4),
                      process_peak_rss_gib=rss))
            if extra:
                checkpointed = (rate, rss)
            else:
                plain = (rate, rss)
        emit(dict(bench="dit_grad_checkpoint_cost", model=args.grad_model, batch=args.batch,
                  memory_ratio=round(checkpointed[1] / plain[1], 3),
                  step_time_ratio=round(plain[0] / checkpointed[0], 3)))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
