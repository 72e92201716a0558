"""Runs every command of README.md's "Your own data" section on a tiny 3-class folder: the ```sh blocks are run as
written, in order, in one working folder, with their NAME="..." settings replaced by tiny ones (and the fixtures'
conditional UNet standing in for the released models/256x256_diffusion.pt, its tiny VAE for DiT's)."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures")
sys.path.insert(0, os.path.join(FIXTURES, "evaluator"))

TINY_MODEL = ("--image_size 64 --num_channels 32 --num_res_blocks 1 --attention_resolutions 16 --channel_mult 1,2,2 "
              "--class_cond True --num_classes 3")
TINY_DIFFUSION = "--diffusion_steps 1000 --noise_schedule cosine --learn_sigma True"


def _fixture_unet_flags() -> str:
    with open(os.path.join(FIXTURES, "guided_diffusion", "unet64_cond_flags.json")) as f:
        flags = json.load(f)
    flags.pop("diffusion_steps"), flags.pop("noise_schedule"), flags.pop("timestep_respacing")
    return " ".join("--%s %s" % (k, v) for k, v in flags.items()) + " --num_classes 3"


#: Per ```sh block of the section, in order: the tiny value of each setting it defines.
TINY_SETTINGS = [
    {"MODEL_FLAGS": TINY_MODEL, "DIFFUSION_FLAGS": TINY_DIFFUSION,
     "TRAIN_FLAGS": "--lr 1e-4 --batch_size 3 --save_interval 3 --lr_anneal_steps 3 --log_interval 1"},
    {"PREVIEW_FLAGS": "--preview_interval 1 --max_steps 2"},
    {"MODEL_FLAGS": _fixture_unet_flags(), "DIFFUSION_FLAGS": "--diffusion_steps 1000 --noise_schedule linear"},
    {"MODEL_FLAGS": TINY_MODEL, "DIFFUSION_FLAGS": TINY_DIFFUSION,
     "SAMPLE_FLAGS": "--batch_size 3 --num_samples 6 --timestep_respacing ddim3 --use_ddim True",
     "CHECKPOINT": "runs/pets/ema_0.9999_000003.pt"},
    {"SAMPLES": "runs/pets_samples/samples_6x64x64x3.npz"},
    {"DIT_FLAGS": "--model DiT-S/4 --depth 2 --hidden-size 64 --num-heads 4 --image-size 32 --num-classes 3",
     "DIT_TRAIN_FLAGS": "--global-batch-size 3 --ckpt-every 2 --preview-every 1 --max-steps 2 --log-every 1",
     "DIT_CHECKPOINT": "runs/dit_pets/000-DiT-S-4/checkpoints/0000002.pt",
     "DIT_SAMPLE_FLAGS": "--sampler unipc --num-sampling-steps 3 --cfg-scale 4"},
]
SETTING = re.compile(r'^([A-Z_]+)=("[^"]*"|\S+)$')  # a whole line NAME="..." or NAME=word


def readme_section_blocks():
    """The ```sh blocks of README.md's "Your own data" section."""
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    start = text.index("\n## Your own data\n")
    end = text.index("\n## ", start + 1)
    return re.findall(r"```sh\n(.*?)```", text[start:end], re.S)


def tiny_script(block: str, tiny: dict) -> str:
    """The block with each NAME="..." line replaced by its tiny value (every setting must have one)."""
    lines = []
    for line in block.strip().splitlines():
        m = SETTING.match(line.strip())
        if m:
            assert m.group(1) in tiny, "README setting %s has no tiny value in this test" % m.group(1)
            line = '%s="%s"' % (m.group(1), tiny[m.group(1)])
        lines.append(line)
    defined = {SETTING.match(x.strip()).group(1) for x in lines if SETTING.match(x.strip())}
    assert defined == set(tiny), "the README block defines %s, the test expects %s" % (defined, set(tiny))
    return "\n".join(lines)


def _workspace(tmp_path):
    """A folder where the README's relative paths work: the repository's entries linked in, data/pets with 3
    classes of 3 images each whose file names carry no class, models/ with the fixture UNet."""
    work = tmp_path / "work"
    work.mkdir()
    for entry in ("image_train.py", "classifier_train.py", "free_train.py", "classifier_sample.py", "free_sample.py",
                  "scripts", "evaluations", "guided_diffusion", "DiT"):
        os.symlink(os.path.join(REPO, entry), str(work / entry))
    rng = np.random.RandomState(0)
    for c, name in enumerate(("cat", "dog", "fox")):
        os.makedirs(str(work / "data" / "pets" / name))
        for i in range(3):
            pixels = np.clip(rng.randint(0, 60, size=(72, 80, 3)) + 90 * c, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(str(work / "data" / "pets" / name / ("IMG_%04d.png" % (3 * c + i))))
    for vae in ("ema", "mse"):  # the tiny VAE in DiT's default VAE folders
        os.makedirs(str(work / "stabilityai"), exist_ok=True)
        os.symlink(os.path.join(FIXTURES, "dit", "vae_tiny"), str(work / "stabilityai" / ("sd-vae-ft-" + vae)))
    os.makedirs(str(work / "models"))
    os.symlink(os.path.join(FIXTURES, "guided_diffusion", "unet64_cond.pt"), str(work / "models" / "256x256_diffusion.pt"))
    return work


def _run(script: str, work, env) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", "-e", "-c", script], cwd=str(work), env=env, capture_output=True, text=True,
                          timeout=1500)
    assert proc.returncode == 0, "README commands failed (exit %d):\n%s\n--- stdout\n%s\n--- stderr\n%s" % (
        proc.returncode, script, proc.stdout[-3000:], proc.stderr[-5000:])
    return proc


def _finetuning_is_wired() -> bool:
    out = subprocess.run([sys.executable, os.path.join(REPO, "image_train.py"), "--help"], capture_output=True,
                         text=True).stdout
    return "--finetune_from" in out


def test_readme_own_data_commands_run_on_a_tiny_folder(tmp_path):
    from tiny_inception import build_tiny_inception_graph

    blocks = readme_section_blocks()
    assert len(blocks) == len(TINY_SETTINGS)
    work = _workspace(tmp_path)
    graph = str(tmp_path / "tiny_inception.pb")
    build_tiny_inception_graph(graph)
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
               ADM_INCEPTION_PATH=graph, ADM_INCEPTION_URL="http://127.0.0.1:9/unused")
    env.pop("OPENAI_LOGDIR", None)
    env.pop("DIFFUSION_TRAINING_TEST", None)
    settings = ""
    for index, (block, tiny) in enumerate(zip(blocks, TINY_SETTINGS)):
        script = tiny_script(block, tiny)
        if "--finetune_from" in script and not _finetuning_is_wired():
            settings += "\n".join(l for l in script.splitlines() if SETTING.match(l.strip())) + "\n"
            continue  # image_train.py has no --finetune_from yet (the loader is tested in test_state_dicts.py)
        proc = _run(settings + script, work, env)
        settings += "\n".join(l for l in script.splitlines() if SETTING.match(l.strip())) + "\n"

        if index == 0:  # training: classes from the sub-folders, classes.json, a 3-row label table
            with open(str(work / "runs" / "pets" / "classes.json")) as f:
                assert json.load(f) == ["cat", "dog", "fox"]
            log = (work / "runs" / "pets" / "log.txt").read_text()
            assert "9 images in 3 classes (from sub-folders)" in log and "cat: 3, dog: 3, fox: 3" in log
            assert "--class_from filename" in log  # the file names would say "IMG": named at start-up
            from guided_diffusion.checkpoint import load_file

            assert load_file(str(work / "runs" / "pets" / "ema_0.9999_000003.pt"))["label_emb.weight"].shape[0] == 3
        elif index == 1:  # previews after steps 1 and 2, and --max_steps ends the run at 2 with a whole set
            names = os.listdir(str(work / "runs" / "pets_previews"))
            assert {"preview_000001.png", "preview_000002.png", "model000002.pt", "opt000002.pt"} <= set(names)
            assert "model000003.pt" not in names
        elif "--finetune_from" in script:
            log = (work / "runs" / "pets_finetuned" / "log.txt").read_text()
            assert "re-initialised" in log and "label_emb.weight" in log
        elif index == 3:  # sampling by class name: labels in turn, only 0..2
            with np.load(str(work / "runs" / "pets_samples" / "samples_6x64x64x3.npz")) as data:
                assert list(data["arr_1"]) == [0, 1, 2, 0, 1, 2] and data["arr_0"].shape == (6, 64, 64, 3)
        elif index == 4:  # the reference batch of the folder, and the scores
            assert (work / "runs" / "pets_reference.npz").exists()
            assert "FID:" in proc.stdout and "Precision:" in proc.stdout
        elif index == 5:  # DiT: classes.json and previews in the experiment folder, sampling by class name
            experiment = work / "runs" / "dit_pets" / "000-DiT-S-4"
            with open(str(experiment / "classes.json")) as f:
                assert json.load(f) == ["cat", "dog", "fox"]
            assert {"preview_000001.png", "preview_000002.png"} <= set(os.listdir(str(experiment)))
            with Image.open(str(work / "runs" / "dit_pets" / "cats_and_foxes.png")) as grid:
                assert grid.size == (2 + 2 * 34, 2 + 34)


def test_tiny_settings_cover_every_setting_of_the_readme_section():
    for block, tiny in zip(readme_section_blocks(), TINY_SETTINGS):
        tiny_script(block, tiny)
