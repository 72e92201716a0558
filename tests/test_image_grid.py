"""Unit tests of guided_diffusion.image_grid: model output to uint8 images and the PNG grid writer."""

import os

import numpy as np

from guided_diffusion import image_grid


def test_to_uint8_images_truncates_clamps_and_makes_nhwc():
    x = np.array([-2.0, -1.0, 0.0, 0.999, 1.0, 3.0], dtype=np.float32).reshape(1, 1, 2, 3).repeat(3, axis=1)
    out = image_grid.to_uint8_images(x)
    assert out.dtype == np.uint8 and out.shape == (1, 2, 3, 3)
    # (x+1)*127.5 truncated: 0 -> 127 (not 128), 0.999 -> 254
    np.testing.assert_array_equal(out[0, :, :, 0].reshape(-1), [0, 0, 127, 254, 255, 255])


def test_to_uint8_images_accepts_jittor_vars():
    import jittor as jt

    x = jt.array(np.zeros((2, 3, 4, 4), dtype=np.float32))
    out = image_grid.to_uint8_images(x)
    assert out.shape == (2, 4, 4, 3) and (out == 127).all()


def test_save_image_grid_tiles_images_into_png(tmp_path):
    from PIL import Image

    images = np.stack([np.full((4, 6, 3), 10 * (i + 1), dtype=np.uint8) for i in range(5)])
    path = str(tmp_path / "grid.png")
    image_grid.save_image_grid(images, path, nrow=3)
    grid = np.asarray(Image.open(path))
    # 3 columns x 2 rows of 6x4 tiles with 2-pixel padding
    assert grid.shape == (2 + 2 * (4 + 2), 2 + 3 * (6 + 2), 3)
    assert grid[2, 2, 0] == 10 and grid[2, 2 + 8, 0] == 20 and grid[2 + 6, 2 + 8, 0] == 50
    assert grid[2 + 6, 2 + 16, 0] == 0  # the sixth cell is empty
    assert [n for n in os.listdir(tmp_path)] == ["grid.png"]  # no temporary left behind
