"""
The low-resolution inputs of super_res_sample.py: the images (and labels) of a samples .npz, as model_kwargs per batch.
"""

import os
import zipfile
from typing import Any, Dict

import jittor as jt
import numpy as np

from .errors import UserError
from .sampling import label_var


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
        idx = (batch_index * batch_size + np.arange(n)) % len(self.images)
        low_res = self.images[idx].astype(np.float32) / 127.5 - 1.0
        kwargs: Dict[str, Any] = {"low_res": jt.array(np.ascontiguousarray(low_res.transpose(0, 3, 1, 2)))}
        if self.class_cond:
            kwargs["y"] = label_var(self.labels[idx])
        return kwargs
