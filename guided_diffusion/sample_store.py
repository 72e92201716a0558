"""
Where the batch loop (sampling.generate_samples) keeps its results: the partial-batch folder with resume, and the
final samples .npz written by streaming.

* While a run is going, every finished batch is a file ``samples_{N}.partial/batch_NNNNNN.npz`` beside the run's
  settings (``meta.json``); a rerun with the same settings continues, one with other settings is refused.
* When every batch exists, ``assemble`` streams them into ``samples_{N}x{H}x{W}x{C}.npz`` (``arr_0`` uint8 NHWC,
  ``arr_1`` int64 labels when there are labels: the layout ``evaluations/evaluator.py`` and ``np.load`` read)
  without holding the whole set in memory, writes a PNG grid and a settings file (``.json``) beside it and removes
  the partial folder. The .npz appears last, by an atomic rename: when it exists, it is complete.
"""

import json
import os
import re
import shutil
import zipfile
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .checkpoint import atomic_write
from .errors import UserError
from .image_grid import GRID_MAX_IMAGES, save_image_grid

_PARTS_META = "meta.json"


# ----------------------------------------------------------------------------------------------- npz streaming


def write_npz_streaming(path: str, shape: Sequence[int], chunks: Iterable[np.ndarray],
                        labels: Optional[np.ndarray] = None) -> None:
    """Write an np.savez-compatible .npz (arr_0 = the concatenated uint8 chunks, arr_1 = labels) chunk by chunk.

    Only one chunk is in memory at a time; the file appears at `path` only when everything was written.
    """
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


# ----------------------------------------------------------------------------------------------- partial batches


def partial_dir(out_dir: str, num_samples: int) -> str:
    """The folder that holds the finished batches of an unfinished run of `num_samples` images."""
    return os.path.join(out_dir, "samples_%d.partial" % num_samples)


def run_meta(num_samples: int, batch_size: int, run_config: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """The settings recorded with a run's results (a resumed run must have the same ones)."""
    return {"num_samples": int(num_samples), "batch_size": int(batch_size),
            "run_config": _jsonable(dict(run_config)) if run_config is not None else None}


def open_store(out_dir: str, num_samples: int, nbatches: int, image_shape,
               meta: Mapping[str, Any]) -> Tuple[Optional[str], np.ndarray]:
    """Look at `out_dir` before a run (rank 0): (the finished .npz or None, uint8 0/1 per batch: already done).

    A finished .npz or partial folder made with other settings is refused with a UserError; without either, a new
    partial folder is started with the run's settings file.
    """
    parts_dir = partial_dir(out_dir, num_samples)
    done = np.zeros(nbatches, dtype=np.uint8)
    final_path = _find_final(out_dir, num_samples, image_shape)
    if final_path is not None:
        _check_meta(_sidecar(final_path), meta, final_path,
                    "Move it away or choose another OPENAI_LOGDIR (log dir) to sample again.")
        done[:] = 1
        shutil.rmtree(parts_dir, ignore_errors=True)  # left over if a run stopped right after finishing
    elif os.path.isdir(parts_dir):
        fix = ("Rerun with the same flags to continue it, or delete %s (or choose another OPENAI_LOGDIR) "
               "to start over." % parts_dir)
        _check_meta(os.path.join(parts_dir, _PARTS_META), meta, parts_dir, fix)
        for b in range(nbatches):
            done[b] = os.path.exists(_part_path(parts_dir, b))
    else:
        os.makedirs(parts_dir, exist_ok=True)
        with atomic_write(os.path.join(parts_dir, _PARTS_META), "w") as f:
            json.dump(meta, f, indent=1, sort_keys=True)
    return final_path, done


def write_part(parts_dir: str, batch_index: int, images: np.ndarray, labels: Optional[np.ndarray]) -> None:
    """Keep one finished batch (atomically: a batch file exists only when complete)."""
    arrays = {"images": images}
    if labels is not None:
        arrays["labels"] = labels
    with atomic_write(_part_path(parts_dir, batch_index), "wb") as f:
        np.savez(f, **arrays)


def assemble(parts_dir: str, out_dir: str, num_samples: int, sizes: List[int], image_shape,
             meta: Mapping[str, Any]) -> str:
    """Stream the finished batches into the final .npz (+ PNG grid, settings file); remove the partial folder."""
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
        if count >= GRID_MAX_IMAGES:
            break
        grid.append(load(b)[0][: GRID_MAX_IMAGES - count])
        count += len(grid[-1])
    final_path = os.path.join(out_dir, samples_npz_name(num_samples, shape))
    save_image_grid(np.concatenate(grid), final_path[: -len(".npz")] + ".png")
    with atomic_write(_sidecar(final_path), "w") as f:
        json.dump(dict(meta, image_shape=list(shape), labels=has_labels), f, indent=1, sort_keys=True)
    # The .npz is renamed into place last: when it exists, it is complete.
    write_npz_streaming(final_path, (num_samples,) + shape, (load(b)[0] for b in range(len(sizes))), all_labels)
    shutil.rmtree(parts_dir, ignore_errors=True)
    return final_path


def _part_path(parts_dir: str, batch_index: int) -> str:
    return os.path.join(parts_dir, "batch_%06d.npz" % batch_index)


def _read_part(path: str) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    with np.load(path, allow_pickle=False) as data:
        images = data["images"]
        labels = data["labels"] if "labels" in data.files else None
    return images, labels


def _read_part_labels(path: str) -> np.ndarray:
    with np.load(path, allow_pickle=False) as data:
        if "labels" not in data.files:
            raise UserError("%s has no labels while other batches do; delete its folder to start over" % path)
        return data["labels"].astype(np.int64)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


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


def _sidecar(npz_path: str) -> str:
    return npz_path[: -len(".npz")] + ".json"


def _find_final(out_dir: str, num_samples: int, image_shape) -> Optional[str]:
    if image_shape is not None:
        path = os.path.join(out_dir, samples_npz_name(num_samples, image_shape))
        return path if os.path.exists(path) else None
    pattern = re.compile(r"samples_%dx\d+x\d+x\d+\.npz$" % num_samples)
    found = sorted(n for n in os.listdir(out_dir) if pattern.match(n)) if os.path.isdir(out_dir) else []
    return os.path.join(out_dir, found[0]) if found else None
