"""Shared helpers of the sampling-script tests (fixture model flags, running an entry script, tiny checkpoints)."""

import json
import os
import subprocess
import sys
from typing import List

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures", "guided_diffusion")
UNET = os.path.join(FIXTURES, "unet64_cond.pt")


def unet_flags(skip=("timestep_respacing",)) -> List[str]:
    """The command-line flags that build the fixture 64x64 class-conditional UNet (unet64_cond.pt)."""
    with open(os.path.join(FIXTURES, "unet64_cond_flags.json")) as f:
        flags = json.load(f)
    out = []
    for k, v in flags.items():
        if k not in skip:
            out += ["--%s" % k, str(v)]
    return out


# A classifier that create_classifier's flags can build (the fixture classifier's channel_mult cannot be).
CLASSIFIER_FLAGS = ["--classifier_width", "32", "--classifier_depth", "1", "--classifier_attention_resolutions", "8"]


def run_script(script: str, args: List[str], logdir, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run an entry script (path relative to the repository) with OPENAI_LOGDIR=logdir, cwd = repository."""
    env = dict(os.environ, OPENAI_LOGDIR=str(logdir), OPENAI_LOG_FORMAT="stdout,log")
    return subprocess.run([sys.executable, os.path.join(REPO, script)] + [str(a) for a in args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def start_script(script: str, args: List[str], logdir) -> subprocess.Popen:
    """Like run_script, but return the running process."""
    env = dict(os.environ, OPENAI_LOGDIR=str(logdir), OPENAI_LOG_FORMAT="stdout,log")
    return subprocess.Popen([sys.executable, os.path.join(REPO, script)] + [str(a) for a in args], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, "exit %d\n--- stdout\n%s\n--- stderr\n%s" % (
        proc.returncode, proc.stdout[-3000:], proc.stderr[-5000:])


def assert_user_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """The script failed with run_cli's `error: ...` message containing every fragment."""
    assert proc.returncode == 2, "exit %d\n%s" % (proc.returncode, proc.stderr[-5000:])
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert lines, proc.stderr[-5000:]
    message = "\n".join(proc.stderr[proc.stderr.index("error: "):].splitlines())
    for frag in fragments:
        assert frag in message, (frag, message)


def load_samples(path: str):
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def no_samples_npz(logdir) -> bool:
    return not any(n.startswith("samples_") and n.endswith(".npz") for n in os.listdir(logdir))


def save_tiny_classifier(path: str, seed: int = 0) -> None:
    """A 64x64 classifier built from CLASSIFIER_FLAGS with seeded random weights, saved as a torch .pt file."""
    from guided_diffusion import checkpoint, script_util, state_dicts

    kw = script_util.classifier_defaults()
    kw.update(image_size=64, classifier_width=32, classifier_depth=1, classifier_attention_resolutions="8")
    state = state_dicts.module_state_dict(script_util.create_classifier(**kw))
    rng = np.random.RandomState(seed)
    for k, v in state.items():  # perturb the zero-initialised layers too, so every block carries signal
        state[k] = (v + rng.randn(*v.shape) * 0.05).astype(np.float32)
    state["out.2.c_proj.weight"] *= 20.0  # confident logits: a clear guidance signal
    checkpoint.save_file(state, path)


def classifier_log_probs(classifier_path: str, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """log p(y|x) of uint8 NHWC images under the tiny classifier at t = 0."""
    import jittor as jt

    from guided_diffusion import checkpoint, script_util, state_dicts

    kw = script_util.classifier_defaults()
    kw.update(image_size=64, classifier_width=32, classifier_depth=1, classifier_attention_resolutions="8")
    clf = script_util.create_classifier(**kw)
    state_dicts.load_state_dict_strict(clf, checkpoint.load_file(classifier_path))
    clf.eval()
    x = jt.array(images.astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0)
    with jt.no_grad():
        logits = clf(x, jt.zeros((len(images),), dtype="int32")).numpy().astype(np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) - \
        logits.max(1, keepdims=True)
    return logp[np.arange(len(labels)), labels]
