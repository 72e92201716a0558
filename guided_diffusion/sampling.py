"""
The one batch loop shared by every sampling script (ADM and DiT), and the pieces of a sampling call.

* ``generate_samples``: the batch loop. Work is split into global batches (``batch_size`` images each, the last
  one possibly smaller); under MPI rank ``r`` computes batches ``r, r + W, ...`` and rank 0 gathers them. Every
  finished batch is kept (``sample_store``) as soon as it completes, so an interrupted run keeps its work and the
  same command resumes where it stopped. Batches seed themselves from their index, so the result does not depend
  on the number of ranks or on interruptions. When every batch exists, rank 0 streams them into
  ``samples_{N}x{H}x{W}x3.npz`` with a PNG grid beside it.
* ``check_sampling_flags``, ``seed_batch``, ``batch_labels``, ``label_var``, ``run_diffusion`` (a walk from the
  sampler table, ``samplers.py``) and ``make_diffusion_sampler``, the ``sample_batch`` of the ADM scripts.

Loading models from flags is ``model_loading``; the writers are ``sample_store`` and ``image_grid``.
"""

import math
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import jittor as jt
import numpy as np
from tqdm.auto import tqdm

from . import dist_util, logger, sample_store, seeding
from .errors import InputCheck, UserError
from .image_grid import to_uint8_images
from .model_loading import check_count, check_respacing
from .samplers import SAMPLERS, SamplerChoice, choice_from_args, resolve_sampler, run_sampler  # noqa: F401

SampleBatchFn = Callable[[int, int], Tuple[np.ndarray, Optional[np.ndarray]]]


# ----------------------------------------------------------------------------------------------- the batch loop


def _batch_sizes(num_samples: int, batch_size: int) -> List[int]:
    full, rest = divmod(num_samples, batch_size)
    return [batch_size] * full + ([rest] if rest else [])


def _gather(arr: np.ndarray, world: int) -> List[np.ndarray]:
    if world == 1:
        return [arr]
    return dist_util.all_gather_array(arr)


def generate_samples(
    sample_batch: SampleBatchFn,
    *,
    num_samples: int,
    batch_size: int,
    out_dir: str,
    image_shape: Optional[Tuple[int, int, int]] = None,
    desc: str = "sampling",
    run_config: Optional[Mapping[str, Any]] = None,
    pad_last_batch: bool = True,
) -> str:
    """Run the batch loop shared by all sampling scripts and return the path of the finished .npz.

    `sample_batch(batch_index, n)` returns (n uint8 NHWC images, n int labels or None) for global batch
    `batch_index` and seeds itself from that index. With `pad_last_batch` (default, as the reference) n is always
    `batch_size` and the surplus of the last batch is dropped; otherwise the last call asks for the remainder.
    `run_config` (e.g. the script's flags) is recorded with the partial results; resuming with different
    settings is refused instead of mixing two runs. Returns the .npz path (other ranks: the same path when
    `image_shape` is given, else "").
    """
    check_count(num_samples, "--num_samples")
    check_count(batch_size, "--batch_size")
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    sizes = _batch_sizes(num_samples, batch_size)
    nbatches = len(sizes)
    meta = sample_store.run_meta(num_samples, batch_size, run_config)
    parts_dir = sample_store.partial_dir(out_dir, num_samples)

    # Finished before? Then there is nothing to do (a different run must not overwrite it).
    done = np.zeros(nbatches, dtype=np.uint8)
    final_path = None
    if rank == 0:
        final_path, done = sample_store.open_store(out_dir, num_samples, nbatches, image_shape, meta)
    done = _gather(done, world)[0]
    if done.all() and _gather(np.array([final_path is not None], dtype=np.uint8), world)[0][0]:
        logger.log("%s is already complete; nothing to do" % final_path)
        if world > 1:
            dist_util.barrier()
        return final_path if final_path is not None else ""
    pending = [b for b in range(nbatches) if not done[b]]
    if rank == 0 and len(pending) < nbatches:
        logger.log("resuming: %d of %d batches already done in %s" % (nbatches - len(pending), nbatches, parts_dir))
    elif rank == 0:
        logger.log("finished batches are kept in %s until all are done; if this run is interrupted, the same "
                   "command with OPENAI_LOGDIR=%s continues it" % (parts_dir, os.path.abspath(out_dir)))

    rounds = int(math.ceil(len(pending) / world))
    finished = sum(sizes[b] for b in range(nbatches) if done[b])
    bar = tqdm(total=len(pending), desc=desc, unit="batch", disable=rank != 0)
    for k in range(rounds):
        slot = k * world + rank
        mine = pending[slot] if slot < len(pending) else None
        images = labels = None
        if mine is not None:
            # Every call gets the full batch size (stable shapes: no new kernels to compile for a short last
            # batch); like the reference, the surplus of the last batch is dropped.
            n_call = batch_size if pad_last_batch else sizes[mine]
            images, labels = sample_batch(mine, n_call)
            images = np.ascontiguousarray(images)
            if images.ndim == 4 and images.shape[0] == n_call:
                images = images[: sizes[mine]]
                if labels is not None:
                    labels = np.asarray(labels)[: sizes[mine]]
            if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != sizes[mine]:
                raise ValueError("sample_batch(%d, %d) must return %d uint8 NHWC images, got %s %s"
                                 % (mine, n_call, n_call, images.dtype, images.shape))
            if image_shape is not None and tuple(images.shape[1:]) != tuple(image_shape):
                raise ValueError("sample_batch returned images of shape %s, expected %s"
                                 % (images.shape[1:], tuple(image_shape)))
            if labels is not None:
                labels = np.asarray(labels).astype(np.int64).reshape(-1)
                if labels.shape[0] != sizes[mine]:
                    raise ValueError("sample_batch returned %d labels for %d images" % (labels.shape[0], sizes[mine]))
        if world == 1:
            got = [(mine, images, labels)] if mine is not None else []
        else:
            got = _gather_round(k, world, pending, sizes, batch_size, images, labels)
        if rank == 0:
            for b, imgs, labs in got:
                sample_store.write_part(parts_dir, b, imgs, labs)
                bar.update(1)
                finished += len(imgs)
            logger.log("created %d samples" % finished)
    bar.close()

    path = ""
    if image_shape is not None:
        path = os.path.join(out_dir, sample_store.samples_npz_name(num_samples, image_shape))
    if rank == 0:
        path = sample_store.assemble(parts_dir, out_dir, num_samples, sizes, image_shape, meta)
        logger.log("sampling complete: %s" % path)
    if world > 1:
        dist_util.barrier()
    return path


def _gather_round(k: int, world: int, pending: List[int], sizes: List[int], batch_size: int,
                  images: Optional[np.ndarray], labels: Optional[np.ndarray]):
    """All-gather one round of batches (fixed-size padded arrays) and return [(batch, images, labels)] on rank 0."""
    head = np.zeros(5, dtype=np.int64)  # n, H, W, C, has_labels
    if images is not None:
        head[:] = [images.shape[0], *images.shape[1:], int(labels is not None)]
    heads = _gather(head, world)
    ref = next(h for h in heads if h[0] > 0)
    h, w, c = (int(v) for v in ref[1:4])
    buf = np.zeros((batch_size, h, w, c), dtype=np.uint8)
    lab = np.full((batch_size,), -1, dtype=np.int64)
    if images is not None:
        buf[:images.shape[0]] = images
        if labels is not None:
            lab[:labels.shape[0]] = labels
    all_images = _gather(buf, world)
    all_labels = _gather(lab, world)
    out = []
    for r in range(world):
        slot = k * world + r
        if slot >= len(pending):
            continue
        n = int(heads[r][0])
        out.append((pending[slot], all_images[r][:n], all_labels[r][:n] if heads[r][4] else None))
    return out


# ----------------------------------------------------------------------------------------------- flags, seeds, samplers


def check_sampling_flags(check: InputCheck, args) -> None:
    """Record, in `check`, the problems of the flags every sampling script shares (counts, respacing)."""
    for flag in ("num_samples", "batch_size"):
        if hasattr(args, flag):
            check(check_count, getattr(args, flag), "--" + flag)
    if hasattr(args, "timestep_respacing"):
        check(check_respacing, args.timestep_respacing, getattr(args, "diffusion_steps", 1000),
              noise_schedule=getattr(args, "noise_schedule", "linear"))
    if hasattr(args, "sampler"):
        check(choice_from_args, args)


def seed_batch(seed: int, batch_index: int) -> np.random.RandomState:
    """Seed Jittor/numpy/random for one batch from (seed, batch_index); returns a numpy RNG for its labels."""
    seeding.seed_all(seed, batch_index)
    return np.random.RandomState(seeding.derive_seed(seed, batch_index, 1))


def batch_labels(rng: np.random.RandomState, batch_index: int, batch_size: int, n: int, num_classes: int,
                 fixed: Optional[Sequence[int]] = None) -> np.ndarray:
    """Labels of one batch: `fixed` taken in turn by global sample index, else uniform random classes."""
    if fixed:
        start = batch_index * batch_size
        return np.array([fixed[(start + i) % len(fixed)] for i in range(n)], dtype=np.int64)
    return rng.randint(0, num_classes, size=(n,)).astype(np.int64)


def run_diffusion(diffusion, model_fn, shape: Sequence[int], *, sampler: Union[str, SamplerChoice] = "ddpm",
                  noise=None, clip_denoised: bool = True, model_kwargs: Optional[Dict[str, Any]] = None,
                  cond_fn=None, progress: bool = True):
    """One sampling loop, chosen from the sampler table (samplers.SAMPLERS) by `sampler` (a name or a
    SamplerChoice), returning the final x_0 batch."""
    return run_sampler(diffusion, model_fn, shape, sampler, noise=noise, clip_denoised=clip_denoised,
                       model_kwargs=model_kwargs or {}, cond_fn=cond_fn, progress=progress)


def label_var(labels: np.ndarray):
    """int64 numpy labels -> the int32 Var the models take."""
    return jt.array(np.asarray(labels).astype(np.int32))


def log_dir() -> str:
    """The directory the scripts write into: logger.get_dir() (OPENAI_LOGDIR), configured if needed."""
    d = logger.get_dir()
    if d is None:
        logger.configure()
        d = logger.get_dir()
    return d


def make_diffusion_sampler(diffusion, model_fn, *, image_size: int, batch_size: int, seed: int,
                           sampler: Union[str, SamplerChoice],
                           clip_denoised: bool = True, cond_fn=None, num_classes: Optional[int] = None,
                           fixed_labels: Optional[Sequence[int]] = None,
                           extra_kwargs: Optional[Callable[[int, int], Dict[str, Any]]] = None,
                           channels: int = 3) -> SampleBatchFn:
    """The `sample_batch` of the ADM scripts: seed from the batch index, draw labels (before the noise, as the
    reference does) when `num_classes` is given, run the `sampler` loop, return uint8 NHWC images and labels."""
    progress = dist_util.get_rank() == 0

    def sample_batch(batch_index: int, n: int):
        rng = seed_batch(seed, batch_index)
        model_kwargs: Dict[str, Any] = {}
        labels = None
        if num_classes is not None:
            labels = batch_labels(rng, batch_index, batch_size, n, num_classes, fixed_labels)
            model_kwargs["y"] = label_var(labels)
        if extra_kwargs is not None:
            model_kwargs.update(extra_kwargs(batch_index, n))
        # The diffusion loops disable gradients themselves (and re-enable them for a classifier's cond_fn).
        x = run_diffusion(diffusion, model_fn, (n, channels, image_size, image_size), sampler=sampler,
                          clip_denoised=clip_denoised, model_kwargs=model_kwargs, cond_fn=cond_fn,
                          progress=progress)
        images = to_uint8_images(x)
        del x
        jt.sync_all()
        jt.gc()
        return images, labels

    return sample_batch


#: Flags added after runs were first recorded: kept out of the record while at these defaults, so a run begun
#: before they existed resumes with the same command.
LATER_SAMPLING_FLAGS: Dict[str, Any] = {"unipc_order": 2, "unipc_variant": "bh2", "guidance_interval": "",
                                        "guidance_rescale": 0.0}


def sampling_run_config(args) -> Dict[str, Any]:
    """The flags recorded with partial results (a resumed run must use the same ones)."""
    return {k: v for k, v in sorted(vars(args).items())
            if not (k in LATER_SAMPLING_FLAGS and v == LATER_SAMPLING_FLAGS[k])}
