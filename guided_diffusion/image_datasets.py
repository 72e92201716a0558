"""
Image folders as an endless stream of training batches (the reference's load_data), without torch.

Batches are **numpy arrays**: ``(float32 array (N, C, H, W) in [-1, 1], {"y": int64 array (N,)} when class_cond)``;
the training loops turn them into Jittor Vars.

Data order under MPI follows torch's ``DistributedSampler`` (as DiT's train.py uses it): epoch ``e`` is one
permutation of the **whole** dataset, drawn from ``numpy.random.RandomState(seed + e)``, padded by repeating its
start to a multiple of the number of ranks N, and rank ``r`` takes positions ``r, r + N, r + 2N, ...`` of it. An
epoch therefore shows every image once across the ranks (plus at most N - 1 repeats), the ranks' label sequences
are independent, and every rank has the same number of batches (the last incomplete batch is dropped, as the
reference's ``DataLoader(drop_last=True)``). The crop and flip of the sample at position ``p`` of epoch ``e`` come
from its own ``random.Random`` seeded by (seed, e, p): independent across ranks, and the same for any N. Batch
``k`` of rank ``r`` depends only on ``(seed, k, r, N)``, so ``BatchIterator.seek(k)`` after a resume lands exactly
where an uninterrupted run would be. ``deterministic=True`` keeps the sorted file order (rank r reads files
r, r + N, ..., the reference's sharding). Images are decoded by one background thread that keeps a couple of
batches ready.
"""

import math
import os
import queue
import random
import threading
import weakref
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from . import logger
from .class_labels import (ClassListing, class_count_problem, find_classes, labels_for_names, summary_lines,
                           write_classes)
from .errors import DataError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "gif")

Batch = Tuple[np.ndarray, Dict[str, np.ndarray]]


def _shard_info() -> Tuple[int, int]:
    """(rank, world size) from dist_util, or (0, 1) when it is unavailable."""
    try:
        from . import dist_util

        return dist_util.get_rank(), dist_util.get_world_size()
    except ImportError:
        return 0, 1


def load_data(
    *,
    data_dir: str,
    batch_size: int,
    image_size: int,
    class_cond: bool = False,
    deterministic: bool = False,
    random_crop: bool = False,
    random_flip: bool = True,
    seed: int = 0,
    class_from: str = "auto",
    class_names: Optional[Sequence[str]] = None,
    num_classes: Optional[int] = None,
) -> "BatchIterator":
    """An endless iterator of (images, kwargs) batches from the images under data_dir, sharded by MPI rank.

    :param class_cond: add kwargs["y"], the class label of each image (class_labels.find_classes: its sub-folder
        when every image lies in one of two or more sub-folders, else its file-name prefix before the first "_");
        the class count, the images per class and the rule's notice are logged, and classes.json is written into
        the logger's directory (rank 0). The iterator's `class_names` holds the class list.
    :param class_from: the class rule: auto, folder or filename.
    :param class_names: number the classes as this list does (validation data numbered like the training data;
        nothing is logged or written then).
    :param num_classes: the model's class count; more classes in the data raise a DataError.
    :param deterministic: keep the sorted file order instead of shuffling every epoch.
    :param seed: the seed of the shuffle and of the crops/flips (see the module docstring).
    """
    all_files = check_data_dir(data_dir)
    classes = None
    found_names = None
    if class_cond:
        listing = find_classes(data_dir, all_files, class_from)
        if class_names is None:
            problem = class_count_problem(listing.num_classes, num_classes, "data directory %r" % data_dir) \
                if num_classes is not None else None
            if problem:
                raise DataError(problem)
            classes, found_names = listing.labels, listing.class_names
            record_classes(listing, num_classes)
        else:
            classes, found_names = labels_for_names(listing, class_names), list(class_names)
    dataset = ImageDataset(
        image_size,
        all_files,
        classes=classes,
        random_crop=random_crop,
        random_flip=random_flip,
    )
    rank, world = _shard_info()
    per_rank = -(-len(dataset) // world)
    if per_rank < batch_size:
        raise DataError(
            "data directory %r has %d image(s), %d per process over %d process(es), fewer than --batch_size %d: "
            "add images or lower --batch_size" % (data_dir, len(dataset), per_rank, world, batch_size)
        )
    iterator = BatchIterator(dataset, batch_size, shuffle=not deterministic, seed=seed, rank=rank, world_size=world)
    iterator.class_names = found_names
    return iterator


def check_data_classes(data_dir: str, class_from: str = "auto", num_classes: Optional[int] = None,
                       flag: str = "--data_dir", num_classes_flag: str = "--num_classes") -> ClassListing:
    """The classes of the images under data_dir (see load_data); a UserError when the folder has no images, the
    rule is unknown or cannot apply, or the data has more classes than `num_classes` (the fix named)."""
    listing = find_classes(data_dir, check_data_dir(data_dir, flag), class_from, data_flag=flag)
    if num_classes is not None:
        problem = class_count_problem(listing.num_classes, num_classes, "%s %s" % (flag, data_dir),
                                      num_classes_flag)
        if problem:
            raise DataError(problem)
    return listing


def record_classes(listing: ClassListing, num_classes: Optional[int] = None) -> None:
    """Log the class count, rule and images per class (and the rule's notice), and write classes.json into the
    logger's directory; on rank 0 only, and only once a logger is configured (the scripts' logger.configure())."""
    if _shard_info()[0] != 0 or logger.Logger.CURRENT is None:
        return
    if listing.notice:
        logger.log("note: " + listing.notice)
    for line in summary_lines(listing, num_classes):
        logger.log(line)
    folder = logger.get_dir()
    if folder:
        logger.log("class list (index = label id): %s" % write_classes(folder, listing.class_names))


def check_data_dir(data_dir: str, flag: str = "--data_dir") -> List[str]:
    """The image files under data_dir (sorted, recursive); a DataError naming the flag when there are none."""
    if not data_dir:
        raise DataError("no data directory given: pass %s path/to/images" % flag)
    if not os.path.isdir(data_dir):
        raise DataError("data directory %r does not exist: check %s" % (data_dir, flag))
    all_files = _list_image_files_recursively(data_dir)
    if not all_files:
        raise DataError(
            "data directory %r contains no images (.jpg, .jpeg, .png or .gif, searched recursively): "
            "check %s" % (data_dir, flag)
        )
    return all_files


def _list_image_files_recursively(data_dir: str) -> List[str]:
    results = []
    for entry in sorted(os.listdir(data_dir)):
        full_path = os.path.join(data_dir, entry)
        ext = entry.split(".")[-1]
        if "." in entry and ext.lower() in IMAGE_EXTENSIONS:
            results.append(full_path)
        elif os.path.isdir(full_path):
            results.extend(_list_image_files_recursively(full_path))
    return results


class UnreadableImage(DataError):
    """An image file that cannot be decoded (corrupt, truncated, not an image)."""

    def __init__(self, path: str, reason: Exception):
        super().__init__("cannot read image %r (%s): remove or replace the file" % (path, reason))
        self.path = path
        self.reason = reason


# A training run skips unreadable images until they are more than this fraction of the images read so far
# (counting at least MIN_READS_FOR_BAD_FRACTION reads, so that one bad file early on does not end a run).
MAX_BAD_FRACTION = 0.01
MIN_READS_FOR_BAD_FRACTION = 100


class ImageDataset:
    """Images as CHW float32 arrays in [-1, 1] (paths[shard::num_shards], the reference's signature).

    The loaders pass every path and let BatchIterator split the epoch's order among the ranks.
    """

    def __init__(
        self,
        resolution: int,
        image_paths: Sequence[str],
        classes: Optional[Sequence[int]] = None,
        shard: int = 0,
        num_shards: int = 1,
        random_crop: bool = False,
        random_flip: bool = True,
    ):
        self.resolution = resolution
        self.local_images = list(image_paths)[shard:][::num_shards]
        self.local_classes = None if classes is None else list(classes)[shard:][::num_shards]
        self.random_crop = random_crop
        self.random_flip = random_flip

    def __len__(self) -> int:
        return len(self.local_images)

    def __getitem__(self, idx: int) -> Tuple[np.ndarray, Dict[str, Any]]:
        return self.get(idx, random)

    def get(self, idx: int, rng) -> Tuple[np.ndarray, Dict[str, Any]]:
        """Sample idx, with crops and flips drawn from `rng` (a random.Random or the `random` module)."""
        path = self.local_images[idx]
        try:
            with Image.open(path) as pil_image:
                pil_image.load()
                pil_image = pil_image.convert("RGB")
        except Exception as exc:  # PIL raises many types for bad files
            raise UnreadableImage(path, exc) from None

        if self.random_crop:
            arr = random_crop_arr(pil_image, self.resolution, rng=rng)
        else:
            arr = center_crop_arr(pil_image, self.resolution)

        label = None if self.local_classes is None else self.local_classes[idx]
        return _to_training_sample(arr, label, self.random_flip, rng)


class ArrayDataset:
    """In-memory uint8 NHWC images (e.g. CIFAR-10) served like ImageDataset (images[shard::num_shards])."""

    def __init__(
        self,
        resolution: int,
        images: np.ndarray,
        labels: Optional[np.ndarray] = None,
        shard: int = 0,
        num_shards: int = 1,
        random_flip: bool = True,
    ):
        self.resolution = resolution
        self.images = images[shard:][::num_shards]
        self.labels = None if labels is None else np.asarray(labels)[shard:][::num_shards]
        self.random_flip = random_flip

    def __len__(self) -> int:
        return len(self.images)

    def get(self, idx: int, rng) -> Tuple[np.ndarray, Dict[str, Any]]:
        """Sample idx (centre-cropped/resized when the resolution differs), flipped by `rng`."""
        arr = self.images[idx]
        if arr.shape[0] != self.resolution or arr.shape[1] != self.resolution:
            arr = center_crop_arr(Image.fromarray(arr), self.resolution)
        label = None if self.labels is None else self.labels[idx]
        return _to_training_sample(arr, label, self.random_flip, rng)


def _to_training_sample(arr: np.ndarray, label, random_flip: bool, rng) -> Tuple[np.ndarray, Dict[str, Any]]:
    """Flip (with probability 1/2 when asked), scale uint8 HWC to [-1, 1] CHW, and attach the label as "y"."""
    if random_flip and rng.random() < 0.5:
        arr = arr[:, ::-1]
    arr = arr.astype(np.float32) / 127.5 - 1
    out_dict = {}
    if label is not None:
        out_dict["y"] = np.array(label, dtype=np.int64)
    return np.transpose(arr, [2, 0, 1]), out_dict


def sample_seed(seed: int, epoch: int, position: int, stream: int = 0) -> int:
    """The seed of one sample's random draws (stream 0: crop and flip; others: e.g. label dropout).

    It depends on the sample's place in the epoch's global order, not on the rank that reads it.
    """
    return ((int(seed) * 1000003 + int(epoch)) * 1000000007 + int(position)) * 101 + int(stream)


class BatchIterator:
    """Endless, seekable, deterministic batches of one rank's part of a dataset, decoded ahead by a thread.

    Batch k depends only on (seed, k, rank, world_size) (see the module docstring for the order); `seek(k)` (before
    iterating) makes k the next batch. `map(fn)` returns an iterator whose batches are fn(images, kwargs, k), still
    seekable. rank and world_size default to this process's MPI rank and the number of ranks; `warn` receives
    the warnings about skipped unreadable images (default: the training logger).
    """

    def __init__(self, dataset, batch_size: int, shuffle: bool = True, seed: int = 0, prefetch: int = 2,
                 rank: Optional[int] = None, world_size: Optional[int] = None,
                 warn: Optional[Callable[[str], None]] = None):
        if rank is None or world_size is None:
            rank, world_size = _shard_info()
        if not 0 <= rank < world_size:
            raise ValueError("rank %d is not in 0..%d" % (rank, world_size - 1))
        if batch_size <= 0:
            raise DataError("batch size must be positive (got %d): check --batch_size" % batch_size)
        self.rank = int(rank)
        self.world_size = int(world_size)
        # DistributedSampler(drop_last=False): the order is padded so that every rank gets the same count.
        self.samples_per_rank = -(-len(dataset) // self.world_size)
        if self.samples_per_rank < batch_size:
            raise DataError("the dataset has %d samples (%d per process over %d process(es)), fewer than the batch "
                            "size %d" % (len(dataset), self.samples_per_rank, self.world_size, batch_size))
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.prefetch = prefetch
        self.batches_per_epoch = self.samples_per_rank // batch_size  # drop_last, as the reference's DataLoader
        self.position = 0  # index of the next batch returned by __next__
        self._queue: Optional[queue.Queue] = None
        self._stop: Optional[threading.Event] = None
        self._thread: Optional[threading.Thread] = None
        self._order_cache: Dict[int, np.ndarray] = {}
        self.warn = warn or logger.warn  # where skipped images are reported
        self.images_read = 0
        self.bad_files: Dict[str, str] = {}  # path -> reason, each unreadable file once

    @property
    def bad_images(self) -> int:
        """How many distinct unreadable images were skipped so far (by this process)."""
        return len(self.bad_files)

    # -- deterministic content --------------------------------------------------------------------------
    def epoch_order(self, epoch: int) -> np.ndarray:
        """The dataset indices of epoch `epoch` in global order, padded to a multiple of the number of ranks."""
        order = self._order_cache.get(epoch)
        if order is None:
            n = len(self.dataset)
            if self.shuffle:
                order = np.random.RandomState((self.seed + epoch) % (2 ** 32)).permutation(n)
            else:
                order = np.arange(n)
            padding = self.samples_per_rank * self.world_size - n
            if padding:
                order = np.concatenate([order, np.resize(order, padding)])
            self._order_cache = {epoch: order}
        return order

    def sample_keys(self, k: int) -> List[Tuple[int, int]]:
        """(epoch, global position) of each sample of batch k on this rank: what its random draws are seeded by."""
        epoch, within = divmod(int(k), self.batches_per_epoch)
        first = within * self.batch_size
        return [(epoch, j * self.world_size + self.rank) for j in range(first, first + self.batch_size)]

    def make_batch(self, k: int) -> Batch:
        """Batch number k (0-based) of this rank, computed from scratch."""
        keys = self.sample_keys(k)
        order = self.epoch_order(keys[0][0])
        samples = []
        for epoch, position in keys:
            rng = random.Random(sample_seed(self.seed, epoch, position))
            samples.append(self._read(order, position, rng))
        images = np.stack([s[0] for s in samples]).astype(np.float32, copy=False)
        cond = {}
        for key in samples[0][1]:
            cond[key] = np.stack([s[1][key] for s in samples])
        return images, cond

    def _read(self, order: np.ndarray, position: int, rng) -> Tuple[np.ndarray, Dict[str, Any]]:
        """The sample at `position` of the epoch's order; an unreadable image is skipped with a warning (once per
        file) and replaced by the next readable one in the order, so batches keep their shape and stay
        deterministic. Too many unreadable images (see MAX_BAD_FRACTION) raise a DataError."""
        for offset in range(len(order)):
            index = int(order[(position + offset) % len(order)])
            self.images_read += 1
            try:
                return self.dataset.get(index, rng)
            except UnreadableImage as exc:
                if exc.path not in self.bad_files:
                    self.bad_files[exc.path] = str(exc.reason)
                    self.warn("warning: skipping unreadable image %s (%s); another image takes its place"
                                % (exc.path, exc.reason))
                if len(self.bad_files) > MAX_BAD_FRACTION * max(self.images_read, MIN_READS_FOR_BAD_FRACTION):
                    shown = ", ".join(sorted(self.bad_files)[:5])
                    raise DataError(
                        "%d of the %d images read so far are unreadable (more than %g%%), e.g. %s: fix or remove "
                        "them and run again (the run continues from its last checkpoint)"
                        % (len(self.bad_files), self.images_read, 100 * MAX_BAD_FRACTION, shown)) from None
        raise DataError("no image of the dataset can be read, e.g. %s" % next(iter(self.bad_files)))

    # -- iteration -------------------------------------------------------------------------------------
    def seek(self, k: int) -> None:
        """Make batch k the next one returned (only before the first batch was taken)."""
        if self._thread is not None:
            raise RuntimeError("seek() must be called before iterating")
        self.position = int(k)

    def __iter__(self) -> "BatchIterator":
        return self

    @staticmethod
    def _worker(ref: "weakref.ref", start: int, q: "queue.Queue", stop: threading.Event) -> None:
        # Holds the iterator only weakly, so that dropping the iterator ends the thread (see __del__).
        k = start
        while not stop.is_set():
            it = ref()
            if it is None:
                return
            try:
                item = ("ok", it.make_batch(k))
            except BaseException as exc:  # handed to the consumer, which re-raises it
                item = ("error", exc)
            del it
            while not stop.is_set():
                if ref() is None:
                    return
                try:
                    q.put(item, timeout=0.5)
                    break
                except queue.Full:
                    continue
            if item[0] == "error":
                return
            k += 1

    def __next__(self) -> Batch:
        if self._thread is None:
            self._queue = queue.Queue(maxsize=max(1, self.prefetch))
            self._stop = threading.Event()
            self._thread = threading.Thread(
                target=BatchIterator._worker, args=(weakref.ref(self), self.position, self._queue, self._stop),
                daemon=True,
            )
            self._thread.start()
        kind, value = self._queue.get()
        if kind == "error":
            self.close()
            raise value
        self.position += 1
        return value

    def close(self) -> None:
        """Stop the background thread (a later next() starts a new one at the current position)."""
        if self._stop is not None:
            self._stop.set()
        self._thread = self._queue = self._stop = None

    def __del__(self):
        try:
            if self._stop is not None:
                self._stop.set()
        except Exception:
            pass

    def map(self, fn: Callable[[np.ndarray, Dict[str, np.ndarray], int], Batch]) -> "MappedBatchIterator":
        """Batches transformed by fn(images, kwargs, batch_index) (deterministic transforms seed from the index)."""
        return MappedBatchIterator(self, fn)


class MappedBatchIterator:
    """A BatchIterator whose batches pass through a function of (images, kwargs, batch index); seekable too."""

    def __init__(self, base, fn: Callable[[np.ndarray, Dict[str, np.ndarray], int], Batch]):
        self.base = base
        self.fn = fn

    @property
    def position(self) -> int:
        return self.base.position

    def seek(self, k: int) -> None:
        """Make batch k the next one returned (only before iterating)."""
        self.base.seek(k)

    def sample_keys(self, k: int) -> List[Tuple[int, int]]:
        """(epoch, global position) of each sample of batch k (see BatchIterator.sample_keys)."""
        return self.base.sample_keys(k)

    @property
    def bad_images(self) -> int:
        """How many distinct unreadable images the underlying iterator skipped so far."""
        return self.base.bad_images

    def __iter__(self) -> "MappedBatchIterator":
        return self

    def __next__(self) -> Batch:
        k = self.base.position
        images, cond = next(self.base)
        return self.fn(images, cond, k)

    def map(self, fn) -> "MappedBatchIterator":
        """Chain another transform."""
        return MappedBatchIterator(self, fn)

    def close(self) -> None:
        """Stop the background thread."""
        self.base.close()


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """Resize so the short side is image_size (BOX halving, then BICUBIC) and take the centre square (HWC uint8)."""
    # We are not on a new enough PIL to support the `reducing_gap`
    # argument, which uses BOX downsampling at powers of two first.
    # Thus, we do it by hand to improve downsample quality.
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)

    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)

    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size]


def random_crop_arr(pil_image: Image.Image, image_size: int, min_crop_frac: float = 0.8,
                    max_crop_frac: float = 1.0, rng=random) -> np.ndarray:
    """Resize the short side to a random size in [image_size/max_frac, image_size/min_frac], then crop randomly."""
    min_smaller_dim_size = math.ceil(image_size / max_crop_frac)
    max_smaller_dim_size = math.ceil(image_size / min_crop_frac)
    smaller_dim_size = rng.randrange(min_smaller_dim_size, max_smaller_dim_size + 1)

    # We are not on a new enough PIL to support the `reducing_gap`
    # argument, which uses BOX downsampling at powers of two first.
    # Thus, we do it by hand to improve downsample quality.
    while min(*pil_image.size) >= 2 * smaller_dim_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)

    scale = smaller_dim_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)

    arr = np.array(pil_image)
    crop_y = rng.randrange(arr.shape[0] - image_size + 1)
    crop_x = rng.randrange(arr.shape[1] - image_size + 1)
    return arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size]


def area_downsample(images: np.ndarray, size: int) -> np.ndarray:
    """Area interpolation of NCHW images to size x size (torch's F.interpolate(mode="area") = adaptive avg pool)."""
    n, c, h, w = images.shape
    if h % size == 0 and w % size == 0:
        fh, fw = h // size, w // size
        return images.reshape(n, c, size, fh, size, fw).mean(axis=(3, 5), dtype=np.float64).astype(images.dtype)
    out = np.empty((n, c, size, size), dtype=images.dtype)
    for i in range(size):
        y0, y1 = (i * h) // size, -((-(i + 1) * h) // size)
        for j in range(size):
            x0, x1 = (j * w) // size, -((-(j + 1) * w) // size)
            out[:, :, i, j] = images[:, :, y0:y1, x0:x1].mean(axis=(2, 3))
    return out


def with_label_dropout(data, p_uncond: float, null_label: int, seed: int = 0):
    """Replace each label by null_label with probability p_uncond (classifier-free guidance training).

    Whether a sample's label is dropped is drawn from that sample's own seed (its epoch and global position, see
    sample_seed), so the masks are independent across ranks, the same for any number of ranks, and the same after
    a resume.
    """

    def drop(images, cond, k):
        if "y" not in cond:
            raise DataError("classifier-free training needs class labels, but the data has none")
        y = cond["y"].copy()
        if y.size and (int(y.max()) >= null_label or int(y.min()) < 0):
            raise DataError("the data has class label %d but the model has %d classes: raise --num_classes"
                            % (int(y.max()), null_label))
        draws = np.array([random.Random(sample_seed(seed, epoch, position, stream=1)).random()
                          for epoch, position in data.sample_keys(k)])
        y[draws.reshape(y.shape) < p_uncond] = null_label
        cond = dict(cond)
        cond["y"] = y
        return images, cond

    return data.map(drop)
