"""
Class labels of an image folder, the one rule shared by every training script (ADM and DiT), and the class list a
run records (``classes.json``: a JSON list of class names, index = label id).

Two rules name the class of an image file:

* ``folder``: the sub-folder of the data folder it lies in (torchvision's ImageFolder, DiT's reference):
  ``data/cat/IMG_0001.png`` -> ``cat``; images deeper down belong to their top-level sub-folder.
* ``filename``: the part of the file name before the first ``_`` (guided-diffusion's reference):
  ``n01440764_10026.JPEG`` -> ``n01440764``.

Either way the class names are sorted and numbered from 0. ``auto`` (the default) takes ``folder`` when every image
lies in a sub-folder and there are at least two of them (one sub-folder per class), else ``filename`` (a flat
folder, as the reference expects). On ImageNet's layout (``train/n01440764/n01440764_10026.JPEG``) the two rules
give the same labels. Where they give different labels, ``find_classes`` returns a notice naming the choice and
the flag that changes it, which the scripts print at start-up.
"""

import collections
import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from .errors import DataError, UserError

#: The values of --class_from (ADM) / --class-from (DiT).
CLASS_RULES = ("auto", "folder", "filename")

#: The file a run writes into its log directory (DiT: its experiment folder), and sampling reads beside a checkpoint.
CLASSES_FILE = "classes.json"


@dataclass
class ClassListing:
    """The classes of a list of image files: names (index = label id), each file's label, the rule used."""

    files: List[str]
    labels: List[int]
    class_names: List[str]
    rule: str
    notice: Optional[str] = None  # why the rule was chosen, when the other rule would give other labels
    counts: Dict[str, int] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        """The number of classes found."""
        return len(self.class_names)

    def __iter__(self):
        """Unpacks as (files, labels, class names), the triple of DiT's ImageFolder listing."""
        return iter((self.files, self.labels, self.class_names))


def filename_class(path: str) -> str:
    """The reference's class of a file: its name's part before the first "_" (the whole name when it has none)."""
    return os.path.basename(path).split("_")[0]


def folder_class(path: str, data_dir: str) -> Optional[str]:
    """The top-level sub-folder of data_dir that holds `path` (None for a file directly in data_dir)."""
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(data_dir))
    parts = rel.replace(os.sep, "/").split("/")
    return parts[0] if len(parts) > 1 else None


def _numbered(names: Sequence[str]):
    """(sorted unique class names, each name's label)."""
    classes = sorted(set(names))
    index = {name: i for i, name in enumerate(classes)}
    return classes, [index[n] for n in names]


def _examples(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (", ..." if len(names) > limit else "")


def find_classes(data_dir: str, files: Sequence[str], class_from: str = "auto", flag: str = "--class_from",
                 data_flag: str = "--data_dir") -> ClassListing:
    """The classes of `files` (images under data_dir) by the rule `class_from` (auto, folder or filename).

    Raises a DataError when `class_from` is "folder" but some image lies directly in data_dir.
    """
    if class_from not in CLASS_RULES:
        raise UserError("%s %r: choose one of %s" % (flag, class_from, ", ".join(CLASS_RULES)))
    files = list(files)
    by_name = [filename_class(f) for f in files]
    by_folder = [folder_class(f, data_dir) for f in files]
    loose = [f for f, c in zip(files, by_folder) if c is None]
    folders = sorted({c for c in by_folder if c is not None})
    name_classes, name_labels = _numbered(by_name)
    folder_usable = not loose and bool(folders)
    if folder_usable:
        folder_classes, folder_labels = _numbered(by_folder)

    if class_from == "folder" and not folder_usable:
        raise DataError("%s folder: %d image(s) lie directly in %s (e.g. %s), not in a class sub-folder: move them "
                        "into one sub-folder per class, or pass %s filename"
                        % (flag, len(loose), data_dir, os.path.basename(loose[0]), flag))
    if class_from == "auto":
        rule = "folder" if folder_usable and len(folders) >= 2 else "filename"
    else:
        rule = class_from

    if rule == "folder":
        listing = ClassListing(files, folder_labels, folder_classes, "folder")
    else:
        listing = ClassListing(files, name_labels, name_classes, "filename")
    listing.counts = dict(collections.Counter(listing.class_names[y] for y in listing.labels))

    if class_from == "auto" and folders:
        other_same = folder_usable and folder_labels == name_labels
        if not other_same:
            if rule == "folder":
                listing.notice = (
                    "the classes of %s %s are its %d sub-folders (%s); the file-name prefixes before '_' would "
                    "give %d class(es) (%s): pass %s filename to use those"
                    % (data_flag, data_dir, len(folder_classes), _examples(folder_classes), len(name_classes),
                       _examples(name_classes), flag))
            elif loose:
                listing.notice = (
                    "%s %s has %d image(s) directly in it (e.g. %s) beside its sub-folders (%s), so the classes "
                    "are the file-name prefixes before '_' (%d: %s): put every image into a class sub-folder to "
                    "take the classes from the sub-folders"
                    % (data_flag, data_dir, len(loose), os.path.basename(loose[0]), _examples(folders),
                       len(name_classes), _examples(name_classes)))
            else:
                listing.notice = (
                    "%s %s has a single sub-folder (%s), so the classes are the file-name prefixes before '_' "
                    "(%d: %s): pass %s folder to take the class from the sub-folder instead"
                    % (data_flag, data_dir, folders[0], len(name_classes), _examples(name_classes), flag))
    return listing


def labels_for_names(listing: ClassListing, class_names: Sequence[str], what: str = "--val_data_dir") -> List[int]:
    """The labels of `listing`'s files in another run's numbering `class_names` (e.g. validation data numbered
    like the training data); a DataError names the classes that the other list lacks."""
    index = {name: i for i, name in enumerate(class_names)}
    unknown = sorted(set(listing.class_names) - set(index))
    if unknown:
        raise DataError("%s has classes that the training data does not have (%s): give it the same classes"
                        % (what, _examples(unknown)))
    return [index[listing.class_names[y]] for y in listing.labels]


def class_count_problem(found: int, num_classes: int, where: str, flag: str = "--num_classes") -> Optional[str]:
    """The message when the data has more classes than the model's label table/output has rows, else None."""
    if found > num_classes:
        return ("%s has %d classes, more than %s %d: pass %s %d (or more), or remove classes from the data"
                % (where, found, flag, num_classes, flag, found))
    return None


def summary_lines(listing: ClassListing, num_classes: Optional[int] = None, flag: str = "--num_classes",
                  limit: int = 20) -> List[str]:
    """Log lines: the class count and rule, the images per class (every class up to `limit`, else the range), and
    a note when the model has more label rows than the data has classes."""
    rule = {"folder": "sub-folders", "filename": "file-name prefixes before '_'"}.get(listing.rule, listing.rule)
    total = sum(listing.counts.values())
    lines = ["%d images in %d classes (from %s)" % (total, listing.num_classes, rule)]
    counts = [(name, listing.counts.get(name, 0)) for name in listing.class_names]
    if len(counts) <= limit:
        lines.append("images per class: " + ", ".join("%s: %d" % nc for nc in counts))
    else:
        least = min(counts, key=lambda nc: nc[1])
        most = max(counts, key=lambda nc: nc[1])
        lines.append("images per class: %d to %d (fewest: %s, most: %s), mean %.1f"
                     % (least[1], most[1], least[0], most[0], total / len(counts)))
    if num_classes is not None and num_classes > listing.num_classes:
        lines.append("the model has %s %d label rows; the data uses the first %d (the others are never trained)"
                     % (flag, num_classes, listing.num_classes))
    return lines


def write_classes(folder: str, class_names: Sequence[str]) -> str:
    """Write classes.json (a JSON list of class names, index = label id) into folder; returns its path."""
    path = os.path.join(folder, CLASSES_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(list(class_names), f, indent=0)
        f.write("\n")
    os.replace(tmp, path)
    return path


def read_classes(path: str) -> List[str]:
    """The class names of a classes.json file; a UserError when it is not a JSON list of strings."""
    try:
        with open(path) as f:
            names = json.load(f)
    except (OSError, ValueError) as exc:
        raise UserError("cannot read the class list %s (%s): fix or remove it" % (path, exc)) from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise UserError("%s is not a JSON list of class names: fix or remove it" % path)
    return names


def classes_beside(checkpoint_path: str, levels: int = 1) -> Optional[str]:
    """The classes.json in the folder of a checkpoint, when there is one; levels=2 also looks one folder up (DiT
    writes it into the experiment folder, its checkpoints into experiment/checkpoints/)."""
    if not checkpoint_path or "://" in checkpoint_path:
        return None
    folder = os.path.dirname(os.path.abspath(checkpoint_path))
    for _ in range(levels):
        path = os.path.join(folder, CLASSES_FILE)
        if os.path.isfile(path):
            return path
        folder = os.path.dirname(folder)
    return None
