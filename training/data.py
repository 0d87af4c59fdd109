"""Labelled image lists ("manifests") for training, from a folder, a CSV or Google Landmarks v2.

Three sources are understood by `load_manifest`:

- **a folder with one sub-folder per class**: ``root/<class>/**/<image>``; every file below a
  class folder whose extension is in `IMAGE_EXTENSIONS` (any case) is an image of that class;
  hidden files and other extensions are ignored; class names are the sub-folder names, sorted.
- **a CSV manifest** with the header ``path,label``: one image per row; relative paths are
  resolved against the CSV's folder; labels are any strings (class names), sorted numerically
  when they are all integers, else as text.
- **Google Landmarks v2** ``train_clean.csv`` (header ``landmark_id,images``; ``images`` holds
  space-separated image ids): image ``abc...`` is ``<image_root>/a/b/c/abc....jpg``.
  ``image_root`` defaults to the ``train/`` folder beside the CSV when it exists, else the CSV's
  folder (Weyand et al., "Google Landmarks Dataset v2", CVPR 2020).

Files are not opened here: a missing or broken image is found, skipped and reported by the
training pipeline (`training.pipeline`).
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
from pathlib import Path

import numpy as np

from remap_tf.contract import IMAGE_EXTENSIONS
from remap_tf.errors import BadPathError, InvalidInputError

MANIFEST_HEADER = ("path", "label")
GLDV2_HEADER = ("landmark_id", "images")

logger = logging.getLogger("remap.training")


@dataclasses.dataclass
class Manifest:
    """A labelled list of images.

    Attributes:
        paths: ``num_images`` image file paths.
        labels: int32 ``(num_images,)``, each an index into ``class_names``.
        class_names: the class names; a class may have no image (after `subset`).
    """

    paths: list[str]
    labels: np.ndarray
    class_names: list[str]

    def __post_init__(self):
        self.paths = [str(p) for p in self.paths]
        self.labels = np.asarray(self.labels, dtype=np.int32).reshape(-1)
        self.class_names = [str(c) for c in self.class_names]
        if len(self.paths) != len(self.labels):
            raise InvalidInputError(
                f"Manifest has {len(self.paths)} paths but {len(self.labels)} labels."
            )
        if len(self.labels) and (
            self.labels.min() < 0 or self.labels.max() >= len(self.class_names)
        ):
            raise InvalidInputError(
                f"Manifest labels must lie in [0, {len(self.class_names)}), received "
                f"[{self.labels.min()}, {self.labels.max()}]."
            )

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def class_counts(self) -> np.ndarray:
        """Images per class, int64 ``(num_classes,)``."""
        return np.bincount(self.labels, minlength=self.num_classes)

    def subset(self, indices) -> Manifest:
        """The images at ``indices`` (same class names, so labels keep their meaning)."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        return Manifest([self.paths[i] for i in indices], self.labels[indices], self.class_names)

    def drop_small_classes(self, min_images: int = 2) -> Manifest:
        """Drops the images of classes with fewer than ``min_images`` images, with a warning.

        Triplet training needs ``min_images >= 2``: an image alone in its class has no positive.
        The warning names the dropped classes (the first 20, then a count).
        """
        counts = self.class_counts()
        small = np.flatnonzero((counts > 0) & (counts < min_images))
        if small.size == 0:
            return self
        names = [self.class_names[c] for c in small[:20]]
        more = f" and {small.size - 20} more" if small.size > 20 else ""
        logger.warning(
            "Dropping %d class(es) with fewer than %d images (no positive for triplet "
            "training): %s%s",
            small.size,
            min_images,
            ", ".join(names),
            more,
        )
        return self.subset(np.flatnonzero(counts[self.labels] >= min_images))

    def split(self, fraction: float = 0.2, seed: int = 0, by: str = "class"):
        """Splits into ``(train, held_out)`` with about ``fraction`` held out.

        Args:
            fraction: share of classes (``by="class"``: unseen classes, the retrieval setting)
                or of each class's images (``by="image"``) to hold out.
            seed: seed of the random choice.
            by: ``"class"`` or ``"image"``.
        """
        if not 0.0 < fraction < 1.0:
            raise InvalidInputError(f"`fraction` must be in (0, 1), received {fraction!r}.")
        rng = np.random.default_rng(seed)
        if by == "class":
            present = np.flatnonzero(self.class_counts() > 0)
            count = int(round(fraction * present.size))
            if count < 1 or count >= present.size:
                raise InvalidInputError(
                    f"Cannot hold out {fraction:.0%} of {present.size} classes: need at least "
                    "one class on each side."
                )
            held = np.zeros(self.num_classes, dtype=bool)
            held[rng.choice(present, size=count, replace=False)] = True
            mask = held[self.labels]
        elif by == "image":
            mask = np.zeros(len(self), dtype=bool)
            for c in np.flatnonzero(self.class_counts() > 0):
                members = np.flatnonzero(self.labels == c)
                count = int(round(fraction * members.size))
                mask[rng.choice(members, size=count, replace=False)] = True
        else:
            raise InvalidInputError(f"`by` must be 'class' or 'image', received {by!r}.")
        return self.subset(np.flatnonzero(~mask)), self.subset(np.flatnonzero(mask))


def load_manifest(source, image_root=None) -> Manifest:
    """Reads a folder of class sub-folders, a ``path,label`` CSV or a GLDv2 ``train_clean.csv``.

    Args:
        source: a folder or a ``.csv`` file (see the module docstring).
        image_root: for the GLDv2 layout only, the folder holding ``a/b/c/abc....jpg``; default
            ``<csv folder>/train`` when it exists, else the CSV's folder.

    Returns:
        a `Manifest`. Classes with a single image are kept here; the training pipeline drops
        them with a warning (`Manifest.drop_small_classes`).

    Raises:
        FileNotFoundError: ``source`` does not exist.
        ValueError: an empty folder or CSV, a CSV with another header (the file and the header
            found are named), ``image_root`` given for a source that is not GLDv2.

    Example:
        >>> manifest = load_manifest("photos/")  # photos/eiffel/1.jpg, photos/louvre/2.jpg...
        >>> manifest.class_names, manifest.labels.shape
    """
    path = Path(os.fspath(source)).expanduser()
    if not path.exists():
        raise BadPathError(f"Training data not found: {path} does not exist.")
    if path.is_dir():
        if image_root is not None:
            raise InvalidInputError("`image_root` applies only to a GLDv2 train_clean.csv source.")
        return _from_folder(path)
    header, rows = _read_csv(path)
    if header == MANIFEST_HEADER:
        if image_root is not None:
            raise InvalidInputError("`image_root` applies only to a GLDv2 train_clean.csv source.")
        return _from_rows(path, rows)
    if header == GLDV2_HEADER:
        return _from_gldv2(path, rows, image_root)
    raise InvalidInputError(
        f"{path}: unrecognised CSV header {','.join(header)!r}; expected 'path,label' (a "
        "manifest) or 'landmark_id,images' (Google Landmarks v2 train_clean.csv)."
    )


def _from_folder(root: Path) -> Manifest:
    paths, labels, class_names = [], [], []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not _hidden(p)):
        files = sorted(
            str(f)
            for f in class_dir.rglob("*")
            if f.suffix.lower() in IMAGE_EXTENSIONS
            and not _hidden(f.relative_to(class_dir))
            and f.is_file()
        )
        if not files:
            logger.warning("Class folder %s has no image files; ignored.", class_dir)
            continue
        paths.extend(files)
        labels.extend([len(class_names)] * len(files))
        class_names.append(class_dir.name)
    if not paths:
        raise InvalidInputError(
            f"{root}: no images found; expected one sub-folder per class holding "
            f"{'/'.join(IMAGE_EXTENSIONS)} files."
        )
    loose = [f.name for f in root.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS]
    if loose:
        logger.warning(
            "%s: %d image(s) directly in the root folder have no class sub-folder; ignored.",
            root,
            len(loose),
        )
    return Manifest(paths, np.asarray(labels, np.int32), class_names)


def _hidden(path: Path) -> bool:
    return any(part.startswith(".") for part in path.parts)


def _read_csv(path: Path):
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            rows = [row for row in reader if row and any(cell.strip() for cell in row)]
    except UnicodeDecodeError:
        raise InvalidInputError(f"{path}: not a UTF-8 text CSV file.") from None
    if header is None:
        raise InvalidInputError(f"{path}: empty file; expected a CSV with a header row.")
    header = tuple(cell.strip().lower() for cell in header)
    if not rows and header in (MANIFEST_HEADER, GLDV2_HEADER):
        raise InvalidInputError(f"{path}: the CSV has a header but no rows.")
    return header, rows


def _class_order(names) -> list[str]:
    unique = set(names)
    try:
        return sorted(unique, key=int)
    except ValueError:
        return sorted(unique)


def _from_rows(csv_path: Path, rows) -> Manifest:
    base = csv_path.parent
    paths, names = [], []
    for line, row in enumerate(rows, start=2):
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise InvalidInputError(
                f"{csv_path}, line {line}: expected 'path,label', found {row!r}."
            )
        paths.append(str(base / row[0].strip()))  # an absolute path stays absolute
        names.append(row[1].strip())
    class_names = _class_order(names)
    index = {name: i for i, name in enumerate(class_names)}
    return Manifest(paths, np.asarray([index[n] for n in names], np.int32), class_names)


def _from_gldv2(csv_path: Path, rows, image_root) -> Manifest:
    if image_root is None:
        train = csv_path.parent / "train"
        root = train if train.is_dir() else csv_path.parent
    else:
        root = Path(os.fspath(image_root)).expanduser()
        if not root.is_dir():
            raise BadPathError(f"GLDv2 image root not found: {root} is not a folder.")
    paths, names = [], []
    for line, row in enumerate(rows, start=2):
        if len(row) != 2 or not row[0].strip():
            raise InvalidInputError(
                f"{csv_path}, line {line}: expected 'landmark_id,images', found {row!r}."
            )
        landmark = row[0].strip()
        for image_id in row[1].split():
            if len(image_id) < 3:
                raise InvalidInputError(f"{csv_path}, line {line}: bad image id {image_id!r}.")
            paths.append(str(root / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"))
            names.append(landmark)
    if not paths:
        raise InvalidInputError(f"{csv_path}: no image ids in the 'images' column.")
    class_names = _class_order(names)
    index = {name: i for i, name in enumerate(class_names)}
    return Manifest(paths, np.asarray([index[n] for n in names], np.int32), class_names)
