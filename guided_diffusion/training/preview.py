"""
Previews while training: every N optimizer steps, a grid sampled with the EMA weights from fixed noise and fixed
labels (a row per class, at most MAX_PREVIEW_CLASSES), written as preview_%06d.png into the log directory.

A preview changes nothing in training: the weights are put back bit for bit afterwards, the model returns to
training mode, and every training step seeds its own random draws (training.loop.seed_training_step), so the
preview's draws cannot shift them. It runs on every rank (no Jittor op runs in a rank-0-only block under MPI) and
rank 0 writes the file.
"""

import os
import random
import time
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

import jittor as jt
import numpy as np

from .. import dist_util
from ..image_datasets import UnreadableImage, area_downsample
from ..image_grid import save_image_grid, to_uint8_images
from ..samplers import SamplerChoice, sampler_choice

#: Rows of a class-conditional preview (one per class), columns of every preview.
MAX_PREVIEW_CLASSES = 8
PREVIEW_COLUMNS = 4
#: The walk: UniPC (order 2, bh2) on 10 log-SNR-uniform steps, the fast path README's "Fast sampling" recommends.
PREVIEW_SAMPLER = "unipc"
PREVIEW_RESPACING = "logsnr10"


def preview_file_name(step: int) -> str:
    """The preview grid after `step` optimizer steps."""
    return "preview_%06d.png" % step


def preview_labels(num_classes: Optional[int]) -> Optional[np.ndarray]:
    """The fixed labels of a preview grid: PREVIEW_COLUMNS of each of the first classes (None: unconditional)."""
    if not num_classes:
        return None
    rows = min(int(num_classes), MAX_PREVIEW_CLASSES)
    return np.repeat(np.arange(rows, dtype=np.int64), PREVIEW_COLUMNS)


def superres_preview_inputs(dataset, small_size: int, count: int = 2 * PREVIEW_COLUMNS,
                            seed: int = 0) -> Tuple[Dict[str, np.ndarray], np.ndarray]:
    """Fixed inputs of a super-resolution preview, read from the dataset directly (the training data order is not
    touched): the first `count` readable images area-downsampled to small_size as model_kwargs["low_res"] (with
    their labels as "y" when the dataset has them), and those inputs upsampled back as uint8 NHWC for `beside`."""
    rng = random.Random(seed)
    samples = []
    for index in range(len(dataset)):
        try:
            samples.append(dataset.get(index, rng))
        except UnreadableImage:
            continue
        if len(samples) == count:
            break
    if not samples:
        raise ValueError("no readable image in the dataset for the preview's low-resolution inputs")
    large = np.stack([image for image, _ in samples]).astype(np.float32)
    low_res = area_downsample(large, small_size)
    kwargs = {"low_res": low_res}
    if "y" in samples[0][1]:
        kwargs["y"] = np.stack([cond["y"] for _, cond in samples]).astype(np.int32)
    factor = -(-large.shape[-1] // small_size)
    upsampled = low_res.repeat(factor, axis=2).repeat(factor, axis=3)[:, :, :large.shape[-2], :large.shape[-1]]
    return kwargs, to_uint8_images(upsampled)


class PreviewGrid:
    """A callable for the training loop's periodic hooks: preview(step) samples and writes one grid.

    model: the network being trained. diffusion: a respaced diffusion for the walk (PREVIEW_RESPACING).
    averaged_state: returns the state dict (name -> numpy) of the weights to preview (the first EMA); None when
    `model` itself holds them (DiT's EMA model). shape: (channels, height, width) of one sample. labels:
    preview_labels(...), or None for an unconditional model. model_kwargs: extra fixed inputs per sample (e.g.
    low-resolution images), batch-first numpy arrays. clip_denoised: clip x_0 to [-1, 1] (pixels; not latents).
    decode: turns the walk's result into images in [-1, 1] (DiT: the VAE decoder); None: it is images already.
    beside: uint8 NHWC images, one per sample, shown left of it (super-resolution: the low-resolution input).
    """

    def __init__(self, *, model, diffusion, averaged_state: Optional[Callable[[], Mapping[str, np.ndarray]]],
                 shape: Sequence[int], out_dir: Optional[str], seed: int, labels: Optional[np.ndarray] = None,
                 model_kwargs: Optional[Dict[str, np.ndarray]] = None, sampler: Optional[SamplerChoice] = None,
                 clip_denoised: bool = True, decode: Optional[Callable[[jt.Var], jt.Var]] = None,
                 beside: Optional[np.ndarray] = None, log: Callable[[str], None] = print):
        self.model = model
        self.diffusion = diffusion
        self.averaged_state = averaged_state
        self.out_dir = out_dir
        self.labels = labels
        if labels is not None:
            self.count = len(labels)
        elif model_kwargs:
            self.count = len(next(iter(model_kwargs.values())))
        else:
            self.count = 2 * PREVIEW_COLUMNS
        self.noise = np.random.RandomState(seed).randn(self.count, *shape).astype(np.float32)
        self.model_kwargs = dict(model_kwargs or {})
        self.sampler = sampler or sampler_choice(PREVIEW_SAMPLER)
        self.clip_denoised = clip_denoised
        self.decode = decode
        if beside is not None and len(beside) != self.count:
            raise ValueError("beside holds %d images for %d samples" % (len(beside), self.count))
        self.beside = beside
        self.log = log

    def __call__(self, step: int) -> None:
        started = time.time()
        params = dict(self.model.named_parameters()) if self.averaged_state is not None else {}
        kept = {name: p.numpy().copy() for name, p in params.items()}
        was_training = self.model.is_training()
        try:
            averaged = self.averaged_state() if self.averaged_state is not None else {}
            for name, p in params.items():
                p.assign(jt.array(np.asarray(averaged[name]).astype(kept[name].dtype)))
            self.model.eval()
            kwargs = {k: jt.array(v) for k, v in self.model_kwargs.items()}
            if self.labels is not None:
                kwargs["y"] = jt.array(self.labels.astype(np.int32))
            with jt.no_grad():
                sample = self.sampler.run(self.diffusion, self.model, (self.count,) + self.noise.shape[1:],
                                          noise=jt.array(self.noise), clip_denoised=self.clip_denoised,
                                          model_kwargs=kwargs)
                if self.decode is not None:
                    sample = self.decode(sample)
                images = to_uint8_images(sample.numpy())
        finally:
            for name, p in params.items():
                p.assign(jt.array(kept[name]))
            jt.sync(list(params.values()))
            if was_training:
                self.model.train()
        if self.beside is not None:  # pairs: input, sample
            images = np.stack([self.beside, images], axis=1).reshape((-1,) + images.shape[1:])
        if dist_util.is_main_process() and self.out_dir:
            path = os.path.join(self.out_dir, preview_file_name(step))
            save_image_grid(images, path, nrow=PREVIEW_COLUMNS)
            self.log("preview after step %d: %s (%.1f s)" % (step, path, time.time() - started))
