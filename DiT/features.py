"""
Pre-computed VAE features for DiT training: encode every image once, then train without the VAE.

``extract_features.py`` writes a feature folder; ``train.py --feature-path`` trains from it. For every image the
folder keeps the VAE posterior's mean and std (float32) of its centre crop (train.py's ``ImageDataset``) and of its
mirror image (the flip of ``_to_training_sample``), so a training step samples exactly the latent the image path
would: ``(mean + std * N(0, 1)) * 0.18215``, with the step's first random draw.

Layout of a feature folder:

* ``shard_NNNNN.npy``: float32 ``(images, 2, 2, C, H, W)``: per image, view 0 (as stored) and view 1 (mirrored),
  each ``[mean, std]``; shard ``s`` holds images ``s * shard_size`` onwards (memory-mapped when training).
* ``shard_NNNNN.json``: the shard's first image, its count and its unreadable images (path and reason).
* ``plan.json`` (written first) and ``index.json`` (written last, after every shard was checked): image count,
  image size, latent shape, class names, shard size, the VAE folder's name; ``labels.npy`` (int64) beside them.

Every file is written under a temporary name and then renamed, so an interrupted extraction resumes by skipping
the shards that are complete; under MPI rank r writes shards r, r + N, ...
"""

import argparse
import hashlib
import json
import os
import random
from concurrent.futures import ThreadPoolExecutor
from glob import glob
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from tqdm.auto import tqdm

import guided_diffusion  # noqa: F401  (prepares Jittor's environment before Jittor is imported)
import jittor as jt

from guided_diffusion import dist_util
from guided_diffusion.checkpoint import atomic_write
from guided_diffusion.class_labels import CLASS_RULES, ClassListing, summary_lines, write_classes
from guided_diffusion.errors import DataError, InputCheck
from guided_diffusion.image_datasets import ImageDataset, UnreadableImage

import dit_util
from autoencoder import AutoencoderKL

FORMAT = "dit-vae-features/1"
PLAN_NAME = "plan.json"
INDEX_NAME = "index.json"
LABELS_NAME = "labels.npy"
VIEWS = 2  # the image as stored and its mirror
MOMENTS = 2  # mean and std of the posterior
DIT_LATENT_CHANNELS = 4  # DiT's in_channels

# (images in [-1, 1], N x 3 x H x W float32) -> (posterior mean, posterior std), each N x C x h x w float32
Encoder = Callable[[np.ndarray], Tuple[np.ndarray, np.ndarray]]


def shard_path(folder: str, shard: int, ext: str = "npy") -> str:
    """The file of shard `shard` (ext "npy": the moments, "json": its metadata)."""
    return os.path.join(folder, "shard_%05d.%s" % (shard, ext))


def bytes_per_image(latent_shape: Sequence[int]) -> int:
    """Disk bytes one image takes: 2 views x (mean + std) x the latent shape, float32."""
    return VIEWS * MOMENTS * int(np.prod(latent_shape)) * 4


# ----------------------------------------------------------------------------------------------------------------
# Extraction
# ----------------------------------------------------------------------------------------------------------------


def feature_plan(files: Sequence[str], classes: Sequence[str], image_size: int, latent_shape: Sequence[int],
                 shard_size: int, vae_name: str, data_path: str) -> Dict[str, Any]:
    """What a feature folder holds (index.json without the final counts): the same plan is needed to resume."""
    root = os.path.abspath(data_path)
    names = "\n".join(os.path.relpath(os.path.abspath(f), root) for f in files)
    return {"format": FORMAT, "num_images": len(files), "image_size": int(image_size),
            "latent_shape": [int(s) for s in latent_shape], "classes": list(classes), "shard_size": int(shard_size),
            "num_shards": -(-len(files) // shard_size), "vae": vae_name, "data_path": root,
            "files_sha1": hashlib.sha1(names.encode("utf-8")).hexdigest(),
            "layout": "float32 (images, 2 views [as stored, mirrored], 2 [mean, std], C, H, W)"}


def vae_moments_encoder(vae: AutoencoderKL) -> Encoder:
    """An Encoder computing the posterior's mean and std exactly as DiagonalGaussianDistribution does."""
    def encode(images: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        with jt.no_grad():
            posterior = vae.encode(jt.array(images)).latent_dist
            jt.sync([posterior.mean, posterior.std])
            return posterior.mean.numpy(), posterior.std.numpy()
    return encode


def _write_json(path: str, obj: Any) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=1)


def _read_json(path: str) -> Optional[Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _shard_range(plan: Dict[str, Any], shard: int) -> Tuple[int, int]:
    first = shard * plan["shard_size"]
    return first, min(plan["num_images"], first + plan["shard_size"])


def shard_problem(folder: str, plan: Dict[str, Any], shard: int) -> Optional[str]:
    """Why shard `shard` of `folder` is not complete (None when it is): a missing, short or damaged file."""
    first, end = _shard_range(plan, shard)
    meta = _read_json(shard_path(folder, shard, "json"))
    if not isinstance(meta, dict) or meta.get("first") != first or meta.get("count") != end - first:
        return "%s is missing or does not hold images %d..%d" % (os.path.basename(shard_path(folder, shard, "json")),
                                                                 first, end - 1)
    expected = (end - first, VIEWS, MOMENTS) + tuple(plan["latent_shape"])
    try:
        arr = np.load(shard_path(folder, shard), mmap_mode="r")
    except (OSError, ValueError) as exc:
        return "%s is missing or unreadable (%s)" % (os.path.basename(shard_path(folder, shard)), exc)
    if arr.shape != expected or arr.dtype != np.float32:
        return "%s holds %s %s, expected float32 %s" % (os.path.basename(shard_path(folder, shard)), arr.dtype,
                                                        arr.shape, expected)
    return None


def _check_plan(folder: str, plan: Dict[str, Any], rank: int) -> None:
    """Refuse a folder that holds another extraction; rank 0 records the plan of a new one."""
    old = _read_json(os.path.join(folder, PLAN_NAME))
    if old is None:
        if rank == 0:
            _write_json(os.path.join(folder, PLAN_NAME), plan)
        return
    different = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
    if different:
        raise DataError("--features-path %s holds features of another extraction (it differs in %s): give another "
                        "--features-path, or remove the folder to extract again" % (folder, ", ".join(different)))


class _ViewLoader:
    """Batches of images (centre crop, [-1, 1]) with their mirrors, padded to a fixed size (one compiled shape)."""

    def __init__(self, files: Sequence[str], image_size: int, batch_size: int):
        self.dataset = ImageDataset(image_size, files, random_flip=False)
        self.image_size = image_size
        self.batch_size = batch_size

    def load(self, indices: Sequence[int]) -> Tuple[np.ndarray, Dict[int, Tuple[str, str]]]:
        """(2 * batch_size, 3, H, W): the images, padding, then their mirrors; and the unreadable ones."""
        images = np.zeros((self.batch_size, 3, self.image_size, self.image_size), dtype=np.float32)
        unreadable = {}
        for j, idx in enumerate(indices):
            try:
                images[j] = self.dataset.get(idx, random)[0]
            except UnreadableImage as exc:
                unreadable[idx] = (exc.path, str(exc.reason))
        images[len(indices):] = images[len(indices) - 1]  # padding repeats the last image
        return np.concatenate([images, images[..., ::-1]]), unreadable


def _encode_shard(loader: _ViewLoader, encode: Encoder, plan: Dict[str, Any], shard: int,
                  bar: Any) -> Tuple[np.ndarray, Dict[int, Tuple[str, str]]]:
    first, end = _shard_range(plan, shard)
    out = np.zeros((end - first, VIEWS, MOMENTS) + tuple(plan["latent_shape"]), dtype=np.float32)
    batches = [list(range(i, min(i + loader.batch_size, end))) for i in range(first, end, loader.batch_size)]
    unreadable: Dict[int, Tuple[str, str]] = {}
    b = loader.batch_size
    with ThreadPoolExecutor(max_workers=1) as pool:  # decodes the next batch while the VAE encodes this one
        pending = pool.submit(loader.load, batches[0])
        for k, indices in enumerate(batches):
            views, bad = pending.result()
            if k + 1 < len(batches):
                pending = pool.submit(loader.load, batches[k + 1])
            mean, std = encode(views)
            rows = slice(indices[0] - first, indices[-1] + 1 - first)
            n = len(indices)
            out[rows, 0, 0], out[rows, 0, 1] = mean[:n], std[:n]
            out[rows, 1, 0], out[rows, 1, 1] = mean[b:b + n], std[b:b + n]
            for idx in bad:
                out[idx - first] = 0.0
            unreadable.update(bad)
            bar.update(n)
    return out, unreadable


def _write_shard(folder: str, shard: int, first: int, moments: np.ndarray,
                 unreadable: Dict[int, Tuple[str, str]]) -> None:
    """The shard's metadata, then its moments (the moments file's rename completes the shard)."""
    for stale in glob(os.path.join(folder, ".shard_%05d.*.tmp" % shard)):  # left by a killed run
        os.remove(stale)
    meta = {"first": first, "count": int(moments.shape[0]),
            "unreadable": {str(i): list(v) for i, v in sorted(unreadable.items())}}
    _write_json(shard_path(folder, shard, "json"), meta)
    with atomic_write(shard_path(folder, shard)) as f:
        np.save(f, moments)


def extract_features(folder: str, plan: Dict[str, Any], files: Sequence[str], labels: Sequence[int],
                     encode: Encoder, *, batch_size: int, max_shards: int = 0, rank: int = 0, world_size: int = 1,
                     log: Callable[[str], None] = print, warn: Callable[[str], None] = print) -> Optional[Dict]:
    """Write the missing shards of `folder` that belong to this rank, then (rank 0) labels.npy and index.json.

    `max_shards` > 0 stops this rank after that many new shards (the same call later continues). Returns the index
    on rank 0 once the folder is complete, else None.
    """
    os.makedirs(folder, exist_ok=True)
    _check_plan(folder, plan, rank)
    mine = [s for s in range(rank, plan["num_shards"], world_size) if shard_problem(folder, plan, s)]
    todo = mine[:max_shards] if max_shards > 0 else mine
    done_before = len(range(rank, plan["num_shards"], world_size)) - len(mine)
    if done_before:
        log("resuming: %d shard(s) of this process are complete and skipped" % done_before)
    loader = _ViewLoader(files, plan["image_size"], batch_size)
    count = sum(_shard_range(plan, s)[1] - _shard_range(plan, s)[0] for s in todo)
    with tqdm(total=count, desc="encoding", unit="img", disable=rank != 0) as bar:
        for shard in todo:
            moments, unreadable = _encode_shard(loader, encode, plan, shard, bar)
            for path, reason in unreadable.values():
                warn("warning: unreadable image %s (%s): training skips it as it skips unreadable images"
                     % (path, reason))
            _write_shard(folder, shard, _shard_range(plan, shard)[0], moments, unreadable)
    dist_util.barrier()
    if rank != 0:
        return None
    return _finish(folder, plan, labels, log)


def _finish(folder: str, plan: Dict[str, Any], labels: Sequence[int], log: Callable[[str], None]) -> Optional[Dict]:
    """Check every shard and the counts; write labels.npy and, last, index.json."""
    problems = [p for p in (shard_problem(folder, plan, s) for s in range(plan["num_shards"])) if p]
    if problems:
        log("%d of %d shards are complete; run the same command again to continue (e.g. %s)"
            % (plan["num_shards"] - len(problems), plan["num_shards"], problems[0]))
        return None
    metas = [_read_json(shard_path(folder, s, "json")) for s in range(plan["num_shards"])]
    if sum(m["count"] for m in metas) != plan["num_images"] or len(labels) != plan["num_images"]:
        raise DataError("the shards of %s hold %d images, the data set %d: remove the folder and extract again"
                        % (folder, sum(m["count"] for m in metas), plan["num_images"]))
    with atomic_write(os.path.join(folder, LABELS_NAME)) as f:
        np.save(f, np.asarray(labels, dtype=np.int64))
    unreadable = {k: v for m in metas for k, v in m["unreadable"].items()}
    index = dict(plan, unreadable=unreadable, bytes_per_image=bytes_per_image(plan["latent_shape"]))
    _write_json(os.path.join(folder, INDEX_NAME), index)
    log("wrote %d images (%d shards, %.1f MB, %d unreadable) to %s" % (
        plan["num_images"], plan["num_shards"], plan["num_images"] * index["bytes_per_image"] / 1e6,
        len(unreadable), folder))
    return index


# ----------------------------------------------------------------------------------------------------------------
# Training from features
# ----------------------------------------------------------------------------------------------------------------


def check_feature_inputs(check: InputCheck, args: argparse.Namespace) -> Optional[Dict[str, Any]]:
    """Record, in `check`, why --feature-path cannot train with these flags; returns its index when it can."""
    folder = args.feature_path
    redo = ("run extract_features.py again with the flags that made it (it resumes and completes the folder)")
    if not os.path.isdir(folder):
        check.problem("--feature-path %s is not a directory: make it with `python extract_features.py --data-path "
                      "DIR --features-path %s --image-size %d`" % (folder, folder, args.image_size))
        return None
    index = _read_json(os.path.join(folder, INDEX_NAME))
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        plan = _read_json(os.path.join(folder, PLAN_NAME))
        if isinstance(plan, dict) and plan.get("format") == FORMAT:
            done = sum(shard_problem(folder, plan, s) is None for s in range(plan["num_shards"]))
            check.problem("--feature-path %s is incomplete (%d of %d shards, no %s): %s"
                          % (folder, done, plan["num_shards"], INDEX_NAME, redo))
        else:
            check.problem("--feature-path %s holds no features (no %s): make them with `python extract_features.py "
                          "--data-path DIR --features-path %s`" % (folder, INDEX_NAME, folder))
        return None
    ok = True
    if index["image_size"] != args.image_size:
        check.problem("--feature-path %s was extracted at --image-size %d, not %d: pass --image-size %d (or extract "
                      "features at %d)" % (folder, index["image_size"], args.image_size, index["image_size"],
                                           args.image_size))
        ok = False
    if len(index["classes"]) > args.num_classes:
        check.problem("--feature-path %s has %d classes, more than --num-classes %d: pass --num-classes %d"
                      % (folder, len(index["classes"]), args.num_classes, len(index["classes"])))
        ok = False
    if index["latent_shape"][0] != DIT_LATENT_CHANNELS:
        check.problem("--feature-path %s holds %d-channel latents; DiT takes %d (extract with an SD-style VAE)"
                      % (folder, index["latent_shape"][0], DIT_LATENT_CHANNELS))
        ok = False
    problems = [p for p in (shard_problem(folder, index, s) for s in range(index["num_shards"])) if p]
    try:
        labels = np.load(os.path.join(folder, LABELS_NAME), mmap_mode="r")
        if labels.shape != (index["num_images"],):
            problems.append("%s holds %s labels for %d images" % (LABELS_NAME, labels.shape, index["num_images"]))
    except (OSError, ValueError):
        problems.append("%s is missing" % LABELS_NAME)
    if problems:
        check.problem("--feature-path %s is incomplete (%d problem(s), e.g. %s): %s"
                      % (folder, len(problems), problems[0], redo))
        ok = False
    return index if ok else None


class FeatureDataset:
    """A feature folder served like ImageDataset: get(idx, rng) draws the flip as _to_training_sample does and
    returns the stored (2, C, H, W) [mean, std] of the image or its mirror, with {"y": label}."""

    def __init__(self, folder: str, random_flip: bool = True):
        with open(os.path.join(folder, INDEX_NAME)) as f:
            self.index = json.load(f)
        self.folder = folder
        self.random_flip = random_flip
        self.shard_size = self.index["shard_size"]
        self.latent_shape = tuple(self.index["latent_shape"])
        self.classes: List[str] = list(self.index["classes"])
        self.labels = np.load(os.path.join(folder, LABELS_NAME))
        self.unreadable = {int(k): v for k, v in self.index["unreadable"].items()}
        self._shards: Dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return int(self.index["num_images"])

    def _shard(self, shard: int) -> np.ndarray:
        arr = self._shards.get(shard)
        if arr is None:
            arr = self._shards[shard] = np.load(shard_path(self.folder, shard), mmap_mode="r")
        return arr

    def get(self, idx: int, rng) -> Tuple[np.ndarray, Dict[str, Any]]:
        """Sample idx: the moments of the stored image, or of its mirror with probability 1/2 (drawn from rng)."""
        if idx in self.unreadable:  # BatchIterator skips it as it skips an unreadable image file
            path, reason = self.unreadable[idx]
            raise UnreadableImage(path, reason)
        view = 1 if self.random_flip and rng.random() < 0.5 else 0
        shard, row = divmod(int(idx), self.shard_size)
        moments = np.array(self._shard(shard)[row, view], dtype=np.float32)
        return moments, {"y": np.array(self.labels[idx], dtype=np.int64)}


def latents_from_moments(moments: np.ndarray) -> jt.Var:
    """(N, 2, C, H, W) stored [mean, std] -> the scaled latents (mean + std * N(0, 1)) * 0.18215 that
    encode_latents draws from the VAE posterior (the same random draw)."""
    m = jt.array(moments)
    mean, std = m[:, 0], m[:, 1]
    return ((mean + std * jt.randn(mean.shape, dtype=mean.dtype)) * dit_util.LATENT_SCALE).detach()


def add_class_flag(parser: argparse.ArgumentParser) -> None:
    """--class-from: where an image's class comes from (class_labels.find_classes)."""
    parser.add_argument("--class-from", type=str, choices=CLASS_RULES, default="auto",
                        help="class of an image: folder (its sub-folder of --data-path, as ImageFolder), filename "
                             "(the file-name prefix before '_', guided-diffusion's rule) or auto (folder when every "
                             "image lies in one of two or more sub-folders, else filename; named at start-up when "
                             "the two differ)")


def record_classes(folder: Optional[str], log: Callable[[str], None], data: Any,
                   num_classes: Optional[int] = None) -> None:
    """Log the class count, rule and images per class of a run's data (a ClassListing, or a FeatureDataset: the
    classes its extraction listed) and write classes.json into the run's folder (rank 0: folder given)."""
    if isinstance(data, ClassListing):
        listing = data
        if listing.notice:
            log("note: " + listing.notice)
    else:
        counts = np.bincount(np.asarray(data.labels, dtype=np.int64), minlength=len(data.classes))
        listing = ClassListing([], [], list(data.classes), "the feature folder's index",
                               counts={n: int(c) for n, c in zip(data.classes, counts)})
    for line in summary_lines(listing, num_classes, flag="--num-classes"):
        log(line)
    if folder:
        log("class list (index = label id): %s" % write_classes(folder, listing.class_names))


def training_data(args: argparse.Namespace, listing: Optional[Tuple[List[str], List[int], List[str]]],
                  vae: Optional[AutoencoderKL]):
    """The dataset, latent size, batch -> latents function and class count of a train.py run: from --feature-path
    (the VAE is not used; None there unless previews need it), else from the listed images through the VAE."""
    if args.feature_path:
        dataset = FeatureDataset(args.feature_path)
        return dataset, dataset.latent_shape[-1], latents_from_moments, len(dataset.classes)
    latent_size = dit_util.latent_size_for(args.image_size, dit_util.vae_downsample_factor(vae))
    files, labels, classes = listing
    dataset = ImageDataset(args.image_size, files, classes=labels, random_flip=True)
    return dataset, latent_size, lambda images: dit_util.encode_latents(vae, jt.array(images)), len(classes)
