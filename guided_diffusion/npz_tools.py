"""
Tools for samples .npz files (arr_0 uint8 N x H x W x C images, optional arr_1 labels): read the headers, stream the
images in chunks, summarise, export PNGs, and pack a folder of images into one. Large files are never loaded whole.
scripts/npz_tools.py is the command line on these.
"""

import os
import zipfile
from typing import Dict, Iterable, Optional, Tuple

import numpy as np
from PIL import Image

from .checkpoint import atomic_write
from .errors import UserError
from .image_datasets import _list_image_files_recursively, center_crop_arr
from .image_grid import GRID_MAX_IMAGES, save_image_grid
from .sample_store import write_npz_streaming


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
                      grid_size: int = GRID_MAX_IMAGES) -> int:
    """Write arr_0's images as PNGs (000000.png, ... with the label in the name when there is arr_1) and a grid."""
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
