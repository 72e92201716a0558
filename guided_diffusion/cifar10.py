"""
CIFAR-10 (the python version: pickled ``data_batch_1..5``) as training batches, downloaded when absent.

Used by free_train.py, whose default data is CIFAR-10 in ``./data/cifar10``.
"""

import os
import pickle
import shutil
import tarfile
import tempfile
from typing import Optional, Tuple

import numpy as np

from .class_labels import ClassListing
from .errors import DataError
from .image_datasets import (ArrayDataset, BatchIterator, _list_image_files_recursively, check_data_classes,
                             load_data, record_classes)

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_DIRNAME = "cifar-10-batches-py"
TRAIN_BATCHES = ["data_batch_%d" % i for i in range(1, 6)]
TEST_BATCHES = ["test_batch"]
NUM_CLASSES = 10
#: The class names of the labels 0..9 (batches.meta's label_names).
CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def find_cifar10_batches(data_dir: str) -> Optional[str]:
    """The folder holding data_batch_1 (data_dir itself or data_dir/cifar-10-batches-py), or None."""
    for cand in (data_dir, os.path.join(data_dir, CIFAR10_DIRNAME)):
        if os.path.isfile(os.path.join(cand, TRAIN_BATCHES[0])):
            return cand
    return None


def download_cifar10(data_dir: str) -> str:
    """Download and extract CIFAR-10 into data_dir (unless already there); returns the batches folder."""
    found = find_cifar10_batches(data_dir)
    if found:
        return found
    from .download import download_file

    os.makedirs(data_dir, exist_ok=True)
    archive = os.path.join(data_dir, CIFAR10_ARCHIVE)
    target = os.path.join(data_dir, CIFAR10_DIRNAME)
    download_file(
        CIFAR10_URL,
        archive,
        what="the CIFAR-10 dataset (python version, 163 MB)",
        place_hint="download %s by hand and put it at %s (or extract it so that %s exists)"
        % (CIFAR10_URL, archive, os.path.join(target, TRAIN_BATCHES[0])),
    )
    extract_cifar10_archive(archive, data_dir)
    return target


def extract_cifar10_archive(archive: str, data_dir: str) -> None:
    """Extract cifar-10-python.tar.gz into data_dir/cifar-10-batches-py (atomically: a temp dir, then rename)."""
    target = os.path.join(data_dir, CIFAR10_DIRNAME)
    tmp = tempfile.mkdtemp(prefix=".cifar10-", dir=data_dir)
    try:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                members = [m for m in tar.getmembers()
                           if m.isfile() and os.path.dirname(m.name) == CIFAR10_DIRNAME]
                if not any(os.path.basename(m.name) == TRAIN_BATCHES[0] for m in members):
                    raise DataError("%s does not contain %s/%s: delete it and download %s again"
                                    % (archive, CIFAR10_DIRNAME, TRAIN_BATCHES[0], CIFAR10_URL))
                for m in members:
                    src = tar.extractfile(m)
                    with open(os.path.join(tmp, os.path.basename(m.name)), "wb") as dst:
                        shutil.copyfileobj(src, dst)
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise DataError("cannot extract %s (%s): delete it and download %s again" % (archive, exc, CIFAR10_URL))
        if os.path.isdir(target):
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def load_cifar10_arrays(batches_dir: str, train: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """(uint8 images N x 32 x 32 x 3, int64 labels N) from the pickled CIFAR-10 batches in batches_dir."""
    images, labels = [], []
    for name in TRAIN_BATCHES if train else TEST_BATCHES:
        path = os.path.join(batches_dir, name)
        try:
            with open(path, "rb") as f:
                d = pickle.load(f, encoding="bytes")
            data = np.asarray(d[b"data"], dtype=np.uint8)
            lab = np.asarray(d[b"labels"], dtype=np.int64)
        except FileNotFoundError:
            raise DataError("CIFAR-10 file %s is missing: put the extracted %s folder there (from %s)"
                            % (path, CIFAR10_DIRNAME, CIFAR10_URL)) from None
        except Exception as exc:
            raise DataError("cannot read CIFAR-10 file %s (%s): delete it and extract %s again"
                            % (path, exc, CIFAR10_URL)) from None
        if data.ndim != 2 or data.shape[1] != 3072 or len(lab) != len(data):
            raise DataError("CIFAR-10 file %s has unexpected contents (data %s, %d labels): extract %s again"
                            % (path, data.shape, len(lab), CIFAR10_URL))
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(lab)
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


def load_cifar10_data(*, data_dir: str, batch_size: int, image_size: int = 32, class_cond: bool = True,
                      random_flip: bool = True, seed: int = 0, download: bool = True) -> BatchIterator:
    """Endless CIFAR-10 training batches (as image_datasets.load_data), downloading the dataset if absent."""
    batches_dir = find_cifar10_batches(data_dir)
    if batches_dir is None:
        if not download:
            raise DataError("no CIFAR-10 batches in %s: put %s/%s there" % (data_dir, CIFAR10_DIRNAME, TRAIN_BATCHES[0]))
        batches_dir = download_cifar10(data_dir)
    images, labels = load_cifar10_arrays(batches_dir, train=True)
    dataset = ArrayDataset(image_size, images, labels if class_cond else None, random_flip=random_flip)
    iterator = BatchIterator(dataset, batch_size, shuffle=True, seed=seed)
    iterator.class_names = None
    if class_cond:
        counts = np.bincount(labels, minlength=NUM_CLASSES)
        record_classes(ClassListing([], [], list(CLASS_NAMES), "CIFAR-10's labels",
                                    counts={n: int(c) for n, c in zip(CLASS_NAMES, counts)}))
        iterator.class_names = list(CLASS_NAMES)
    return iterator


def is_image_folder(data_dir: str) -> bool:
    """Whether data_dir is read as a folder of images (it holds images and no CIFAR-10 batches)."""
    return (find_cifar10_batches(data_dir) is None and os.path.isdir(data_dir)
            and bool(_list_image_files_recursively(data_dir)))


def check_folder_classes(data_dir: str, class_from: str = "auto", num_classes: Optional[int] = None) -> None:
    """For an image folder (not CIFAR-10): image_datasets.check_data_classes (the class count against
    --num_classes); nothing for CIFAR-10."""
    if is_image_folder(data_dir):
        check_data_classes(data_dir, class_from, num_classes)


def load_cifar10_or_folder(*, data_dir: str, batch_size: int, image_size: int, class_cond: bool = True,
                           random_flip: bool = True, seed: int = 0, class_from: str = "auto",
                           num_classes: Optional[int] = None):
    """CIFAR-10 batches when data_dir holds (or will hold, by download) CIFAR-10; an image folder otherwise (its
    classes by class_from, at most num_classes of them: see image_datasets.load_data)."""
    if is_image_folder(data_dir):
        return load_data(data_dir=data_dir, batch_size=batch_size, image_size=image_size, class_cond=class_cond,
                         random_flip=random_flip, seed=seed, class_from=class_from, num_classes=num_classes)
    return load_cifar10_data(data_dir=data_dir, batch_size=batch_size, image_size=image_size,
                             class_cond=class_cond, random_flip=random_flip, seed=seed)
