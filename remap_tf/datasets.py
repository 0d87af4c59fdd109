"""Ground-truth loaders for retrieval benchmarks and for the user's own labelled images.

Every loader returns one structure, ``RetrievalDataset``: a list of database image paths and
a list of ``Query`` objects, each with its image path, an optional box to crop it to, and per
evaluation protocol the database indices of its positives and of its junk (ignored) images.
Single-protocol datasets use the protocol name ``"default"``; the revisited Oxford/Paris
sets have ``"easy"``, ``"medium"`` and ``"hard"`` (Radenović et al., CVPR 2018).

Formats:
    - revisited ``gnd_roxford5k.pkl`` / ``gnd_rparis6k.pkl`` (``load_revisited``);
    - original Oxford5k / Paris6k text files ``<query>_{good,ok,junk,query}.txt``
      (Philbin et al., CVPR 2007 / 2008; ``load_oxford_paris``);
    - INRIA Holidays (Jégou et al., ECCV 2008): ``<id>.jpg``, group = id // 100, the first
      image of a group is its query (``load_holidays``);
    - UKBench (Nistér & Stewénius, CVPR 2006): ``ukbench<n>.jpg`` in groups of four, every
      image a query (``load_ukbench``);
    - a folder per class (``load_folders``) and a JSON file of groups (``load_groups_json``):
      every image of a group is a query against all the others, unless the group lists its
      ``queries``.

Where a query image is itself in the database (Holidays, UKBench, folders, JSON groups), it
is marked junk for its own query so that it is neither a free hit nor a miss.

Pure Python/NumPy (Pillow only to crop query images); no TensorFlow.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from remap_tf import evaluation
from remap_tf.contract import IMAGE_EXTENSIONS
from remap_tf.errors import BadPathError, InvalidInputError

FORMATS = ("revisited", "oxford", "holidays", "ukbench", "folders", "groups")


@dataclasses.dataclass
class Query:
    """One query of a retrieval benchmark.

    Attributes:
        path: the query image file.
        box: (x1, y1, x2, y2) in pixels of the original image to crop the query to, or None.
        groundtruth: protocol name -> (positives, junk): tuples of database indices.
        name: a short name (file stem or benchmark query name).
    """

    path: str
    box: tuple[float, float, float, float] | None
    groundtruth: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]
    name: str = ""


@dataclasses.dataclass
class RetrievalDataset:
    """Database images plus queries with per-protocol ground truth.

    Attributes:
        name: the dataset's name.
        database: (num_database,) image paths; ground-truth indices point into this list.
        queries: the queries.
        protocols: the protocol names every query has ground truth for.
        info: loader notes (e.g. ground-truth names missing from the image folder).
    """

    name: str
    database: list[str]
    queries: list[Query]
    protocols: tuple[str, ...] = ("default",)
    info: dict = dataclasses.field(default_factory=dict)

    def positives(self, protocol: str = "default") -> list[tuple[int, ...]]:
        return [q.groundtruth[self._check(protocol)][0] for q in self.queries]

    def junk(self, protocol: str = "default") -> list[tuple[int, ...]]:
        return [q.groundtruth[self._check(protocol)][1] for q in self.queries]

    def _check(self, protocol: str) -> str:
        if protocol not in self.protocols:
            raise InvalidInputError(f"{self.name} has protocols {self.protocols}, not {protocol!r}")
        return protocol

    def evaluate(
        self, rankings: np.ndarray, kappas: Sequence[int] = evaluation.DEFAULT_KAPPAS
    ) -> dict[str, dict]:
        """mAP and mP@k per protocol for (num_queries, num_ranked) database rankings."""
        return {
            protocol: evaluation.mean_average_precision(
                rankings, self.positives(protocol), self.junk(protocol), kappas
            )
            for protocol in self.protocols
        }


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------


def _images_in(directory: Path) -> list[Path]:
    return sorted(
        p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _require_dir(path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise BadPathError(f"{what} {path} is not a directory")
    return path


def _group_queries(
    database: list[str],
    groups: list[list[int]],
    names: list[str],
    all_queries: bool,
    chosen: Sequence[Sequence[int] | None] | None = None,
) -> list[Query]:
    """Queries for group-labelled data: positives = rest of the group, junk = the query.

    ``chosen``, per group, the database indices of its queries (``None``: the group follows
    ``all_queries``: every image, or its first one).
    """
    queries = []
    chosen = chosen if chosen is not None else [None] * len(groups)
    for group, name, picked in zip(groups, names, chosen, strict=True):
        members = picked if picked is not None else group if all_queries else group[:1]
        for index in members:
            positives = tuple(i for i in group if i != index)
            queries.append(
                Query(
                    path=database[index],
                    box=None,
                    groundtruth={"default": (positives, (index,))},
                    name=f"{name}:{Path(database[index]).name}",
                )
            )
    return queries


def query_image(query: Query) -> str | bytes:
    """The query as an embedder input: its path, or PNG bytes of the crop to its box.

    Raises:
        ValueError: the box lies outside the image or is empty.
    """
    if query.box is None:
        return query.path
    from PIL import Image

    with Image.open(query.path) as image:
        image = image.convert("RGB")
        x1, y1, x2, y2 = query.box
        left, top = max(0, int(np.floor(x1))), max(0, int(np.floor(y1)))
        right, bottom = min(image.width, int(np.ceil(x2))), min(image.height, int(np.ceil(y2)))
        if right <= left or bottom <= top:
            raise InvalidInputError(
                f"query {query.name}: box {query.box} is empty inside the "
                f"{image.width}x{image.height} image {query.path}"
            )
        buffer = io.BytesIO()
        image.crop((left, top, right, bottom)).save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------
# Revisited Oxford / Paris
# ---------------------------------------------------------------------------------------


class _GroundTruthUnpickler(pickle.Unpickler):
    """Unpickles only plain containers and NumPy arrays.

    The revisited ground truth ships as a pickle, and unpickling runs whatever callables
    the file names (``os.system`` included). ``gnd_*.pkl`` holds only dicts, lists, strings,
    numbers and NumPy arrays, so every other global is refused: a tampered or mistaken file
    fails with an error instead of executing code.
    """

    _ALLOWED = {
        ("builtins", "dict"),
        ("builtins", "list"),
        ("builtins", "tuple"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "str"),
        ("builtins", "bytes"),
        ("builtins", "int"),
        ("builtins", "float"),
        ("builtins", "complex"),
        ("builtins", "bool"),
        # Protocol-2 pickles (as Python 2 wrote them) encode array bytes with this.
        ("_codecs", "encode"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: revisited ground-truth files contain only "
                "lists, dicts and NumPy arrays"
            )
        return super().find_class(module, name)


def _load_ground_truth_pickle(path: Path):
    with open(path, "rb") as handle:
        try:
            # latin1 reads NumPy arrays pickled by Python 2 as the original files were.
            return _GroundTruthUnpickler(handle, encoding="latin1").load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as error:
            raise InvalidInputError(
                f"{path} is not a revisited ground-truth pickle: {error}"
            ) from None


def load_revisited(pkl_path, image_dir=None, extension: str = ".jpg") -> RetrievalDataset:
    """Loads ``gnd_roxford5k.pkl`` / ``gnd_rparis6k.pkl`` (Radenović et al., CVPR 2018).

    Args:
        pkl_path: the ground-truth pickle: ``{"imlist", "qimlist", "gnd": [{"bbx", "easy",
            "hard", "junk"}]}``.
        image_dir: the folder of ``<name>.jpg`` images (default: ``jpg/`` next to the pickle,
            the layout of the revisitop download script).
        extension: image file extension.

    Returns:
        A dataset with protocols easy, medium and hard; queries cropped to ``bbx``.
    """
    pkl_path = Path(pkl_path)
    if not pkl_path.is_file():
        raise BadPathError(f"no revisited ground-truth file at {pkl_path}")
    image_dir = Path(image_dir) if image_dir is not None else pkl_path.parent / "jpg"
    gnd = _load_ground_truth_pickle(pkl_path)
    if not isinstance(gnd, dict) or not {"imlist", "qimlist", "gnd"} <= set(gnd):
        raise InvalidInputError(f"{pkl_path} lacks the 'imlist', 'qimlist' and 'gnd' entries")
    if len(gnd["gnd"]) != len(gnd["qimlist"]):
        raise InvalidInputError(
            f"{pkl_path}: {len(gnd['gnd'])} ground-truth entries for {len(gnd['qimlist'])} queries"
        )
    database = [str(image_dir / f"{name}{extension}") for name in gnd["imlist"]]
    queries = []
    for name, entry in zip(gnd["qimlist"], gnd["gnd"], strict=True):
        lists = {
            key: [int(i) for i in np.asarray(entry.get(key, []), dtype=np.int64).reshape(-1)]
            for key in ("easy", "hard", "junk")
        }
        groundtruth = {
            protocol: tuple(
                tuple(v)
                for v in evaluation.revisited_groundtruth(
                    lists["easy"], lists["hard"], lists["junk"], protocol
                )
            )
            for protocol in evaluation.REVISITED_PROTOCOLS
        }
        box = entry.get("bbx")
        box = tuple(float(v) for v in np.asarray(box).reshape(-1)[:4]) if box is not None else None
        queries.append(
            Query(str(image_dir / f"{name}{extension}"), box, groundtruth, name=str(name))
        )
    return RetrievalDataset(
        name=pkl_path.stem.replace("gnd_", ""),
        database=database,
        queries=queries,
        protocols=evaluation.REVISITED_PROTOCOLS,
    )


# ---------------------------------------------------------------------------------------
# Original Oxford5k / Paris6k
# ---------------------------------------------------------------------------------------


def _read_names(path: Path) -> list[str]:
    if not path.is_file():
        raise BadPathError(f"ground-truth file {path} is missing")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_oxford_paris(gt_dir, image_dir, name: str | None = None) -> RetrievalDataset:
    """Loads the original Oxford5k / Paris6k ground truth (Philbin et al., CVPR 2007/2008).

    Each query ``<q>`` has ``<q>_query.txt`` (one line ``<image> x1 y1 x2 y2``; Oxford names
    carry an ``oxc1_`` prefix) and ``<q>_good.txt``, ``<q>_ok.txt``, ``<q>_junk.txt`` (one
    image name per line, no extension). Standard protocol: positives = good + ok, junk
    ignored, queries cropped to their box.

    Args:
        gt_dir: folder of the ``*.txt`` ground-truth files.
        image_dir: folder of the database images (every image file in it, sorted by name).
        name: dataset name (default: the ground-truth folder's name).

    Returns:
        A single-protocol dataset; ``info["missing"]`` counts ground-truth names that have no
        image in ``image_dir`` (left out of the positives and junk).
    """
    gt_dir = _require_dir(gt_dir, "ground-truth folder")
    image_dir = _require_dir(image_dir, "image folder")
    query_files = sorted(gt_dir.glob("*_query.txt"))
    if not query_files:
        raise BadPathError(f"no *_query.txt files in {gt_dir}")
    images = _images_in(image_dir)
    if not images:
        raise BadPathError(f"no images in {image_dir}")
    index = {p.stem: i for i, p in enumerate(images)}
    database = [str(p) for p in images]
    queries, missing = [], set()
    for query_file in query_files:
        stem = query_file.name[: -len("_query.txt")]
        lines = _read_names(query_file)
        fields = lines[0].split() if lines else []
        if len(fields) != 5:
            raise InvalidInputError(
                f"{query_file}: expected '<image> x1 y1 x2 y2', got {lines[:1] or 'an empty file'}"
            )
        image_name = fields[0].removeprefix("oxc1_")
        try:
            box = tuple(float(v) for v in fields[1:])
        except ValueError:
            raise InvalidInputError(
                f"{query_file}: the box {fields[1:]} is not four numbers"
            ) from None
        if image_name not in index:
            raise BadPathError(
                f"{query_file}: query image {image_name} is not in the image folder {image_dir}"
            )

        def lookup(names):
            found = []
            for n in names:
                if n in index:
                    found.append(index[n])
                else:
                    missing.add(n)
            return tuple(sorted(set(found)))

        positives = lookup(
            _read_names(gt_dir / f"{stem}_good.txt") + _read_names(gt_dir / f"{stem}_ok.txt")
        )
        junk = lookup(_read_names(gt_dir / f"{stem}_junk.txt"))
        queries.append(
            Query(database[index[image_name]], box, {"default": (positives, junk)}, name=stem)
        )
    return RetrievalDataset(
        name=name or gt_dir.name,
        database=database,
        queries=queries,
        info={"missing": len(missing)},
    )


# ---------------------------------------------------------------------------------------
# Holidays, UKBench, folders, JSON groups
# ---------------------------------------------------------------------------------------


def load_holidays(image_dir) -> RetrievalDataset:
    """INRIA Holidays (Jégou et al., ECCV 2008): ``<id>.jpg`` with group = id // 100.

    The first image (lowest id) of each group is its query; the others are its positives.
    The database holds every image, the queries included (each is junk for itself).
    """
    image_dir = _require_dir(image_dir, "Holidays image folder")
    images = [p for p in _images_in(image_dir) if p.stem.isdigit()]
    if not images:
        raise BadPathError(f"no Holidays images (<digits>.jpg) in {image_dir}")
    images.sort(key=lambda p: int(p.stem))
    database = [str(p) for p in images]
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(images):
        groups.setdefault(int(p.stem) // 100, []).append(i)
    keys = sorted(groups)
    return RetrievalDataset(
        name="holidays",
        database=database,
        queries=_group_queries(database, [groups[k] for k in keys], [str(k) for k in keys], False),
    )


def load_ukbench(image_dir) -> RetrievalDataset:
    """UKBench (Nistér & Stewénius, CVPR 2006): ``ukbench<n>.jpg``, groups of four (n // 4).

    Every image is a query; the other three of its group are its positives.
    """
    image_dir = _require_dir(image_dir, "UKBench image folder")
    pattern = re.compile(r"ukbench(\d+)$", re.IGNORECASE)
    images = [p for p in _images_in(image_dir) if pattern.search(p.stem)]
    if not images:
        raise BadPathError(f"no UKBench images (ukbench<n>.jpg) in {image_dir}")
    images.sort(key=lambda p: int(pattern.search(p.stem).group(1)))
    database = [str(p) for p in images]
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(images):
        groups.setdefault(int(pattern.search(p.stem).group(1)) // 4, []).append(i)
    keys = sorted(groups)
    return RetrievalDataset(
        name="ukbench",
        database=database,
        queries=_group_queries(database, [groups[k] for k in keys], [str(k) for k in keys], True),
    )


def load_folders(root) -> RetrievalDataset:
    """A folder per class: ``root/<class>/<image>``; every image a query against the rest.

    Images directly in ``root`` (outside any class folder) are distractors.
    """
    root = _require_dir(root, "class folder root")
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    database: list[str] = []
    groups, names = [], []
    for folder in classes:
        images = _images_in(folder)
        if images:
            groups.append(list(range(len(database), len(database) + len(images))))
            names.append(folder.name)
            database.extend(str(p) for p in images)
    distractors = [str(p) for p in _images_in(root)]
    if not groups:
        raise BadPathError(f"no class folders with images in {root}")
    database.extend(distractors)
    return RetrievalDataset(
        name=root.name,
        database=database,
        queries=_group_queries(database, groups, names, True),
        info={"distractors": len(distractors)},
    )


def load_groups_json(path) -> RetrievalDataset:
    """A JSON file of groups of matching images, paths relative to the JSON file::

        {"groups": [{"name": "eiffel", "images": ["a.jpg", "b.jpg"], "queries": ["a.jpg"]},
                    ...],
         "distractors": ["x.jpg", ...]}

    Every image of a group is a query against all the others, unless the group lists
    ``queries`` (a subset of its ``images``, the format of ``holidays/groundtruth.json``, whose
    protocol queries only each group's first image): then only those are queries, their
    positives the group's other images. Distractors are database-only.
    """
    path = Path(path)
    if not path.is_file():
        raise BadPathError(f"no groups JSON file at {path}")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidInputError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("groups"), list):
        raise InvalidInputError(f"{path}: expected an object with a 'groups' list")
    base = path.parent
    database: list[str] = []
    seen: dict[str, int] = {}
    groups, names = [], []

    def add(rel, where: str) -> int:
        if not isinstance(rel, str) or not rel:
            raise InvalidInputError(
                f"{path}: {where}: image paths must be non-empty strings, got {rel!r}"
            )
        full = os.path.normpath(base / rel)
        if full in seen:
            raise InvalidInputError(f"{path}: {where}: image {rel} is listed twice")
        seen[full] = len(database)
        database.append(full)
        return seen[full]

    chosen: list[list[int] | None] = []
    for g, group in enumerate(spec["groups"]):
        if not isinstance(group, dict) or not isinstance(group.get("images"), list):
            raise InvalidInputError(f"{path}: groups[{g}] needs an 'images' list")
        name = str(group.get("name", g))
        groups.append([add(rel, f"groups[{g}] ({name})") for rel in group["images"]])
        names.append(name)
        chosen.append(_listed_queries(path, group, f"groups[{g}] ({name})", seen))
    distractors = spec.get("distractors", [])
    if not isinstance(distractors, list):
        raise InvalidInputError(f"{path}: 'distractors' must be a list of paths")
    for rel in distractors:
        add(rel, "distractors")
    absent = [p for p in database if not os.path.isfile(p)]
    if absent:
        raise BadPathError(f"{path}: {len(absent)} listed image(s) do not exist, e.g. {absent[:3]}")
    return RetrievalDataset(
        name=path.stem,
        database=database,
        queries=_group_queries(database, groups, names, True, chosen),
        info={"distractors": len(distractors)},
    )


def _listed_queries(path: Path, group: dict, where: str, seen: dict) -> list[int] | None:
    """The database indices of a group's ``queries`` (None when the group lists none)."""
    if "queries" not in group:
        return None
    listed = group["queries"]
    if not isinstance(listed, list):
        raise InvalidInputError(f"{path}: {where}: 'queries' must be a list of image paths")
    members = {os.path.normpath(path.parent / rel) for rel in group["images"]}
    indices = []
    for rel in listed:
        full = os.path.normpath(path.parent / rel) if isinstance(rel, str) and rel else None
        if full not in members:
            raise InvalidInputError(
                f"{path}: {where}: query {rel!r} is not one of the group's images"
            )
        indices.append(seen[full])
    return indices


def detect_format(path) -> str:
    """Guesses the ground-truth format of ``path`` (one of ``FORMATS``)."""
    path = Path(path)
    if path.is_file():
        if path.suffix == ".pkl":
            return "revisited"
        if path.suffix == ".json":
            return "groups"
        raise InvalidInputError(f"cannot tell the dataset format of {path}: expected .pkl or .json")
    if not path.is_dir():
        raise BadPathError(f"no dataset at {path}")
    if any(path.glob("*_query.txt")):
        return "oxford"
    images = _images_in(path)
    if images and all(p.stem.isdigit() for p in images):
        return "holidays"
    if images and all(p.stem.lower().startswith("ukbench") for p in images):
        return "ukbench"
    if any(p.is_dir() for p in path.iterdir()):
        return "folders"
    raise InvalidInputError(
        f"cannot tell the dataset format of {path}; pass one of {FORMATS} explicitly"
    )


def load_dataset(path, format: str = "auto", images=None) -> RetrievalDataset:
    """Loads ground truth in any supported format.

    Args:
        path: a .pkl (revisited), a .json (groups), a folder of Oxford/Paris text files,
            a Holidays or UKBench image folder, or a folder of class folders.
        format: "auto" or one of ``FORMATS``.
        images: the image folder for "revisited" (default ``<pkl dir>/jpg``) and "oxford"
            (required).
    """
    if format == "auto":
        format = detect_format(path)
    if format == "revisited":
        return load_revisited(path, images)
    if format == "oxford":
        if images is None:
            raise InvalidInputError(
                "the Oxford/Paris text format needs the image folder (--images / images=...)"
            )
        return load_oxford_paris(path, images)
    if format == "holidays":
        return load_holidays(path)
    if format == "ukbench":
        return load_ukbench(path)
    if format == "folders":
        return load_folders(path)
    if format == "groups":
        return load_groups_json(path)
    raise InvalidInputError(f"dataset format must be 'auto' or one of {FORMATS}, got {format!r}")
