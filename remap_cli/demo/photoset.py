"""An instance-retrieval data set made from the photographs that ship inside scikit-image.

The demo, the tests and the training acceptance test need real photos that every user has,
offline. scikit-image bundles 18 photographs in its wheel (listed in `PHOTOS`; the two
``stereo_motorcycle`` views are one instance with two real viewpoints). Each photo becomes one
instance; each *view* of it is a random crop at a random scale, rotated, warped in perspective,
sometimes blurred, colour-shifted and JPEG-compressed at a random quality, so that views of one
photo match each other the way photos of one landmark do (Jégou et al.'s INRIA Holidays
protocol, in miniature).

Photos are split by source photo, never by view:

* **train**: ``train/<photo>/<photo>_NNN.jpg`` and ``train.csv`` (``path,label``);
* **val**: other photos, same layout (``val/``, ``val.csv``), for a validation-mAP callback;
* **test**: the remaining photos; ``test_groups.json`` holds one group per photo, whose first
  image is the query view, and ``distractors``: fresh views of the train photos (real photos,
  the only other ones available offline, and hard negatives because they look like the
  queries' neighbours in training). The JSON format is the one of `remap evaluate`:
  ``{"groups": [{"name": ..., "images": [paths]}], "distractors": [paths]}``, paths relative
  to the JSON file.

Everything is a pure function of the arguments: the same seed gives byte-identical files (one
NumPy generator per view, seeded from ``(seed, photo, split, view)``). The folder is claimed
for the photo set (`remap_tf.outputs`: a ``.remap-output.json`` marker listing every file,
listed before it is written). Writing into a folder that already holds a photo set rewrites
changed files atomically, keeps identical ones and removes the listed files that no longer
belong to it, so re-running never fails on leftovers; a folder holding files remap did not
write (a user's ``data/train/cats/*.jpg``) is refused unless ``overwrite``, and even then only
the listed files are ever removed.

Example:
    >>> views = make_photo_views("data/photos", seed=0)
    >>> views.train_csv.name, len(views.test_photos) > 0
    ('train.csv', True)
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from remap_tf.checks import check_int
from remap_tf.errors import BadPathError, InvalidInputError
from remap_tf.io import atomic_write_bytes
from remap_tf.outputs import claim, record, remove_listed

FORMAT_VERSION = 1
MANIFEST_NAME = "photoset.json"
DATA_DIR = "data"  # the photo set's folder inside a `remap demo` output
COMMAND = "demo"  # the command whose output a photo set is (its marker says so)
OUTPUT = "photo set"
SPLITS = ("train", "val", "test", "distractors")


def _skimage_file(name: str) -> Callable[[], list[np.ndarray]]:
    def load() -> list[np.ndarray]:
        import skimage.data

        with Image.open(os.path.join(skimage.data.data_dir, name)) as image:
            return [np.asarray(image.convert("RGB"))]

    return load


# The photographs bundled in scikit-image's wheel (no download): colour and grey, objects,
# people, scenes, textures, microscopy and astronomy. Synthetic images (colorwheel, logo,
# checkerboard, phantom, binary masks) are left out: they are not photos. `cat` is `chelsea`.
PHOTOS: dict[str, Callable[[], list[np.ndarray]]] = {
    "astronaut": _skimage_file("astronaut.png"),
    "brick": _skimage_file("brick.png"),
    "camera": _skimage_file("camera.png"),
    "cell": _skimage_file("cell.png"),
    "chelsea": _skimage_file("chelsea.png"),
    "clock": _skimage_file("clock_motion.png"),
    "coffee": _skimage_file("coffee.png"),
    "coins": _skimage_file("coins.png"),
    "grass": _skimage_file("grass.png"),
    "gravel": _skimage_file("gravel.png"),
    "hubble_deep_field": _skimage_file("hubble_deep_field.jpg"),
    "immunohistochemistry": _skimage_file("ihc.png"),
    "moon": _skimage_file("moon.png"),
    "motorcycle": lambda: (
        _skimage_file("motorcycle_left.png")() + _skimage_file("motorcycle_right.png")()
    ),
    "page": _skimage_file("page.png"),
    "retina": _skimage_file("retina.jpg"),
    "rocket": _skimage_file("rocket.jpg"),
    "text": _skimage_file("text.png"),
}

_SPLIT_CODES = {"train": 1, "val": 2, "test": 3, "distractors": 4}
VIEW_SCALE = (0.6, 1.0)  # a view is a crop of 60-100% of the photo's side


@dataclasses.dataclass(frozen=True)
class PhotoViews:
    """Where `make_photo_views` wrote a photo set, and how it was split.

    Attributes:
        root: the output folder.
        train_dir: one sub-folder per training photo, holding its views.
        train_csv: ``path,label`` manifest of the training views (paths relative to it,
            label = photo name).
        val_dir, val_csv: the same for the validation photos (empty when ``val_fraction``
            is 0; the CSV then holds only its header).
        test_groups_json: ``{"groups": [...], "distractors": [...]}``; each group's first
            image is its query view.
        train_photos, val_photos, test_photos: photo names of each split, sorted.
        image_size: ``(height, width)`` of every view.
        seed: the seed that made it.
    """

    root: Path
    train_dir: Path
    train_csv: Path
    val_dir: Path
    val_csv: Path
    test_groups_json: Path
    train_photos: tuple[str, ...]
    val_photos: tuple[str, ...]
    test_photos: tuple[str, ...]
    image_size: tuple[int, int]
    seed: int


def make_photo_views(
    out_dir,
    seed: int = 0,
    views_per_photo: int = 8,
    image_size=(96, 128),
    test_fraction: float = 0.35,
    val_fraction: float = 0.0,
    distractors_per_photo: int = 2,
    photos: Sequence[str] | None = None,
    query_scale: tuple[float, float] | None = None,
    queries_per_photo: int = 1,
    overwrite: bool = False,
) -> PhotoViews:
    """Writes the scikit-image photo retrieval set into ``out_dir`` (see the module doc).

    Args:
        out_dir: output folder; created if missing; an earlier photo set in it is updated,
            any other non-empty folder refused (`claim_photo_set`).
        seed: one integer fixes the split and every view.
        views_per_photo: views of each photo, >= 2 (a test group is one query view and
            ``views_per_photo - 1`` database views).
        image_size: ``(height, width)`` of the views in pixels, each >= 32, or one int for a
            square.
        test_fraction: fraction of the photos held out for test, in (0, 1); at least one.
        val_fraction: fraction held out for validation, in [0, 1); 0 means no validation.
            At least one photo always remains for training, and two for test.
        distractors_per_photo: views of each training photo added to the test database as
            distractors, >= 0.
        photos: names from `PHOTOS` to use (default: all 18); at least 4.
        query_scale: when given, each test group's first view (its query) is a crop of
            this range of the photo's side (``(0.45, 0.65)``: 20-42% of the area), not an
            ordinary view (0.6-1.0 of the side): queries often show part of a photo.
        queries_per_photo: with ``query_scale``, how many of each test group's first views
            are such query crops (``"queries"`` in the group's JSON).
        overwrite: write beside other files (those of the same names are replaced).

    Returns:
        a `PhotoViews` naming the folders and files written (InvalidInputError, naming the
        value, for a bad argument; OutputExistsError, naming the folder, for a folder that
        holds files remap did not write).
    """
    views_per_photo = check_int("views_per_photo", views_per_photo, minimum=2)
    distractors_per_photo = check_int("distractors_per_photo", distractors_per_photo, minimum=0)
    seed = check_int("seed", seed, minimum=0)
    height, width = _check_image_size(image_size)
    names = _check_photos(photos)
    train, val, test = split_photos(names, seed, test_fraction, val_fraction)

    root = claim_photo_set(out_dir, overwrite)
    writer = _ViewWriter(root, seed, (height, width), names, overwrite)
    train_rows = writer.rows("train", train, views_per_photo)
    val_rows = writer.rows("val", val, views_per_photo)
    queries = check_int("queries_per_photo", queries_per_photo, minimum=1) if query_scale else 1
    groups = [
        {"name": photo, "queries": queries, "images": writer.relative(
            writer.write("test", photo, views_per_photo + queries - 1, query_scale, queries)
        )}
        for photo in test
    ]  # fmt: skip
    distractors = writer.relative(
        [p for photo in train for p in writer.write("distractors", photo, distractors_per_photo)]
    )
    settings = dict(
        format_version=FORMAT_VERSION, query_scale=list(query_scale) if query_scale else None,
        seed=seed, views_per_photo=views_per_photo, image_size=[height, width],
        test_fraction=float(test_fraction), val_fraction=float(val_fraction),
        distractors_per_photo=distractors_per_photo, train_photos=list(train),
        val_photos=list(val), test_photos=list(test),
    )  # fmt: skip
    train_csv, val_csv, test_json = _write_lists(
        writer, settings, train_rows, val_rows, {"groups": groups, "distractors": distractors}
    )
    # Views of an earlier photo set in this folder (another seed or size) that this one does
    # not have; only files the marker lists, never a user's.
    remove_listed(root, keep=writer.relative(writer.written))
    return PhotoViews(
        root=root, train_dir=root / "train", train_csv=train_csv, val_dir=root / "val",
        val_csv=val_csv, test_groups_json=test_json, train_photos=tuple(train),
        val_photos=tuple(val), test_photos=tuple(test), image_size=(height, width), seed=seed,
    )  # fmt: skip


def claim_photo_set(out_dir, overwrite: bool = False) -> Path:
    """Takes ``out_dir`` for a photo set (`remap_tf.outputs.claim`): absent, empty, or an
    earlier photo set; any other folder only with ``overwrite`` (its files are kept)."""
    return claim(out_dir, COMMAND, OUTPUT, overwrite)


def _write_lists(writer: _ViewWriter, settings: dict, train_rows, val_rows, test_groups: dict):
    """train.csv, val.csv, test_groups.json and the settings file; returns the first three."""
    root = writer.root
    train_csv, val_csv = root / "train.csv", root / "val.csv"
    test_json = root / "test_groups.json"
    files = {
        train_csv: _csv_bytes(train_rows, root),
        val_csv: _csv_bytes(val_rows, root),
        test_json: _json_bytes(test_groups),
        root / MANIFEST_NAME: _json_bytes(settings),
    }
    writer.write_files(files)
    return train_csv, val_csv, test_json


class _ViewWriter:
    """Renders seeded views of the photos and writes those that changed; remembers them all."""

    def __init__(self, root: Path, seed: int, size: tuple[int, int], names, overwrite=False):
        self.root = root
        self.seed = seed
        self.size = size
        self.overwrite = overwrite
        self.sources = {name: _prepared_sources(name, max(size)) for name in names}
        self.written: set[Path] = set()

    def write_files(self, files: dict[Path, bytes]) -> None:
        """Lists ``files`` in the folder's marker first (an interrupt never leaves an
        unlisted view), then writes those that changed."""
        record(self.root, self.relative(files), overwrite=self.overwrite)
        for path, data in files.items():
            _write_if_changed(path, data)
            self.written.add(path)

    def rows(self, split: str, photos, count: int) -> list[tuple[Path, str]]:
        """``(path, photo)`` of ``count`` views of each photo, in ``split/photo/``."""
        return [(path, photo) for photo in photos for path in self.write(split, photo, count)]

    def relative(self, paths) -> list[str]:
        return [p.relative_to(self.root).as_posix() for p in paths]

    def write(self, split: str, photo: str, count: int, first_scale=None, first=1):
        """Writes ``count`` views of ``photo``: ``split/photo/`` (``distractors/`` flat); the
        ``first`` ones are crops of ``first_scale`` of the side when it is given."""
        folder = self.root / split if split == "distractors" else self.root / split / photo
        paths = [folder / f"{photo}_{index:03d}.jpg" for index in range(count)]
        record(self.root, self.relative(paths), overwrite=self.overwrite)
        for index, path in enumerate(paths):
            rng = np.random.default_rng([self.seed, _stable_id(photo), _SPLIT_CODES[split], index])
            scale = first_scale if index < first and first_scale else VIEW_SCALE
            _write_if_changed(path, _render_view(self.sources[photo], self.size, rng, scale))
            self.written.add(path)
        return paths


def split_photos(
    names: Sequence[str], seed: int, test_fraction: float, val_fraction: float = 0.0
) -> tuple[list[str], list[str], list[str]]:
    """Splits photo names into (train, val, test), each sorted, by a seeded permutation.

    Test gets ``round(n * test_fraction)`` photos (at least 2), validation
    ``round(n * val_fraction)`` (at least 1 when the fraction is > 0), and training the rest,
    which must be at least 2 photos (a triplet needs two classes).
    """
    if not 0.0 < float(test_fraction) < 1.0:
        raise InvalidInputError(f"`test_fraction` must be in (0, 1), received {test_fraction!r}.")
    if not 0.0 <= float(val_fraction) < 1.0:
        raise InvalidInputError(f"`val_fraction` must be in [0, 1), received {val_fraction!r}.")
    names = sorted(names)
    n = len(names)
    n_test = max(2, round(n * float(test_fraction)))
    n_val = max(1, round(n * float(val_fraction))) if val_fraction > 0 else 0
    if n - n_test - n_val < 2:
        raise InvalidInputError(
            f"{n} photos cannot be split with test_fraction={test_fraction} and "
            f"val_fraction={val_fraction}: training would keep {n - n_test - n_val} photos "
            "(at least 2 needed)."
        )
    order = np.random.default_rng(seed).permutation(n)
    shuffled = [names[i] for i in order]
    test = sorted(shuffled[:n_test])
    val = sorted(shuffled[n_test : n_test + n_val])
    train = sorted(shuffled[n_test + n_val :])
    return train, val, test


def read_manifest(csv_path) -> tuple[list[Path], list[str]]:
    """Reads a ``path,label`` manifest; returns absolute paths and labels, in file order."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise BadPathError(f"Manifest {str(csv_path)!r} does not exist.")
    with csv_path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if rows and not {"path", "label"} <= set(rows[0]):
        raise InvalidInputError(f"Manifest {str(csv_path)!r} must have the columns path,label.")
    return [csv_path.parent / row["path"] for row in rows], [row["label"] for row in rows]


def load_images(csv_path, image_size=None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Loads a manifest's images into memory, e.g. for `init_region_weights`.

    Args:
        csv_path: a ``path,label`` manifest such as `PhotoViews.train_csv`.
        image_size: ``(height, width)`` to resize to; default: the images' own size (they
            must then all have the same size, as photo-set views do).

    Returns:
        ``(images, labels, classes)``: float32 ``(num_images, height, width, 3)`` RGB 0-255,
        int32 ``(num_images,)`` indices into ``classes``, and the sorted class names.
    """
    paths, names = read_manifest(csv_path)
    if not paths:
        raise InvalidInputError(f"Manifest {str(csv_path)!r} lists no images.")
    classes = sorted(set(names))
    pixels = []
    for path in paths:
        with Image.open(path) as image:
            image = image.convert("RGB")
            if image_size is not None:
                image = image.resize((image_size[1], image_size[0]), Image.Resampling.BILINEAR)
            pixels.append(np.asarray(image, dtype=np.float32))
    shapes = {p.shape for p in pixels}
    if len(shapes) > 1:
        raise InvalidInputError(
            f"Images in {str(csv_path)!r} differ in size ({sorted(shapes)}); pass image_size."
        )
    labels = np.array([classes.index(name) for name in names], dtype=np.int32)
    return np.stack(pixels), labels, classes


# --- rendering ---------------------------------------------------------------------------


def _prepared_sources(name: str, long_side: int) -> list[Image.Image]:
    """The photo(s) of ``name`` as RGB, downscaled with antialiasing to ~2x the view size.

    The perspective warp samples bilinearly without antialiasing, so the source is first
    brought near the output resolution; 2x leaves room for zoomed-in crops.
    """
    images = []
    for pixels in PHOTOS[name]():
        image = Image.fromarray(np.ascontiguousarray(pixels)).convert("RGB")
        target = 2 * long_side
        scale = target / min(image.size)
        if scale < 1:
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            image = image.resize(size, Image.Resampling.LANCZOS)
        images.append(image)
    return images


def _render_view(sources: list[Image.Image], size: tuple[int, int], rng, scale=(0.6, 1.0)) -> bytes:
    """One random view, as JPEG bytes: crop+scale+rotation+perspective, blur, colour, JPEG."""
    height, width = size
    source = sources[int(rng.integers(len(sources)))]
    sw, sh = source.size
    aspect = width / height
    # The largest crop of the output's aspect that fits, scaled by `scale` per side.
    full_w = min(sw, sh * aspect)
    scale = rng.uniform(*scale)
    crop_w, crop_h = full_w * scale, full_w * scale / aspect
    cx = rng.uniform(crop_w / 2, sw - crop_w / 2)
    cy = rng.uniform(crop_h / 2, sh - crop_h / 2)
    angle = math.radians(rng.uniform(-12, 12))
    # Corners in QUAD order: upper-left, lower-left, lower-right, upper-right.
    corners = np.array([[-1, -1], [-1, 1], [1, 1], [1, -1]], dtype=np.float64)
    corners *= [crop_w / 2, crop_h / 2]
    corners += rng.uniform(-0.1, 0.1, size=(4, 2)) * [crop_w, crop_h]  # perspective
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    corners = corners @ rotation.T + [cx, cy]
    corners = np.clip(corners, 0, [sw - 1, sh - 1])
    view = source.transform(
        (width, height),
        Image.Transform.QUAD,
        data=tuple(float(v) for v in corners.reshape(-1)),
        resample=Image.Resampling.BILINEAR,
    )
    view = ImageEnhance.Brightness(view).enhance(rng.uniform(0.7, 1.3))
    view = ImageEnhance.Contrast(view).enhance(rng.uniform(0.7, 1.3))
    view = ImageEnhance.Color(view).enhance(rng.uniform(0.6, 1.4))
    tint = rng.uniform(0.9, 1.1, size=3)
    pixels = np.asarray(view, dtype=np.float32) * tint
    view = Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8))
    if rng.uniform() < 0.5:
        view = view.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.2))))
    buffer = io.BytesIO()
    view.save(buffer, format="JPEG", quality=int(rng.integers(40, 96)))
    return buffer.getvalue()


# --- files -------------------------------------------------------------------------------


def _write_if_changed(path: Path, data: bytes) -> None:
    """Writes ``data`` atomically (temporary file, then rename) unless already identical."""
    if path.is_file() and path.read_bytes() == data:
        return
    atomic_write_bytes(path, data)


def _csv_bytes(rows, root: Path) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["path", "label"])
    for path, label in rows:
        writer.writerow([path.relative_to(root).as_posix(), label])
    return out.getvalue().encode("utf-8")


def _json_bytes(value) -> bytes:
    return (json.dumps(value, indent=1) + "\n").encode("utf-8")


def _stable_id(name: str) -> int:
    return zlib.crc32(name.encode("utf-8"))


def _check_image_size(image_size) -> tuple[int, int]:
    size = (image_size, image_size) if isinstance(image_size, (int, np.integer)) else image_size
    try:
        height, width = (int(v) for v in size)
    except (TypeError, ValueError):
        raise InvalidInputError(
            f"`image_size` must be an int or (height, width), received {image_size!r}."
        ) from None
    if min(height, width) < 32 or (height, width) != tuple(size):
        raise InvalidInputError(
            f"`image_size` sides must be integers >= 32, received {image_size!r}."
        )
    return height, width


def _check_photos(photos) -> list[str]:
    if photos is None:
        return sorted(PHOTOS)
    if isinstance(photos, str):
        raise InvalidInputError(
            f"`photos` must be a list of names, received the string {photos!r}."
        )
    names = list(dict.fromkeys(photos))
    unknown = [name for name in names if name not in PHOTOS]
    if unknown:
        raise InvalidInputError(f"Unknown photos {unknown}; expected names from {sorted(PHOTOS)}.")
    if len(names) < 4:
        raise InvalidInputError(f"`photos` must name at least 4 photos, received {names!r}.")
    return sorted(names)
