"""
Model output to images, and the one PNG grid writer of the project (sampling scripts, npz tools, DiT, the demo).
"""

import math
from typing import Optional

import numpy as np
from PIL import Image

from .checkpoint import atomic_write

#: The most images a samples grid shows (the grid beside a samples .npz, npz_tools export).
GRID_MAX_IMAGES = 64


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
    grid = make_image_grid(images, nrow=nrow)
    if grid.shape[2] == 1:
        grid = grid[:, :, 0]
    with atomic_write(path, "wb") as f:
        Image.fromarray(grid).save(f, format="PNG")
