"""Build a reference batch .npz (for evaluator.py) from an image folder or another .npz of images.

The result has the layout of the released reference batches (e.g. VIRTUAL_imagenet256_labeled.npz):
  * ``mu``, ``sigma``: mean and covariance (N-1 normalisation) of the Inception pool_3 activations of ALL images;
  * ``mu_s``, ``sigma_s``: the same for the spatial (mixed_6/conv, first 7 channels) activations;
  * ``arr_0``: up to ``--num_images`` (default 10000) of those images, uint8 NHWC, a seeded random subset, used by
    the evaluator for precision and recall;
  * ``arr_1``: the labels of those images, when the source .npz has labels in arr_1.

Images from a folder (searched recursively for jpg/jpeg/png/gif/webp/bmp, in sorted path order) are converted to
RGB and center-cropped to ``--image_size`` as guided-diffusion's training data loader does (BOX halvings while the
short side is at least twice the size, BICUBIC resize of the short side to the size, center crop). Images from an
.npz are used as they are unless ``--image_size`` differs from theirs, in which case they get the same crop.

Usage: ``python make_reference_batch.py SOURCE OUT.npz --image_size 256 [--num_images 10000]``
"""

import argparse
import os
import sys
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from evaluator import (  # noqa: E402  (the evaluator lives beside this script; it is not a package)
    Evaluator,
    EvaluatorError,
    NpzFormatError,
    _download_inception_model,
    _require_tensorflow,
    describe_npz,
    open_npz_array,
    raise_problems,
    resolve_inception_path,
    run_cli,
    tf,
)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "gif", "webp", "bmp")


def create_argparser() -> argparse.ArgumentParser:
    """Command line of the reference-batch builder."""
    parser = argparse.ArgumentParser(
        description="Build a reference batch .npz (precomputed FID/sFID statistics over all images + arr_0 with up "
        "to --num_images of them) for evaluations/evaluator.py.",
    )
    parser.add_argument("source", help="a folder of images (searched recursively) or an .npz with uint8 NHWC arr_0")
    parser.add_argument("output", help="the .npz to write (refuses to replace an existing file without --overwrite)")
    parser.add_argument(
        "--image_size",
        type=int,
        default=None,
        help="side of the square images (required for a folder; for an .npz, crops/resizes only when it differs "
        "from the stored size). Use the resolution of the samples you will evaluate",
    )
    parser.add_argument(
        "--num_images",
        type=int,
        default=10000,
        help="how many images to store in arr_0 for precision/recall (the released batches hold 10000); the "
        "statistics always use every image",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random choice of the arr_0 images")
    parser.add_argument("--batch_size", type=int, default=64, help="images per Inception batch (as the evaluator)")
    parser.add_argument(
        "--inception_path",
        default=None,
        help="path of classify_image_graph_def.pb, downloaded there when absent (default: $ADM_INCEPTION_PATH, "
        "else ./classify_image_graph_def.pb), as evaluator.py",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Read SOURCE, compute the statistics of all its images and write OUTPUT atomically."""
    args = create_argparser().parse_args(argv)
    _require_tensorflow()
    problems = []
    if args.num_images < 1 or args.batch_size < 1:
        problems.append("--num_images and --batch_size must be at least 1")
    if args.image_size is not None and args.image_size < 1:
        problems.append("--image_size must be at least 1")
    if os.path.exists(args.output) and not args.overwrite:
        problems.append(f"{args.output} exists; choose another output path or pass --overwrite to replace it")
    if not args.output.endswith(".npz"):
        problems.append(f"the output path must end in .npz (got {args.output})")
    try:
        source = ImageSource(args.source, args.image_size)
    except EvaluatorError as exc:
        problems.append(str(exc))
    raise_problems(problems)

    print(f"source: {source.describe()}")
    chosen = choose_subset(len(source), args.num_images, args.seed)
    inception_path = _download_inception_model(resolve_inception_path(args.inception_path))
    session = tf.Session(graph=tf.Graph())
    try:
        evaluator = Evaluator(session, batch_size=args.batch_size, inception_path=inception_path)
        kept, pool_stats, spatial_stats = accumulate(evaluator, source, chosen, args.batch_size)
    finally:
        session.close()

    mu, sigma = pool_stats.statistics()
    mu_s, sigma_s = spatial_stats.statistics()
    arrays = dict(arr_0=kept, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    labels = source.labels()
    if labels is not None:
        arrays["arr_1"] = labels[chosen]
    save_npz_atomic(args.output, arrays)
    print(
        f"wrote {args.output}: statistics over {len(source)} images, arr_0 {kept.shape[0]} images of "
        f"{'x'.join(str(d) for d in kept.shape[1:])}"
    )


def accumulate(
    evaluator: Evaluator, source: "ImageSource", chosen: np.ndarray, batch_size: int
) -> Tuple[np.ndarray, "RunningStatistics", "RunningStatistics"]:
    """One pass over source: running pool/spatial statistics of every image, and the chosen images kept."""
    pool_stats, spatial_stats = RunningStatistics(), RunningStatistics()
    kept: Optional[np.ndarray] = None
    start = 0
    num_batches = -(-len(source) // batch_size)
    for batch in tqdm(source.batches(batch_size), total=num_batches, desc="activations", unit="batch"):
        pool, spatial = evaluator.batch_activations(batch)
        pool_stats.update(pool)
        spatial_stats.update(spatial)
        if kept is None:
            kept = np.zeros([len(chosen), *batch.shape[1:]], dtype=np.uint8)
        end = start + len(batch)
        lo, hi = np.searchsorted(chosen, [start, end])
        kept[lo:hi] = batch[chosen[lo:hi] - start]
        start = end
    return kept, pool_stats, spatial_stats


class ImageSource:
    """The images of a folder or an .npz, delivered as uint8 NHWC batches of one size."""

    def __init__(self, path: str, image_size: Optional[int]):
        self.path = path
        self.image_size = image_size
        self.files: List[str] = []
        self.info = None
        if os.path.isdir(path):
            if image_size is None:
                raise EvaluatorError("--image_size is required when the source is a folder of images")
            self.files = list_image_files(path)
            if not self.files:
                raise EvaluatorError(
                    f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {path}; point SOURCE at the folder "
                    "that holds them"
                )
        elif os.path.isfile(path):
            self.info = describe_npz(path)
            if self.info.dtype != np.uint8:
                raise NpzFormatError(
                    f"arr_0 in {path} is {self.info.dtype}; a reference batch holds uint8 images (0..255): convert "
                    "with np.clip(np.round(x), 0, 255).astype(np.uint8) first"
                )
        else:
            raise EvaluatorError(f"no such file or folder: {path}; SOURCE is an image folder or an .npz of images")
        if len(self) < 2:
            raise EvaluatorError(f"{path} holds {len(self)} image; a covariance needs at least 2")

    def __len__(self) -> int:
        return len(self.files) if self.info is None else self.info.num_images

    def describe(self) -> str:
        """One line: what is read and how it is sized."""
        if self.info is None:
            return f"{len(self)} image files under {self.path}, center-cropped to {self.image_size}x{self.image_size}"
        resize = self._npz_needs_crop()
        how = f", center-cropped to {self.image_size}x{self.image_size}" if resize else ""
        return f"{self.info.summary()}{how}"

    def _npz_needs_crop(self) -> bool:
        return self.image_size is not None and tuple(self.info.shape[1:3]) != (self.image_size, self.image_size)

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """uint8 NHWC batches of up to batch_size images, in source order."""
        if self.info is None:
            for i in range(0, len(self.files), batch_size):
                yield np.stack([load_image(f, self.image_size) for f in self.files[i : i + batch_size]])
            return
        with open_npz_array(self.path, "arr_0") as reader:
            for batch in reader.read_batches(batch_size):
                if self._npz_needs_crop():
                    batch = np.stack([center_crop_arr(_to_pil(im), self.image_size) for im in batch])
                yield np.asarray(batch)

    def labels(self) -> Optional[np.ndarray]:
        """arr_1 of a source .npz when it holds one label per image; None otherwise."""
        if self.info is None:
            return None
        with np.load(self.path) as obj:
            if "arr_1" not in obj.files:
                return None
            labels = obj["arr_1"]
        return labels if labels.ndim == 1 and len(labels) == len(self) else None


def list_image_files(folder: str) -> List[str]:
    """Image files under folder (recursively), sorted by path."""
    found = []
    for root, _, names in os.walk(folder):
        for name in names:
            if "." in name and name.rsplit(".", 1)[1].lower() in IMAGE_EXTENSIONS:
                found.append(os.path.join(root, name))
    return sorted(found)


def load_image(path: str, image_size: int) -> np.ndarray:
    """One image file as uint8 RGB image_size x image_size x 3 (center crop)."""
    from PIL import Image

    try:
        with Image.open(path) as pil_image:
            pil_image.load()
            pil_image = pil_image.convert("RGB")
    except Exception as exc:  # PIL raises many types for unreadable files
        raise EvaluatorError(f"cannot read image {path} ({exc}); remove or replace it") from None
    return center_crop_arr(pil_image, image_size)


def _to_pil(arr: np.ndarray):
    from PIL import Image

    return Image.fromarray(np.asarray(arr, dtype=np.uint8))


def center_crop_arr(pil_image, image_size: int) -> np.ndarray:
    """guided-diffusion's training crop: BOX-halve while the short side >= 2*size, BICUBIC to size, center crop."""
    from PIL import Image

    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)

    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)

    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


def choose_subset(total: int, num: int, seed: int) -> np.ndarray:
    """Sorted indices of min(num, total) images chosen at random (seeded) out of total; all when num >= total."""
    if num >= total:
        return np.arange(total)
    return np.sort(np.random.RandomState(seed).choice(total, size=num, replace=False))


class RunningStatistics:
    """Mean and covariance accumulated batch by batch in float64 (Chan et al.'s pairwise update), as np.cov gives."""

    def __init__(self):
        self.count = 0
        self.mean: Optional[np.ndarray] = None
        self.scatter: Optional[np.ndarray] = None  # sum of outer products of deviations from the mean

    def update(self, x: np.ndarray) -> None:
        """Add the rows of x [B, D]."""
        x = np.asarray(x, dtype=np.float64)
        if self.mean is None:
            self.mean = np.zeros(x.shape[1])
            self.scatter = np.zeros([x.shape[1], x.shape[1]])
        b = len(x)
        batch_mean = x.mean(axis=0)
        centred = x - batch_mean
        total = self.count + b
        delta = batch_mean - self.mean
        self.mean = self.mean + delta * (b / total)
        self.scatter += centred.T @ centred + np.outer(delta, delta) * (self.count * b / total)
        self.count = total

    def statistics(self) -> Tuple[np.ndarray, np.ndarray]:
        """(mean, covariance with N-1 normalisation)."""
        if self.count < 2:
            raise EvaluatorError("a covariance needs at least 2 images")
        return self.mean, self.scatter / (self.count - 1)


def save_npz_atomic(path: str, arrays: dict) -> None:
    """np.savez to a temporary file beside path, then rename it into place."""
    tmp_path = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp_path, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


if __name__ == "__main__":
    run_cli(main)
