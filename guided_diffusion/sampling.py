"""
The one sampling implementation shared by every sampling script (ADM and DiT).

* ``generate_samples``: the batch loop. Work is split into global batches (``batch_size`` images each, the last
  one possibly smaller); under MPI rank ``r`` computes batches ``r, r + W, ...`` and rank 0 gathers them. Every
  finished batch is written to ``samples_{N}.partial/`` as soon as it completes, so an interrupted run keeps its
  work and the same command resumes where it stopped. Batches seed themselves from their index, so the result
  does not depend on the number of ranks or on interruptions. When every batch exists, rank 0 streams them into
  ``samples_{N}x{H}x{W}x3.npz`` (``arr_0`` uint8 NHWC, ``arr_1`` int64 labels when there are labels: the layout
  ``evaluations/evaluator.py`` and ``np.load`` read) without ever holding the whole set in memory, writes a PNG
  grid beside it and removes the partial folder. The final file appears only when complete (atomic rename).
* ``to_uint8_images`` / ``save_image_grid``: the conversions and the one grid writer.
* Helpers that turn flags into loaded models, labels, seeds and a sampling call, so entry scripts stay wiring.
"""

import json
import math
import os
import re
import shutil
import zipfile
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from . import seeding
from .errors import CheckpointError, InputCheck, UserError

SampleBatchFn = Callable[[int, int], Tuple[np.ndarray, Optional[np.ndarray]]]

_PARTS_META = "meta.json"
_GRID_MAX_IMAGES = 64


# ----------------------------------------------------------------------------------------------- images


def to_uint8_images(x) -> np.ndarray:
    """Model output in [-1, 1] (NCHW Var or array) -> uint8 NHWC, truncating like the reference scripts."""
    arr = x.numpy() if hasattr(x, "numpy") else np.asarray(x)
    arr = arr.astype(np.float32, copy=False)
    arr = np.clip((arr + 1.0) * 127.5, 0.0, 255.0).astype(np.uint8)
    return np.ascontiguousarray(arr.transpose(0, 2, 3, 1))


def make_image_grid(images: np.ndarray, nrow: Optional[int] = None, padding: int = 2) -> np.ndarray:
    """Tile uint8 NHWC images into one uint8 HWC image, `nrow` images per row (default: a near-square grid)."""
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError("make_image_grid expects uint8 NHWC images, got %s %s" % (images.dtype, images.shape))
    n, h, w, c = images.shape
    if n == 0:
        raise ValueError("make_image_grid needs at least one image")
    if nrow is None:
        nrow = int(math.ceil(math.sqrt(n)))
    ncol = max(1, min(nrow, n))
    nrows = int(math.ceil(n / ncol))
    grid = np.zeros((padding + nrows * (h + padding), padding + ncol * (w + padding), c), dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, ncol)
        y = padding + r * (h + padding)
        x = padding + col * (w + padding)
        grid[y:y + h, x:x + w] = images[i]
    return grid


def save_image_grid(images: np.ndarray, path: str, nrow: Optional[int] = None) -> None:
    """Write uint8 NHWC images as one PNG grid, atomically (the one grid writer of the project)."""
    from PIL import Image

    from .checkpoint import atomic_write

    grid = make_image_grid(images, nrow=nrow)
    if grid.shape[2] == 1:
        grid = grid[:, :, 0]
    with atomic_write(path, "wb") as f:
        Image.fromarray(grid).save(f, format="PNG")


# ----------------------------------------------------------------------------------------------- npz streaming


def write_npz_streaming(path: str, shape: Sequence[int], chunks: Iterable[np.ndarray],
                        labels: Optional[np.ndarray] = None) -> None:
    """Write an np.savez-compatible .npz (arr_0 = the concatenated uint8 chunks, arr_1 = labels) chunk by chunk.

    Only one chunk is in memory at a time; the file appears at `path` only when everything was written.
    """
    from .checkpoint import atomic_write

    shape = tuple(int(s) for s in shape)
    expected = int(np.prod(shape))
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": shape}
    with atomic_write(path, "wb") as f:
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            written = 0
            with zf.open("arr_0.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_1_0(member, header)
                for chunk in chunks:
                    chunk = np.ascontiguousarray(chunk)
                    if chunk.dtype != np.uint8 or chunk.shape[1:] != shape[1:]:
                        raise ValueError("chunk %s %s does not fit arr_0 of shape %s"
                                         % (chunk.dtype, chunk.shape, shape))
                    member.write(chunk.tobytes())
                    written += chunk.size
            if written != expected:
                raise ValueError("wrote %d values into arr_0, expected %d" % (written, expected))
            if labels is not None:
                labels = np.ascontiguousarray(labels, dtype=np.int64)
                if labels.shape != (shape[0],):
                    raise ValueError("labels of shape %s do not fit %d images" % (labels.shape, shape[0]))
                with zf.open("arr_1.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, labels, allow_pickle=False)


def samples_npz_name(num_samples: int, image_shape: Sequence[int]) -> str:
    """The reference's output name: samples_{N}x{H}x{W}x{C}.npz."""
    return "samples_%s.npz" % "x".join(str(int(s)) for s in (num_samples,) + tuple(image_shape))


# ----------------------------------------------------------------------------------------------- the batch loop


def _batch_sizes(num_samples: int, batch_size: int) -> List[int]:
    full, rest = divmod(num_samples, batch_size)
    return [batch_size] * full + ([rest] if rest else [])


def _part_path(parts_dir: str, batch_index: int) -> str:
    return os.path.join(parts_dir, "batch_%06d.npz" % batch_index)


def _read_part(path: str) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    with np.load(path, allow_pickle=False) as data:
        images = data["images"]
        labels = data["labels"] if "labels" in data.files else None
    return images, labels


def _write_part(path: str, images: np.ndarray, labels: Optional[np.ndarray]) -> None:
    from .checkpoint import atomic_write

    arrays = {"images": images}
    if labels is not None:
        arrays["labels"] = labels
    with atomic_write(path, "wb") as f:
        np.savez(f, **arrays)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _run_meta(num_samples: int, batch_size: int, run_config: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    return {"num_samples": int(num_samples), "batch_size": int(batch_size),
            "run_config": _jsonable(dict(run_config)) if run_config is not None else None}


def _check_meta(path: str, meta: Mapping[str, Any], what: str, fix: str) -> None:
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        saved = None
    if saved is None or saved.get("num_samples") != meta["num_samples"] or \
            saved.get("batch_size") != meta["batch_size"] or saved.get("run_config") != meta["run_config"]:
        diffs = []
        if saved is not None:
            for key in ("num_samples", "batch_size"):
                if saved.get(key) != meta[key]:
                    diffs.append("--%s %s (now %s)" % (key, saved.get(key), meta[key]))
            old_cfg, new_cfg = saved.get("run_config") or {}, meta["run_config"] or {}
            for key in sorted(set(old_cfg) | set(new_cfg)):
                if old_cfg.get(key) != new_cfg.get(key):
                    diffs.append("--%s %s (now %s)" % (key, old_cfg.get(key), new_cfg.get(key)))
        detail = (": it was made with " + ", ".join(diffs)) if diffs else " (its settings file is missing)"
        raise UserError("%s was made by a run with different settings%s. %s" % (what, detail, fix))


def _gather(arr: np.ndarray, world: int) -> List[np.ndarray]:
    if world == 1:
        return [arr]
    from . import dist_util

    return dist_util.all_gather_array(arr)


def _log(msg: str) -> None:
    try:
        from . import logger

        logger.log(msg)
    except ImportError:  # pragma: no cover - logger is part of the package
        print(msg)


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
    from tqdm.auto import tqdm

    from . import dist_util

    check_count(num_samples, "--num_samples")
    check_count(batch_size, "--batch_size")
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    sizes = _batch_sizes(num_samples, batch_size)
    nbatches = len(sizes)
    meta = _run_meta(num_samples, batch_size, run_config)
    parts_dir = os.path.join(out_dir, "samples_%d.partial" % num_samples)
    fix = ("Rerun with the same flags to continue it, or delete %s (or choose another OPENAI_LOGDIR) "
           "to start over." % parts_dir)

    # Finished before? Then there is nothing to do (a different run must not overwrite it).
    done = np.zeros(nbatches, dtype=np.uint8)
    final_path = None
    if rank == 0:
        final_path = _find_final(out_dir, num_samples, image_shape)
        if final_path is not None:
            _check_meta(_sidecar(final_path), meta, final_path,
                        "Move it away or choose another OPENAI_LOGDIR (log dir) to sample again.")
            done[:] = 1
            shutil.rmtree(parts_dir, ignore_errors=True)  # left over if a run stopped right after finishing
        elif os.path.isdir(parts_dir):
            _check_meta(os.path.join(parts_dir, _PARTS_META), meta, parts_dir, fix)
            for b in range(nbatches):
                done[b] = os.path.exists(_part_path(parts_dir, b))
        else:
            os.makedirs(parts_dir, exist_ok=True)
            from .checkpoint import atomic_write

            with atomic_write(os.path.join(parts_dir, _PARTS_META), "w") as f:
                json.dump(meta, f, indent=1, sort_keys=True)
    done = _gather(done, world)[0]
    if done.all() and _gather(np.array([final_path is not None], dtype=np.uint8), world)[0][0]:
        _log("%s is already complete; nothing to do" % final_path)
        if world > 1:
            dist_util.barrier()
        return final_path if final_path is not None else ""
    pending = [b for b in range(nbatches) if not done[b]]
    if rank == 0 and len(pending) < nbatches:
        _log("resuming: %d of %d batches already done in %s" % (nbatches - len(pending), nbatches, parts_dir))
    elif rank == 0:
        _log("finished batches are kept in %s until all are done; if this run is interrupted, the same command "
             "with OPENAI_LOGDIR=%s continues it" % (parts_dir, os.path.abspath(out_dir)))

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
                _write_part(_part_path(parts_dir, b), imgs, labs)
                bar.update(1)
                finished += len(imgs)
            _log("created %d samples" % finished)
    bar.close()

    path = os.path.join(out_dir, samples_npz_name(num_samples, image_shape)) if image_shape is not None else ""
    if rank == 0:
        path = _assemble(parts_dir, out_dir, num_samples, sizes, image_shape, meta)
        _log("sampling complete: %s" % path)
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


def _sidecar(npz_path: str) -> str:
    return npz_path[: -len(".npz")] + ".json"


def _find_final(out_dir: str, num_samples: int, image_shape) -> Optional[str]:
    if image_shape is not None:
        path = os.path.join(out_dir, samples_npz_name(num_samples, image_shape))
        return path if os.path.exists(path) else None
    pattern = re.compile(r"samples_%dx\d+x\d+x\d+\.npz$" % num_samples)
    found = sorted(n for n in os.listdir(out_dir) if pattern.match(n)) if os.path.isdir(out_dir) else []
    return os.path.join(out_dir, found[0]) if found else None


def _assemble(parts_dir: str, out_dir: str, num_samples: int, sizes: List[int], image_shape,
              meta: Mapping[str, Any]) -> str:
    """Stream the finished batches into the final .npz (+ PNG grid, settings file); remove the partial folder."""
    from .checkpoint import atomic_write

    first, first_labels = _read_part(_part_path(parts_dir, 0))
    shape = tuple(int(s) for s in first.shape[1:])
    if image_shape is not None and shape != tuple(image_shape):
        raise UserError("%s holds images of shape %s, expected %s; delete it to start over"
                        % (parts_dir, shape, tuple(image_shape)))
    has_labels = first_labels is not None

    def load(b: int) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        images, labs = _read_part(_part_path(parts_dir, b))
        if images.shape != (sizes[b],) + shape or (labs is not None) != has_labels:
            raise UserError("%s does not fit this run (images %s, labels %s); delete %s to start over"
                            % (_part_path(parts_dir, b), images.shape, labs is not None, parts_dir))
        return images, labs

    # Labels are tiny: collect them first so arr_1 can follow arr_0 in a single pass over the images.
    all_labels = (np.concatenate([_read_part_labels(_part_path(parts_dir, b)) for b in range(len(sizes))])
                  if has_labels else None)
    grid, count = [], 0
    for b in range(len(sizes)):
        if count >= _GRID_MAX_IMAGES:
            break
        grid.append(load(b)[0][: _GRID_MAX_IMAGES - count])
        count += len(grid[-1])
    final_path = os.path.join(out_dir, samples_npz_name(num_samples, shape))
    save_image_grid(np.concatenate(grid), final_path[: -len(".npz")] + ".png")
    with atomic_write(_sidecar(final_path), "w") as f:
        json.dump(dict(meta, image_shape=list(shape), labels=has_labels), f, indent=1, sort_keys=True)
    # The .npz is renamed into place last: when it exists, it is complete.
    write_npz_streaming(final_path, (num_samples,) + shape, (load(b)[0] for b in range(len(sizes))), all_labels)
    shutil.rmtree(parts_dir, ignore_errors=True)
    return final_path


def _read_part_labels(path: str) -> np.ndarray:
    with np.load(path, allow_pickle=False) as data:
        if "labels" not in data.files:
            raise UserError("%s has no labels while other batches do; delete its folder to start over" % path)
        return data["labels"].astype(np.int64)


# ----------------------------------------------------------------------------------------------- flags -> models

#: --help text for the flags the reference scripts leave undocumented (applied with `document_flags`).
FLAG_HELP: Dict[str, str] = {
    "clip_denoised": "clamp each predicted x_0 to [-1, 1] while sampling (reference default True)",
    "num_samples": "number of images to generate in total (split across MPI ranks)",
    "batch_size": "images per batch (each MPI rank samples one batch at a time)",
    "use_ddim": "sample with DDIM (deterministic, eta 0) instead of DDPM: the same as --sampler ddim",
    "sampler": "ddpm (the reference's ancestral sampling), ddim (eta 0), dpm++2m or dpm++3m (DPM-Solver++ "
               "multistep, 10-20 steps; recommended: --timestep_respacing logsnr15 with the linear schedule, whose "
               "grid is uniform in log-SNR as the solver wants; with the cosine schedule ddim15, because its last "
               "timesteps (alpha_bar down to 2e-9) amplify an imperfect model's x_0 prediction and a log-SNR grid "
               "crowds its steps there); unset: ddpm, or ddim with --use_ddim True",
    "model_path": "diffusion model checkpoint (.pt), e.g. models/256x256_diffusion.pt (scripts/download_models.py)",
    "classifier_path": "noisy-image classifier checkpoint (.pt), e.g. models/256x256_classifier.pt",
    "classifier_scale": "strength of classifier guidance: the gradient of log p(y|x_t) is multiplied by this",
    "seed": "random seed; batch i draws its labels and noise from (seed, i), so runs are reproducible, independent "
            "of the number of MPI ranks, and an interrupted run can be continued by repeating the command",
    "class_labels": "comma-separated class ids used in turn for the samples (e.g. 207 or 1,2,3); "
                    "empty: a random class per sample",
    "timestep_respacing": "sampling steps taken from --diffusion_steps: a number (e.g. 250), comma-separated "
                          "section counts, ddimN (DDIM's even stride, e.g. ddim25), or logsnrN (N steps uniform in "
                          "log-SNR, for the dpm++ samplers); empty: all steps",
    "diffusion_steps": "number of steps of the diffusion process the model was trained with",
    "use_fp16": "run the model's convolutions in float16 (GPU only; on a CPU the model stays float32 with a notice)",
    "classifier_use_fp16": "run the classifier in float16 (GPU only; on a CPU it stays float32)",
    "class_cond": "the model is class-conditional (its checkpoint has label_emb.weight)",
    "learn_sigma": "the model predicts the variance too (6 output channels)",
    "image_size": "image height and width in pixels",
    "num_channels": "base channel count of the UNet (released models: 192 at 64x64, 256 at 128-512)",
    "num_res_blocks": "residual blocks per resolution level",
    "num_heads": "attention heads (used when --num_head_channels is -1)",
    "num_heads_upsample": "attention heads in the decoder (-1: same as --num_heads)",
    "num_head_channels": "channels per attention head (-1: use --num_heads heads instead)",
    "attention_resolutions": "comma-separated feature-map sizes (in pixels) that get self-attention",
    "channel_mult": "comma-separated channel multipliers per level (empty: the default for --image_size)",
    "dropout": "dropout rate the model was built with (no effect when sampling)",
    "use_checkpoint": "gradient checkpointing (training only; no effect when sampling)",
    "use_scale_shift_norm": "the ResBlocks condition on the timestep with scale and shift (FiLM)",
    "resblock_updown": "up/downsample with residual blocks instead of plain layers",
    "use_new_attention_order": "split q, k, v before the heads (64x64 released model: True)",
    "noise_schedule": "beta schedule of the diffusion process: linear or cosine",
    "use_kl": "the model was trained with the variational bound loss (no effect when sampling)",
    "predict_xstart": "the model predicts x_0 instead of the noise",
    "rescale_timesteps": "the model takes timesteps scaled to 0..1000",
    "rescale_learned_sigmas": "training loss weighting (no effect when sampling)",
    "large_size": "output size of the super-resolution model",
    "small_size": "size of the low-resolution input (--base_samples images)",
    "classifier_width": "base channel count of the classifier",
    "classifier_depth": "residual blocks per level of the classifier",
    "classifier_attention_resolutions": "comma-separated feature-map sizes with attention in the classifier",
    "classifier_use_scale_shift_norm": "the classifier's ResBlocks use scale and shift conditioning",
    "classifier_resblock_updown": "the classifier downsamples with residual blocks",
    "classifier_pool": "the classifier's output head: attention, adaptive, spatial or spatial_v2",
    "base_samples": ".npz of low-resolution samples (arr_0 uint8 NHWC, arr_1 labels when --class_cond True) "
                    "to upsample, e.g. the output of classifier_sample.py at 64x64",
    "data_dir": "folder of images to evaluate (searched recursively)",
}


def document_flags(parser, extra: Optional[Mapping[str, str]] = None) -> None:
    """Attach --help text to flags created by add_dict_to_argparser (which creates them without help).

    Scripts build their parser with argparse.ArgumentDefaultsHelpFormatter so every flag shows its default.
    """
    helps = dict(FLAG_HELP)
    helps.update(extra or {})
    for action in parser._actions:
        if action.dest in helps and not action.help:
            action.help = helps[action.dest]


def check_respacing(timestep_respacing: str, diffusion_steps: int, use_ddim: bool = False,
                    noise_schedule: str = "linear") -> None:
    """Refuse a --timestep_respacing that does not fit --diffusion_steps (every sampler takes any spacing)."""
    from .gaussian_diffusion import get_named_beta_schedule
    from .respace import space_timesteps

    spacing = (timestep_respacing or "").strip()
    if not spacing:
        return
    try:
        betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    except (NotImplementedError, ValueError):
        raise UserError("unknown --noise_schedule %r: use linear or cosine" % noise_schedule) from None
    try:
        kept = space_timesteps(diffusion_steps, spacing, betas=betas)
    except ValueError as exc:
        raise UserError("--timestep_respacing %r does not fit --diffusion_steps %d (%s); use e.g. 250 or ddim25"
                        % (timestep_respacing, diffusion_steps, exc)) from None
    if not kept:
        raise UserError("--timestep_respacing %r keeps no step; use e.g. 250 or ddim25" % timestep_respacing)


def check_count(value: int, flag: str) -> None:
    """Refuse a count flag (--num_samples, --batch_size, ...) below 1."""
    if value < 1:
        raise UserError("%s must be at least 1 (got %d)" % (flag, value))


def check_sampling_flags(check: InputCheck, args) -> None:
    """Record, in `check`, the problems of the flags every sampling script shares (counts, respacing)."""
    for flag in ("num_samples", "batch_size"):
        if hasattr(args, flag):
            check(check_count, getattr(args, flag), "--" + flag)
    if hasattr(args, "timestep_respacing"):
        check(check_respacing, args.timestep_respacing, getattr(args, "diffusion_steps", 1000),
              noise_schedule=getattr(args, "noise_schedule", "linear"))
    if hasattr(args, "sampler"):
        check(resolve_sampler, args.sampler, getattr(args, "use_ddim", False))


def require_file(path: str, *, what: str, flag: str) -> None:
    """Fail early (before building anything) when a checkpoint flag is empty or names no file."""
    if not path:
        raise UserError("%s is required: give the %s checkpoint (.pt)" % (flag, what))
    if "://" not in path and not os.path.isfile(path):
        raise CheckpointError("%s %s: %s file not found; check the path (scripts/download_models.py downloads "
                              "the released checkpoints)" % (flag, path, what))


def load_weights(module, path: str, *, what: str = "model", flag: str = "--model_path") -> None:
    """Load a checkpoint into `module` strictly (a clear CheckpointError naming fitting flags on mismatch)."""
    from . import checkpoint, dist_util

    require_file(path, what=what, flag=flag)
    state = dist_util.load_state_dict(path, map_location="cpu")
    if isinstance(state, Mapping) and not any(isinstance(v, np.ndarray) for v in state.values()):
        for key in ("ema", "model", "state_dict"):  # a training checkpoint holding the state dict inside
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping):
        raise CheckpointError("%s %s does not hold a state dict (found %s)" % (flag, path, type(state).__name__))
    checkpoint.load_state_dict_strict(module, state, source="%s %s" % (flag, path))


def _build(factory: Callable, kwargs: Mapping[str, Any]):
    try:
        return factory(**kwargs)
    except UserError:
        raise
    except (ValueError, AssertionError) as exc:
        raise UserError("the model flags cannot build a model: %s" % (exc or type(exc).__name__)) from None


def load_model_and_diffusion(args, keys: Iterable[str], *, model_path: str, flag: str = "--model_path",
                             factory: Optional[Callable] = None, **overrides):
    """Build (model, diffusion) from the flags in `keys`, load `model_path` strictly, convert to fp16 if asked."""
    from . import script_util

    factory = factory or script_util.create_model_and_diffusion
    kwargs = script_util.args_to_dict(args, keys)
    kwargs.update(overrides)
    check_respacing(kwargs.get("timestep_respacing", ""), kwargs.get("diffusion_steps", 1000),
                    noise_schedule=kwargs.get("noise_schedule", "linear"))
    require_file(model_path, what="diffusion model", flag=flag)
    model, diffusion = _build(factory, kwargs)
    load_weights(model, model_path, what="diffusion model", flag=flag)
    if kwargs.get("use_fp16"):
        model.convert_to_fp16()
    model.eval()
    return model, diffusion


def load_classifier(args):
    """Build the classifier from the classifier_* flags and load --classifier_path strictly."""
    from . import script_util

    kwargs = script_util.args_to_dict(args, script_util.classifier_defaults().keys())
    require_file(args.classifier_path, what="classifier", flag="--classifier_path")
    classifier = _build(script_util.create_classifier, kwargs)
    load_weights(classifier, args.classifier_path, what="classifier", flag="--classifier_path")
    if kwargs.get("classifier_use_fp16"):
        classifier.convert_to_fp16()
    classifier.eval()
    return classifier


def parse_class_labels(spec: str, num_classes: int) -> Optional[List[int]]:
    """--class_labels "1,2,3" -> [1, 2, 3] (checked against the number of classes); "" -> None (random)."""
    spec = (spec or "").strip()
    if not spec:
        return None
    try:
        labels = [int(s) for s in spec.replace(" ", ",").split(",") if s]
    except ValueError:
        raise UserError("--class_labels must be comma-separated class ids such as 1,2,3; got %r" % spec) from None
    bad = [y for y in labels if not 0 <= y < num_classes]
    if bad or not labels:
        raise UserError("--class_labels %s: class ids must lie in 0..%d for this model" % (spec, num_classes - 1))
    return labels


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


#: --sampler's choices: the reference's two loops and DPM-Solver++ multistep of order 2 and 3.
SAMPLERS = ("ddpm", "ddim", "dpm++2m", "dpm++3m")
_DPM_ORDERS = {"dpm++2m": 2, "dpm++3m": 3}


def resolve_sampler(sampler: str, use_ddim: bool = False) -> str:
    """--sampler with --use_ddim folded in (--use_ddim True means --sampler ddim); unset means ddpm."""
    name = (sampler or "").strip().lower()
    if name and name not in SAMPLERS:
        raise UserError("unknown --sampler %r: choose one of %s" % (sampler, ", ".join(SAMPLERS)))
    if use_ddim:
        if name and name != "ddim":
            raise UserError("--use_ddim True asks for DDIM but --sampler is %s: give only one of them" % name)
        return "ddim"
    return name or "ddpm"


def run_diffusion(diffusion, model_fn, shape: Sequence[int], *, sampler: str = "ddpm", noise=None,
                  clip_denoised: bool = True, model_kwargs: Optional[Dict[str, Any]] = None, cond_fn=None,
                  progress: bool = True):
    """One sampling loop (p_sample_loop, ddim_sample_loop or dpm_solver_sample_loop, by `sampler`), returning the
    final x_0 batch."""
    kwargs = dict(noise=noise, clip_denoised=clip_denoised, model_kwargs=model_kwargs or {}, cond_fn=cond_fn,
                  progress=progress)
    shape = tuple(int(s) for s in shape)
    if sampler in _DPM_ORDERS:
        return diffusion.dpm_solver_sample_loop(model_fn, shape, order=_DPM_ORDERS[sampler], **kwargs)
    if sampler == "ddim":
        return diffusion.ddim_sample_loop(model_fn, shape, **kwargs)
    if sampler == "ddpm":
        return diffusion.p_sample_loop(model_fn, shape, **kwargs)
    raise ValueError("unknown sampler %r (one of %s)" % (sampler, ", ".join(SAMPLERS)))


def label_var(labels: np.ndarray):
    """int64 numpy labels -> the int32 Var the models take."""
    import jittor as jt

    return jt.array(np.asarray(labels).astype(np.int32))


def log_dir() -> str:
    """The directory the scripts write into: logger.get_dir() (OPENAI_LOGDIR), configured if needed."""
    from . import logger

    d = logger.get_dir()
    if d is None:
        logger.configure()
        d = logger.get_dir()
    return d


def make_diffusion_sampler(diffusion, model_fn, *, image_size: int, batch_size: int, seed: int, sampler: str,
                           clip_denoised: bool = True, cond_fn=None, num_classes: Optional[int] = None,
                           fixed_labels: Optional[Sequence[int]] = None,
                           extra_kwargs: Optional[Callable[[int, int], Dict[str, Any]]] = None,
                           channels: int = 3) -> SampleBatchFn:
    """The `sample_batch` of the ADM scripts: seed from the batch index, draw labels (before the noise, as the
    reference does) when `num_classes` is given, run the `sampler` loop, return uint8 NHWC images and labels."""
    import jittor as jt

    from . import dist_util

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


def sampling_run_config(args) -> Dict[str, Any]:
    """The flags recorded with partial results (a resumed run must use the same ones)."""
    return {k: v for k, v in sorted(vars(args).items())}


# ----------------------------------------------------------------------------------------------- super-resolution


class BaseSamples:
    """The low-resolution images (and labels) of an .npz that super_res_sample.py upsamples.

    Sample i of the output is conditioned on base image i mod len(base) (the file is used cyclically, as the
    reference's load_data_for_worker does), independent of ranks and batch boundaries.
    """

    def __init__(self, path: str, small_size: int, class_cond: bool):
        if not path:
            raise UserError("--base_samples is required: give the .npz of low-resolution samples to upsample "
                            "(e.g. the output of image_sample.py or classifier_sample.py at --small_size)")
        if not os.path.isfile(path):
            raise UserError("--base_samples %s: file not found" % path)
        try:
            with np.load(path, allow_pickle=False) as data:
                self.images = data["arr_0"]
                self.labels = data["arr_1"].astype(np.int64) if "arr_1" in data.files else None
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            raise UserError("--base_samples %s is not a samples .npz with arr_0 (%s)" % (path, exc)) from None
        if self.images.ndim != 4 or self.images.shape[1:] != (small_size, small_size, 3) or \
                self.images.dtype != np.uint8 or len(self.images) == 0:
            raise UserError("--base_samples %s holds %s %s; expected uint8 images of shape N x %d x %d x 3 "
                            "(check --small_size)" % (path, self.images.dtype, self.images.shape, small_size,
                                                      small_size))
        if class_cond and self.labels is None:
            raise UserError("--base_samples %s has no labels (arr_1) but --class_cond True needs them" % path)
        self.class_cond = class_cond

    def batch(self, batch_index: int, batch_size: int, n: int) -> Dict[str, Any]:
        """model_kwargs (low_res in [-1, 1] NCHW, and y) for global batch `batch_index` of size n."""
        import jittor as jt

        idx = (batch_index * batch_size + np.arange(n)) % len(self.images)
        low_res = self.images[idx].astype(np.float32) / 127.5 - 1.0
        kwargs: Dict[str, Any] = {"low_res": jt.array(np.ascontiguousarray(low_res.transpose(0, 3, 1, 2)))}
        if self.class_cond:
            kwargs["y"] = label_var(self.labels[idx])
        return kwargs


# ----------------------------------------------------------------------------------------------- likelihood


def run_bpd_evaluation(model, diffusion, data, num_samples: int, clip_denoised: bool) -> Dict[str, np.ndarray]:
    """image_nll.py's loop: bits/dim of `num_samples` dataset images (all ranks together) with calc_bpd_loop.

    Logs the running mean bpd; rank 0 writes {vb,mse,xstart_mse}_terms.npz (arr_0: the per-timestep mean) into
    the log dir. Returns those mean terms plus "total_bpd" (the mean over batches).
    """
    import jittor as jt
    from tqdm.auto import tqdm

    from . import dist_util, logger
    from .checkpoint import atomic_write

    world = dist_util.get_world_size()
    all_bpd: List[float] = []
    all_metrics: Dict[str, List[np.ndarray]] = {"vb": [], "mse": [], "xstart_mse": []}
    num_complete = 0
    bar = tqdm(total=num_samples, desc="bits/dim", unit="img", disable=dist_util.get_rank() != 0)
    while num_complete < num_samples:
        batch, extra = next(data)
        batch = jt.array(np.asarray(batch, dtype=np.float32))
        model_kwargs = {k: label_var(v) if k == "y" else jt.array(v) for k, v in extra.items()}
        metrics = diffusion.calc_bpd_loop(model, batch, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        for key, term_list in all_metrics.items():
            terms = metrics[key].mean(dim=0).numpy()
            term_list.append(dist_util.all_reduce_mean_array(terms))
        total_bpd = dist_util.all_reduce_mean_array(np.array(metrics["total_bpd"].mean().numpy()).reshape(()))
        all_bpd.append(float(total_bpd))
        num_complete += world * batch.shape[0]
        bar.update(world * batch.shape[0])
        logger.log(f"done {num_complete} samples: bpd={np.mean(all_bpd)}")
        jt.gc()
    bar.close()

    means = {name: np.mean(np.stack(terms), axis=0) for name, terms in all_metrics.items()}
    if dist_util.get_rank() == 0:
        for name, terms in means.items():
            out_path = os.path.join(logger.get_dir(), f"{name}_terms.npz")
            logger.log(f"saving {name} terms to {out_path}")
            with atomic_write(out_path, "wb") as f:
                np.savez(f, terms)
    dist_util.barrier()
    means["total_bpd"] = np.array(np.mean(all_bpd))
    return means


# ----------------------------------------------------------------------------------------------- .npz tools


def read_npy_header(f) -> Tuple[Tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of the .npy stream `f`, leaving `f` at the start of the data."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    return np.lib.format.read_array_header_2_0(f)


def npz_array_info(path: str) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    """{member name: (shape, dtype)} of an .npz, read from the headers only (no array is loaded)."""
    out = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for name in zf.namelist():
                if not name.endswith(".npy"):
                    continue
                with zf.open(name) as f:
                    shape, _, dtype = read_npy_header(f)
                out[name[:-4]] = (tuple(shape), str(dtype))
    except (OSError, zipfile.BadZipFile, ValueError) as exc:
        raise UserError("%s is not a readable .npz (%s)" % (path, exc)) from None
    return out


def iter_npz_images(path: str, chunk: int = 256, limit: Optional[int] = None) -> Iterable[np.ndarray]:
    """Stream arr_0 of a samples .npz in chunks of images (the whole array is never loaded)."""
    info = npz_array_info(path)
    if "arr_0" not in info:
        raise UserError("%s has no arr_0 (found: %s)" % (path, ", ".join(sorted(info)) or "nothing"))
    shape, dtype = info["arr_0"]
    if len(shape) != 4 or shape[3] not in (1, 3) or np.dtype(dtype) != np.uint8:
        raise UserError("%s: arr_0 is %s %s, expected uint8 N x H x W x 3 images" % (path, dtype, shape))
    total = shape[0] if limit is None else min(shape[0], limit)
    per_image = int(np.prod(shape[1:]))
    with zipfile.ZipFile(path) as zf, zf.open("arr_0.npy") as f:
        _, fortran, _ = read_npy_header(f)
        if fortran:
            raise UserError("%s: arr_0 is stored in Fortran order; rewrite it with np.savez" % path)
        done = 0
        while done < total:
            n = min(chunk, total - done)
            raw = f.read(n * per_image)
            if len(raw) != n * per_image:
                raise UserError("%s: arr_0 is truncated" % path)
            yield np.frombuffer(raw, dtype=np.uint8).reshape((n,) + tuple(shape[1:]))
            done += n


def npz_summary(path: str) -> str:
    """A human-readable description of a samples .npz: arrays, shapes, dtypes, label statistics."""
    info = npz_array_info(path)
    lines = ["%s (%.1f MB)" % (path, os.path.getsize(path) / 1e6)]
    for name, (shape, dtype) in sorted(info.items()):
        lines.append("  %s: %s %s" % (name, dtype, "x".join(str(s) for s in shape) or "scalar"))
    if "arr_1" in info:
        with np.load(path, allow_pickle=False) as data:
            labels = data["arr_1"]
        if labels.size:
            uniq, counts = np.unique(labels, return_counts=True)
            lines.append("  labels: %d classes used, ids %d..%d, %d..%d images per class"
                         % (len(uniq), uniq.min(), uniq.max(), counts.min(), counts.max()))
    if "arr_0" in info:
        first = next(iter(iter_npz_images(path, chunk=min(64, max(1, info["arr_0"][0][0])), limit=64)), None)
        if first is not None:
            lines.append("  first %d images: pixel mean %.1f, min %d, max %d"
                         % (len(first), first.mean(), first.min(), first.max()))
    return "\n".join(lines)


def export_npz_images(path: str, out_dir: str, *, limit: Optional[int] = None, grid: bool = True,
                      grid_size: int = _GRID_MAX_IMAGES) -> int:
    """Write arr_0's images as PNGs (000000.png, ... with the label in the name when there is arr_1) and a grid."""
    from PIL import Image

    from .checkpoint import atomic_write

    info = npz_array_info(path)
    labels = None
    if "arr_1" in info:
        with np.load(path, allow_pickle=False) as data:
            labels = data["arr_1"]
    os.makedirs(out_dir, exist_ok=True)
    count, first = 0, []
    for images in iter_npz_images(path, limit=limit):
        for img in images:
            name = "%06d.png" % count if labels is None else "%06d_class%d.png" % (count, int(labels[count]))
            with atomic_write(os.path.join(out_dir, name), "wb") as f:
                Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img).save(f, format="PNG")
            if len(first) < grid_size:
                first.append(img)
            count += 1
    if grid and first:
        save_image_grid(np.stack(first), os.path.join(out_dir, "grid.png"))
    return count


def pack_images_to_npz(image_dir: str, out_path: str, *, image_size: Optional[int] = None,
                       with_labels: bool = False) -> Tuple[int, ...]:
    """Build a samples-style .npz (arr_0 uint8 NHWC; arr_1 class ids from the file-name prefix before "_" when
    `with_labels`) from a folder of images, streaming them. Images are centre-cropped to squares of
    `image_size` (as the training data loader does) or must all have one size."""
    from PIL import Image

    from .image_datasets import _list_image_files_recursively, center_crop_arr

    if not os.path.isdir(image_dir):
        raise UserError("%s is not a folder of images" % image_dir)
    files = _list_image_files_recursively(image_dir)
    if not files:
        raise UserError("%s contains no .jpg/.jpeg/.png/.gif images" % image_dir)

    def load(p: str) -> np.ndarray:
        try:
            with Image.open(p) as im:
                im = im.convert("RGB")
                arr = center_crop_arr(im, image_size) if image_size else np.asarray(im)
        except OSError as exc:
            raise UserError("cannot read image %s (%s)" % (p, exc)) from None
        return np.ascontiguousarray(arr, dtype=np.uint8)

    first = load(files[0])
    shape = (len(files),) + first.shape

    def chunks():
        for p in files:
            arr = load(p)
            if arr.shape != first.shape:
                raise UserError("%s is %s but %s is %s: pass --image_size to crop every image to one size"
                                % (p, arr.shape, files[0], first.shape))
            yield arr[None]

    labels = None
    if with_labels:
        names = [os.path.basename(p).split("_")[0] for p in files]
        index = {c: i for i, c in enumerate(sorted(set(names)))}
        labels = np.array([index[c] for c in names], dtype=np.int64)
    write_npz_streaming(out_path, shape, chunks(), labels)
    return shape


# ----------------------------------------------------------------------------------------------- released models

RELEASED_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/{file}"

#: The released checkpoints and what they are (README of openai/guided-diffusion).
RELEASED_CHECKPOINTS: Dict[str, str] = {
    "64x64_classifier.pt": "ImageNet 64x64 noisy classifier",
    "64x64_diffusion.pt": "ImageNet 64x64 class-conditional diffusion model",
    "128x128_classifier.pt": "ImageNet 128x128 noisy classifier",
    "128x128_diffusion.pt": "ImageNet 128x128 class-conditional diffusion model",
    "256x256_classifier.pt": "ImageNet 256x256 noisy classifier",
    "256x256_diffusion.pt": "ImageNet 256x256 class-conditional diffusion model",
    "256x256_diffusion_uncond.pt": "ImageNet 256x256 unconditional diffusion model",
    "512x512_classifier.pt": "ImageNet 512x512 noisy classifier",
    "512x512_diffusion.pt": "ImageNet 512x512 class-conditional diffusion model",
    "64_256_upsampler.pt": "ImageNet 64->256 super-resolution model",
    "128_512_upsampler.pt": "ImageNet 128->512 super-resolution model",
    "lsun_bedroom.pt": "LSUN bedroom unconditional diffusion model",
    "lsun_cat.pt": "LSUN cat unconditional diffusion model",
    "lsun_horse.pt": "LSUN horse unconditional diffusion model",
    "lsun_horse_nodropout.pt": "LSUN horse unconditional diffusion model (trained without dropout)",
}


def released_checkpoint_summary() -> List[str]:
    """One line per released checkpoint: name and description."""
    return ["%-28s %s" % (name[:-3], what) for name, what in RELEASED_CHECKPOINTS.items()]


def download_released_checkpoints(names: Sequence[str], models_dir: str) -> List[str]:
    """Download released checkpoints by name ("256x256_diffusion", "... .pt" or "all") into models_dir."""
    from .download import download_file

    files: List[str] = []
    for name in names:
        if name == "all":
            files.extend(RELEASED_CHECKPOINTS)
            continue
        file = name if name.endswith(".pt") else name + ".pt"
        if file not in RELEASED_CHECKPOINTS:
            raise UserError("unknown checkpoint %r; the released ones are: %s" % (
                name, ", ".join(n[:-3] for n in RELEASED_CHECKPOINTS)))
        files.append(file)
    paths = []
    for file in dict.fromkeys(files):  # keep order, drop repeats
        url = RELEASED_URL.format(file=file)
        dest = os.path.join(models_dir, file)
        paths.append(download_file(url, dest, what="the %s (%s)" % (RELEASED_CHECKPOINTS[file], file),
                                   place_hint="download %s in a browser and save it as %s"
                                              % (url, os.path.abspath(dest))))
    return paths
