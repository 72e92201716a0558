"""
The demo's data and evaluation: MNIST digits shipped with the repo (scripts/demo/mnist_5k.npz) exported to a
class-prefixed image folder that the training scripts read with --data_dir, the wrappers that turn a classifier-free
model (null label) into an unconditional model, and the "does the classifier see the requested digit" check.
"""

import os
from typing import Any, Callable, Dict, Tuple

import numpy as np
from PIL import Image

import guided_diffusion  # noqa: F401  (prepares Jittor's environment before Jittor is imported)
import jittor as jt

from guided_diffusion import script_util
from guided_diffusion.checkpoint import atomic_write, load_file, save_file
from guided_diffusion.errors import DataError
from guided_diffusion.image_grid import save_image_grid
from guided_diffusion.model_loading import build_from_flags, load_weights

#: Side of the exported images: MNIST's 28x28 digits are padded with black to the model size.
DIGIT_IMAGE_SIZE = 32
NUM_DIGITS = 10


def load_digits_npz(path: str) -> Tuple[np.ndarray, np.ndarray]:
    """Read the shipped digits (`images` uint8 N x 28 x 28, `labels` uint8 N) with a clear error when unusable."""
    if not os.path.isfile(path):
        raise DataError("%s: digits file not found; it ships with the repository as scripts/demo/mnist_5k.npz "
                        "(restore it with git)" % path)
    try:
        with np.load(path, allow_pickle=False) as data:
            images, labels = data["images"], data["labels"]
    except (OSError, ValueError, KeyError) as exc:
        raise DataError("%s is not a digits .npz with `images` and `labels` (%s); restore "
                        "scripts/demo/mnist_5k.npz with git" % (path, exc)) from None
    if images.ndim != 3 or images.dtype != np.uint8 or labels.shape != (images.shape[0],):
        raise DataError("%s holds images %s %s and labels %s; expected uint8 N x H x W images and N labels"
                        % (path, images.dtype, images.shape, labels.shape))
    return images, labels.astype(np.int64)


def pad_to_rgb(images: np.ndarray, size: int = DIGIT_IMAGE_SIZE) -> np.ndarray:
    """uint8 N x h x w grayscale -> uint8 N x size x size x 3: centred on black, gray copied to R, G and B."""
    n, h, w = images.shape
    if h > size or w > size:
        raise ValueError("images of %dx%d do not fit in %dx%d" % (h, w, size, size))
    top, left = (size - h) // 2, (size - w) // 2
    out = np.zeros((n, size, size), dtype=np.uint8)
    out[:, top:top + h, left:left + w] = images
    return np.repeat(out[..., None], 3, axis=3)


def digit_file_name(label: int, index: int) -> str:
    """`3_00012.png`: the class before the first "_", as the training data loaders expect."""
    return "%d_%05d.png" % (int(label), int(index))


def export_digits(npz_path: str, out_dir: str, size: int = DIGIT_IMAGE_SIZE) -> int:
    """Write every digit of `npz_path` as `<label>_<index>.png` (size x size RGB) into out_dir; returns the count.

    Files already present with the right name are kept (a second export is cheap); each write is atomic.
    """
    images, labels = load_digits_npz(npz_path)
    rgb = pad_to_rgb(images, size)
    os.makedirs(out_dir, exist_ok=True)
    for i, (img, label) in enumerate(zip(rgb, labels)):
        path = os.path.join(out_dir, digit_file_name(label, i))
        if os.path.exists(path):
            continue
        with atomic_write(path, "wb") as f:
            Image.fromarray(img).save(f, format="PNG")
    return len(rgb)


class NullLabelModel:
    """A classifier-free model called with its null label whatever `y` is: the unconditional prediction.

    Classifier guidance passes the requested labels to both the model and the classifier; this wrapper lets the
    classifier alone steer the class.
    """

    def __init__(self, model: Callable, null_label: int):
        self.model = model
        self.null_label = int(null_label)

    def __call__(self, x, t, y=None, **kwargs):
        null = jt.zeros((x.shape[0],), dtype="int32") + self.null_label
        return self.model(x, t, y=null, **kwargs)


def classify_images(classifier: Callable, images: np.ndarray, batch_size: int = 100,
                    num_classes: int = NUM_DIGITS) -> np.ndarray:
    """The classifier's class (among the first `num_classes` logits) for uint8 NHWC images, at t = 0."""
    preds = []
    with jt.no_grad():
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size].astype(np.float32) / 127.5 - 1.0
            x = jt.array(np.ascontiguousarray(chunk.transpose(0, 3, 1, 2)))
            t = jt.zeros((x.shape[0],), dtype="int32")
            logits = classifier(x, t)[:, :num_classes]
            preds.append(logits.numpy().argmax(axis=1))
    return np.concatenate(preds).astype(np.int64)


def guidance_accuracy(classifier: Callable, npz_path: str) -> Tuple[float, np.ndarray]:
    """(fraction of the samples of a samples .npz that the classifier assigns to their label arr_1, predictions)."""
    with np.load(npz_path, allow_pickle=False) as data:
        images, labels = data["arr_0"], data["arr_1"]
    preds = classify_images(classifier, images)
    return float(np.mean(preds == labels)), preds


def sample_figures(classifier: Callable, npz_path: str) -> Dict[str, float]:
    """What the demo checks on each run's samples: guidance accuracy, colour spread and border brightness."""
    accuracy, _ = guidance_accuracy(classifier, npz_path)
    with np.load(npz_path, allow_pickle=False) as data:
        images = data["arr_0"]
    return dict(accuracy=accuracy, count=len(images), spread=colour_spread(images), border=border_mean(images))


#: Channel multipliers of a 32x32 model or classifier (script_util's table entry for 32 pixels).
CLASSIFIER_CHANNEL_MULT_32 = (1, 2, 2, 2)

#: The demo's model flags: free_train.py with these (and --num_classes 10) made scripts/demo/free_digits.pt.
DEMO_MODEL_FLAGS: Dict[str, Any] = dict(
    image_size=DIGIT_IMAGE_SIZE, num_channels=32, channel_mult="1,2,2", num_res_blocks=1, attention_resolutions="8",
    num_heads=2, dropout=0.0, learn_sigma=False, noise_schedule="cosine", diffusion_steps=1000, class_cond=True,
    predict_xstart=True,
)
#: The demo's classifier flags: classifier_train.py with these made scripts/demo/classifier_digits.pt.
DEMO_CLASSIFIER_FLAGS: Dict[str, Any] = dict(
    image_size=DIGIT_IMAGE_SIZE, classifier_width=32, classifier_depth=1, classifier_attention_resolutions="8",
    classifier_pool="attention",
)


def load_demo_models(model_path: str, classifier_path: str, timestep_respacing: str):
    """Build the demo's free model (11-row label table), its respaced diffusion and the classifier; load both."""
    flags = script_util.model_and_diffusion_defaults()
    flags.update(DEMO_MODEL_FLAGS, timestep_respacing=timestep_respacing)
    model, diffusion = build_from_flags(script_util.create_model_and_diffusion, dict(flags, num_classes=NUM_DIGITS + 1))
    load_weights(model, model_path, what="demo diffusion model", flag="--model_path")
    model.eval()
    cflags = script_util.classifier_defaults()
    cflags.update(DEMO_CLASSIFIER_FLAGS)
    classifier = build_from_flags(script_util.create_classifier, cflags)
    load_weights(classifier, classifier_path, what="demo classifier", flag="--classifier_path")
    classifier.eval()
    return model, diffusion, classifier


def demo_diffusion(timestep_respacing: str):
    """The demo model's diffusion respaced to `timestep_respacing` (a second sampler's steps for the same model)."""
    flags = dict(script_util.model_and_diffusion_defaults(), **DEMO_MODEL_FLAGS)
    return script_util.create_gaussian_diffusion(
        steps=flags["diffusion_steps"], learn_sigma=flags["learn_sigma"], noise_schedule=flags["noise_schedule"],
        predict_xstart=flags["predict_xstart"], timestep_respacing=timestep_respacing)


def colour_spread(images: np.ndarray) -> float:
    """Mean of |R - G| and |G - B| over uint8 NHWC images, in uint8 levels: 0 for gray images such as MNIST's."""
    x = images.astype(np.float64)
    return float((np.abs(x[..., 0] - x[..., 1]).mean() + np.abs(x[..., 1] - x[..., 2]).mean()) / 2)


def border_mean(images: np.ndarray, width: int = 3) -> float:
    """Mean value of the `width`-pixel frame of uint8 NHWC images: 0 for the demo data (digits padded on black)."""
    x = images.astype(np.float64)
    frame = np.ones(x.shape[1:3], dtype=bool)
    frame[width:-width, width:-width] = False
    return float(x[:, frame].mean())


def save_digit_grid(npz_path: str, png_path: str, per_row: int) -> None:
    """The whole samples .npz as one PNG grid with `per_row` images per row (a row per digit in the demo)."""
    with np.load(npz_path, allow_pickle=False) as data:
        images = data["arr_0"]
    save_image_grid(images, png_path, nrow=per_row)


def save_demo_checkpoint(src: str, dest: str) -> int:
    """Store a training checkpoint (state dict) as float16 .pt for the repo; the loader casts back to float32.

    Returns the number of tensors written.
    """
    state = load_file(src)
    out = {k: (v.astype(np.float16) if isinstance(v, np.ndarray) and v.dtype == np.float32 else v)
           for k, v in state.items()}
    save_file(out, dest)
    return len(out)
