"""The one on-disk format of descriptor shards: ids, descriptors, dead letters, a manifest.

Written by ``remap embed`` (`remap_tf.serving.beam_embed`) and by ``remap index build
--images`` (`remap_tf.serving.local_embed`, in this process), read by ``remap index build``
(`load_embeddings`, `remap_tf.serving.beam_index`) and ``remap evaluate``.

A folder (a local path, or any filesystem Beam supports, e.g. ``gs://bucket/run``)::

    embed.json               the run: {"format": "remap-embeddings", "format_version": 1,
                             "source", "model", "shard_size", "num_images", "num_shards",
                             "images_sha256"} (a rerun must match it)
    lists/shard-00000.json   [[id, path], ...]: the images of shard 0, in row order
    shard-00000.npy          (n_0, dim) float32 descriptors (allow_pickle=False)
    shard-00000.ids.json     the n_0 ids of those rows
    shard-00000.json         the shard's commit record, written last: {"shard", "count",
                             "dim", "dead": [{"id", "image", "reason"}],
                             "files": {name: {"sha256", "bytes"}}}
    dead_letter.jsonl        one {"id", "image", "reason"} per image that could not be embedded
    manifest.json            {"format", "format_version", "dim", "count", "dead", "num_shards",
                             "model", "source", "files": {every shard file: {"sha256", "bytes"}}}

A local folder is claimed for the command writing it (`claim_output`: the marker of
`remap_tf.outputs`, output `EMBEDDINGS_OUTPUT`), and `plan_run` lists a run's files in it
before writing them: a user's folder, or a user's ``shard-00000.npy``, is never written over.

A folder of the retired format (``store.json`` beside ``shard-N.npy`` / ``shard-N.json`` that
list image paths) is refused by `check_not_retired` with how to convert it
(`upgrade_retired`, ``remap index upgrade``).

A shard is finished when its commit record exists and its two files have the recorded sizes
(`shard_complete`, the cheap check a rerun uses to skip it); readers (`iter_shards`,
`load_embeddings`) check every SHA-256 against the manifest. Local files are written
atomically with `remap_tf.io`; on other filesystems through Beam's ``FileSystems`` (a
temporary name, then a rename).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from remap_tf import outputs
from remap_tf.contract import MANIFEST_FILE
from remap_tf.errors import BadPathError, FileFormatError, InvalidInputError, OutputExistsError
from remap_tf.io import atomic_write_bytes
from remap_tf.serving.manifest import sha256_bytes

FORMAT = "remap-embeddings"
FORMAT_VERSION = 1
RUN_FILE = "embed.json"
DEAD_LETTER = "dead_letter.jsonl"
PLANS = "lists"
RETIRED_STORE = "store.json"  # the header of the retired format (shards of image paths)
# The output (`remap_tf.outputs`) a local descriptor folder is claimed for, by the command
# that writes it: ``remap embed``, ``remap index build`` (``<out>.embeddings``), ``remap
# evaluate --embeddings``.
EMBEDDINGS_OUTPUT = "embeddings"
_OWN_NAME = re.compile(r"shard-\d{5}\.(npy|ids\.json|json)")


# --- storage: local paths directly, anything else through Beam's FileSystems ----------------


def is_remote(path) -> bool:
    return "://" in str(path)


def join(base, *parts) -> str:
    if is_remote(base):
        from apache_beam.io.filesystems import FileSystems

        return FileSystems.join(str(base), *parts)
    return os.path.join(str(base), *parts)


def write_bytes(path, data: bytes) -> None:
    """Writes a whole file atomically (local) or by create-then-rename (other filesystems)."""
    if not is_remote(path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)
        return
    from apache_beam.io.filesystems import FileSystems

    temporary = f"{path}.tmp-{os.getpid()}"
    with FileSystems.create(temporary) as handle:
        handle.write(data)
    FileSystems.rename([temporary], [str(path)])


def read_bytes(path) -> bytes:
    if not is_remote(path):
        return Path(path).read_bytes()
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(str(path)) as handle:
        return handle.read()


def size_of(path) -> int | None:
    """A file's size in bytes, None when it does not exist."""
    if not is_remote(path):
        return Path(path).stat().st_size if Path(path).is_file() else None
    from apache_beam.io.filesystems import FileSystems

    matched = FileSystems.match([str(path)])[0].metadata_list
    return matched[0].size_in_bytes if matched else None


def write_json(path, value) -> None:
    write_bytes(path, json.dumps(value, indent=1).encode("utf-8"))


def read_json(path, what: str):
    try:
        return json.loads(read_bytes(path).decode("utf-8"))
    except FileNotFoundError:
        raise BadPathError(f"{path} is missing ({what})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FileFormatError(f"{path}: {what} is not valid JSON ({error})") from None


# --- shards ---------------------------------------------------------------------------------


def shard_names(shard: int) -> tuple[str, str, str]:
    """``(descriptors .npy, ids .json, commit .json)`` file names of a shard."""
    stem = f"shard-{shard:05d}"
    return f"{stem}.npy", f"{stem}.ids.json", f"{stem}.json"


def plan_name(shard: int) -> str:
    return f"{PLANS}/shard-{shard:05d}.json"


def npy_bytes(array: np.ndarray) -> bytes:
    """``np.save`` of ``array`` (no pickle) as bytes."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def write_shard(out, shard: int, ids: Sequence[str], descriptors, dead=()) -> dict:
    """Writes one shard's descriptors and ids, then its commit record; returns the record.

    Args:
        out: the output folder.
        shard: shard number.
        ids: ``(n,)`` ids of the rows.
        descriptors: ``(n, dim)`` float32 rows (``(0, 0)`` when every image was dead).
        dead: ``[{"id", "image", "reason"}]`` of the shard's images that failed.
    """
    descriptors = np.ascontiguousarray(descriptors, dtype=np.float32)
    if descriptors.ndim != 2 or descriptors.shape[0] != len(ids):
        raise InvalidInputError(f"{len(ids)} ids for descriptors of shape {descriptors.shape}")
    npy, ids_name, commit = shard_names(shard)
    payloads = {
        npy: npy_bytes(descriptors),
        ids_name: json.dumps(list(ids)).encode("utf-8"),
    }
    for name, data in payloads.items():
        write_bytes(join(out, name), data)
    record = {
        "shard": shard,
        "count": len(ids),
        "dim": int(descriptors.shape[1]) if len(ids) else None,
        "dead": list(dead),
        "files": {n: {"sha256": sha256_bytes(d), "bytes": len(d)} for n, d in payloads.items()},
    }
    write_json(join(out, commit), record)
    return record


def read_commit(out, shard: int) -> dict | None:
    """A shard's commit record, or None when it is missing or unreadable."""
    path = join(out, shard_names(shard)[2])
    try:
        record = json.loads(read_bytes(path).decode("utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("shard") == shard else None


def shard_complete(out, shard: int) -> bool:
    """True when the shard's commit record exists and its files have the recorded sizes."""
    record = read_commit(out, shard)
    if record is None:
        return False
    return all(size_of(join(out, n)) == e["bytes"] for n, e in record["files"].items())


def finalize(out, run: dict) -> dict:
    """Collects the commit records of every shard into ``dead_letter.jsonl`` and
    ``manifest.json``; returns the manifest.

    Raises:
        FileFormatError: a shard is not finished.
    """
    files, dims, count, dead = {}, set(), 0, []
    for shard in range(run["num_shards"]):
        record = read_commit(out, shard)
        if record is None:
            raise FileFormatError(f"{out}: shard {shard} is not finished; run remap embed again")
        files.update(record["files"])
        files[shard_names(shard)[2]] = _entry(read_bytes(join(out, shard_names(shard)[2])))
        count += record["count"]
        dead.extend(record["dead"])
        if record["dim"] is not None:
            dims.add(record["dim"])
    if len(dims) > 1:
        raise FileFormatError(f"{out}: shards of different descriptor sizes {sorted(dims)}")
    lines = "".join(json.dumps(d) + "\n" for d in dead).encode("utf-8")
    write_bytes(join(out, DEAD_LETTER), lines)
    files[DEAD_LETTER] = _entry(lines)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dim": dims.pop() if dims else None,
        "count": count,
        "dead": len(dead),
        "num_shards": run["num_shards"],
        "model": run.get("model"),
        "source": run.get("source"),
        "files": files,
    }
    write_json(join(out, MANIFEST_FILE), manifest)
    return manifest


def finish_run(out, run: dict, embedded: list, skipped: list) -> dict:
    """`finalize` after a run, and what the run did: the summary both embedders return
    (``out``, ``count``, ``dim``, ``dead``, ``shards``, ``embedded_shards``, ``skipped_shards``
    and ``manifest``)."""
    manifest = finalize(out, run)
    return {
        "out": out,
        "count": manifest["count"],
        "dim": manifest["dim"],
        "dead": dead_letters(out),
        "shards": run["num_shards"],
        "embedded_shards": embedded,
        "skipped_shards": skipped,
        "manifest": manifest,
    }


def _entry(data: bytes) -> dict:
    return {"sha256": sha256_bytes(data), "bytes": len(data)}


def write_embeddings(out, ids, descriptors, shard_size: int = 10_000, model=None, source=None):
    """Writes rows already in memory in the ``remap embed`` format (tests, benchmarks, or
    descriptors computed elsewhere); returns the manifest."""
    ids = list(ids)
    descriptors = np.asarray(descriptors, dtype=np.float32)
    num_shards = max(1, -(-len(ids) // shard_size))
    for shard in range(num_shards):
        rows = slice(shard * shard_size, (shard + 1) * shard_size)
        write_shard(out, shard, ids[rows], descriptors[rows])
    run = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "source": source,
        "model": model,
        "shard_size": shard_size,
        "num_images": len(ids),
        "num_shards": num_shards,
    }
    write_json(join(out, RUN_FILE), run)
    return finalize(out, run)


# --- a run: what is embedded, checked on a rerun ---------------------------------------------


def model_reference(model) -> str | None:
    """How a run (and an index) records its model: an existing local path made absolute
    (workers, and later commands, may start in another folder), anything else as given."""
    if model is None:
        return None
    text = os.fspath(model)
    return str(Path(text).resolve()) if not is_remote(text) and os.path.exists(text) else text


def is_embeddings_folder(path) -> bool:
    """True when a local folder holds (part of) a run of this format: its ``embed.json``."""
    return (Path(path) / RUN_FILE).is_file()


def check_not_retired(out) -> None:
    """FileFormatError saying how to convert a folder of the retired ``store.json`` format."""
    if is_remote(out) or is_embeddings_folder(out) or not (Path(out) / RETIRED_STORE).is_file():
        return
    raise FileFormatError(
        f"{out} holds descriptors in the retired {RETIRED_STORE} format; convert them with "
        f"`remap index upgrade --embeddings {out} --images IMAGES --model MODEL` (the images "
        "and model they were made with), or delete the folder and run again"
    )


def _look_alikes(folder: Path) -> list[str]:
    """Names in ``folder`` that this format writes (a user's ``shard-00000.npy``)."""
    own = {RUN_FILE, DEAD_LETTER, MANIFEST_FILE, PLANS}
    return sorted(p.name for p in folder.iterdir() if p.name in own or _OWN_NAME.fullmatch(p.name))


def check_output(out, command: str, overwrite: bool = False) -> None:
    """Raises the error `claim_output` would raise; writes nothing (checks before the work).

    A local folder must be absent, empty, or carry the marker of ``remap <command>`` for
    `EMBEDDINGS_OUTPUT`; any other only with ``overwrite``, and even then a file named as
    this format's files (``shard-00000.npy``, ``manifest.json``, ...) is never replaced,
    unless the folder holds a run of an earlier remap (its ``embed.json``: a rerun checks it
    is the same run, then resumes it). A folder on another filesystem is not checked.

    Raises:
        OutputExistsError: one line naming the folder (and the file in the way).
        FileFormatError: a folder of the retired format (how to convert it).
    """
    if is_remote(out):
        return
    check_not_retired(out)
    folder = outputs.check_claim(out, command, EMBEDDINGS_OUTPUT, overwrite)
    if not folder.is_dir() or outputs.owned(folder, command, EMBEDDINGS_OUTPUT):
        return
    clash = [] if is_embeddings_folder(folder) else _look_alikes(folder)
    if clash:
        raise OutputExistsError(
            f"{str(folder / clash[0])!r} is not remap's, and descriptor shards are written "
            "under that name; move it away (--overwrite keeps a folder's other files, never "
            "replaces them)"
        )


def claim_output(out, command: str, overwrite: bool = False) -> None:
    """Takes a local descriptor folder for ``remap <command>`` (`check_output` says which);
    `plan_run` then lists the files of the run in its marker before writing them."""
    check_output(out, command, overwrite)
    if not is_remote(out):
        outputs.claim(out, command, EMBEDDINGS_OUTPUT, overwrite)


def run_files(run: dict) -> list[str]:
    """Every file a run writes, relative to its folder."""
    names = [RUN_FILE, DEAD_LETTER, MANIFEST_FILE]
    for shard in range(run["num_shards"]):
        names += [plan_name(shard), *shard_names(shard)]
    return names


def _record_run(out, run: dict, existing: dict | None) -> None:
    """Lists the run's files in the folder's marker (a claimed local folder), before they are
    written. A same run that an earlier remap wrote there without listing it (its
    ``embed.json`` checked equal) is taken over; any other unlisted file is refused."""
    if is_remote(out) or outputs.read_marker(out) is None:
        return
    known = set(outputs.listed(out))
    adopt = existing is not None and RUN_FILE not in known
    names = run_files(run)
    clash = [] if adopt else [n for n in names if n not in known and Path(out, n).exists()]
    if clash:
        raise OutputExistsError(
            f"{str(Path(out, clash[0]))!r} exists and remap did not write it; refusing to "
            "replace it (move it away)"
        )
    outputs.record(out, names, overwrite=adopt)


def _describe_run(ids, paths, shard_size: int, source, model) -> tuple[dict, list, list]:
    """``(run, ids, paths)``: the ``embed.json`` of a run, local paths made absolute."""
    ids = [str(i) for i in ids]
    if len(set(ids)) != len(ids):
        raise InvalidInputError(f"{source or 'the image list'} gives some images the same id")
    paths = [p if is_remote(p) else str(Path(p).resolve()) for p in map(str, paths)]
    digest = hashlib.sha256(
        "\n".join(f"{i}\t{p}" for i, p in zip(ids, paths, strict=True)).encode("utf-8")
    )
    run = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "source": None if source is None else str(source),
        "model": model_reference(model),
        "shard_size": int(shard_size),
        "num_images": len(paths),
        "num_shards": -(-len(paths) // shard_size),
        "images_sha256": digest.hexdigest(),
    }
    return run, ids, paths


def _check_same_run(out, existing: dict, run: dict) -> None:
    changed = sorted(k for k in run if k not in ("source", "model") and existing.get(k) != run[k])
    if changed:
        raise InvalidInputError(
            f"{out} holds embeddings of another run (different {', '.join(changed)}); "
            "use another folder or delete it to start over"
        )
    if existing.get("model") != run["model"]:
        raise InvalidInputError(
            f"{out} was embedded with the model {existing.get('model')}, not {run['model']}"
        )


def _write_plans(out, run: dict, ids: list, paths: list) -> None:
    size = run["shard_size"]
    for shard in range(run["num_shards"]):
        rows = slice(shard * size, (shard + 1) * size)
        plan = [[i, p] for i, p in zip(ids[rows], paths[rows], strict=True)]
        write_json(join(out, plan_name(shard)), plan)
    write_json(join(out, RUN_FILE), run)


def plan_run(out, ids, paths, shard_size: int, source=None, model=None) -> dict:
    """Writes (or, on a rerun, checks) ``embed.json`` and the image list of each shard.

    Args:
        out: the output folder (local or on a Beam filesystem).
        ids: ``(num_images,)`` unique ids, in row order.
        paths: ``(num_images,)`` the image files.
        shard_size: images per shard (the unit a rerun skips or redoes).
        source: what the images were listed from, recorded.
        model: the model (export folder or TF Serving address), recorded; a rerun must
            use the same one.

    Returns:
        The run (``embed.json``).

    In a folder claimed with `claim_output` (local), every file of the run is listed in the
    marker first (`run_files`); a file of such a name that remap did not write is refused.

    Raises:
        InvalidInputError: ids repeat, or ``out`` holds another run.
        FileFormatError: ``out`` is a folder of the retired format.
        OutputExistsError: a file of the run's names that remap did not write.
    """
    if shard_size < 1:
        raise InvalidInputError(f"the shard size must be >= 1, got {shard_size}")
    check_not_retired(out)
    run, ids, paths = _describe_run(ids, paths, shard_size, source, model)
    run_path = join(out, RUN_FILE)
    existing = None
    if size_of(run_path) is not None:
        existing = read_json(run_path, "the run description")
        _check_same_run(out, existing, run)
    _record_run(out, run, existing)
    _write_plans(out, run, ids, paths)
    return run


def read_plan(out, shard: int) -> list:
    """``[[id, path], ...]``: the images of one shard, in row order."""
    return read_json(join(out, plan_name(shard)), "the shard's image list")


def dead_letters(out) -> list[dict]:
    """``[{"id", "image", "reason"}]`` of a finalized folder (``dead_letter.jsonl``)."""
    text = read_bytes(join(out, DEAD_LETTER)).decode("utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# --- reading ---------------------------------------------------------------------------------


def read_manifest(out) -> dict:
    """The verified-format manifest of a finished descriptor folder."""
    if not is_remote(out) and not Path(out).is_dir():
        raise BadPathError(f"no embeddings folder at {out}")
    check_not_retired(out)
    manifest = read_json(join(out, MANIFEST_FILE), f"the {FORMAT} manifest; is the run finished?")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise FileFormatError(f"{join(out, MANIFEST_FILE)} is not a {FORMAT} manifest")
    if not isinstance(manifest.get("format_version"), int) or manifest["format_version"] > 1:
        raise FileFormatError(f"{join(out, MANIFEST_FILE)}: unsupported format_version")
    return manifest


def _checked(out, name: str, manifest: dict) -> bytes:
    entry = manifest["files"].get(name)
    if entry is None:
        raise FileFormatError(f"{join(out, MANIFEST_FILE)} does not list {name}")
    try:
        data = read_bytes(join(out, name))
    except FileNotFoundError:
        raise FileFormatError(f"{out}: {name} is missing") from None
    if len(data) != entry["bytes"] or sha256_bytes(data) != entry["sha256"]:
        raise FileFormatError(f"{out}: {name} does not match its size and SHA-256 (altered)")
    return data


def read_shard_ids(out, shard: int, manifest: dict) -> list:
    """The ids of one shard's rows, checksum checked."""
    return json.loads(_checked(out, shard_names(shard)[1], manifest).decode("utf-8"))


def read_shard_rows(out, shard: int, manifest: dict, count: int) -> np.ndarray:
    """``(count, dim)`` float32 descriptors of one shard, checksum and shape checked."""
    npy = shard_names(shard)[0]
    if not count:
        return np.zeros((0, manifest["dim"] or 0), np.float32)
    rows = np.load(io.BytesIO(_checked(out, npy, manifest)), allow_pickle=False)
    if rows.shape != (count, manifest["dim"]) or rows.dtype != np.float32:
        raise FileFormatError(f"{out}: {npy} has shape {rows.shape} {rows.dtype}")
    return rows


def read_shard(out, shard: int, manifest: dict) -> tuple[list, np.ndarray]:
    """``(ids, descriptors (n, dim) float32)`` of one shard, checksums checked."""
    ids = read_shard_ids(out, shard, manifest)
    return ids, read_shard_rows(out, shard, manifest, len(ids))


def iter_shards(out, manifest: dict | None = None) -> Iterator[tuple[int, list, np.ndarray]]:
    """``(shard, ids, descriptors (n, dim) float32)`` of each non-empty shard, checksums
    checked."""
    manifest = manifest or read_manifest(out)
    for shard in range(manifest["num_shards"]):
        ids, rows = read_shard(out, shard, manifest)
        if ids:
            yield shard, ids, rows


def shard_readers(folders, manifests=None) -> tuple[list[str], list[tuple], dict]:
    """Every id of one or more descriptor folders, and a reader of each shard's rows: what a
    build that streams the shards needs (``remap index build --from-embeddings``), the rows
    read one shard at a time and only when the build asks.

    Args:
        folders: one folder or a list.
        manifests: their manifests, when the caller read them already (else read here).

    Returns:
        ``(ids, readers, info)``: the ids in row order; ``[(name, count, read)]`` per
        non-empty shard, ``read() -> (count, dim)`` float32 rows, checksums checked at each
        read; ``info = {"dim", "count", "dead", "model", "source"}`` (model and source of
        the first folder).

    Raises:
        InvalidInputError: folders of different descriptor sizes, an id in two of them, or
            no descriptors at all.
    """
    folders = [folders] if isinstance(folders, str | os.PathLike) else list(folders)
    manifests = manifests or [read_manifest(out) for out in folders]
    ids, readers, info = [], [], None
    for out, manifest in zip(folders, manifests, strict=True):
        if info is None:
            info = {k: manifest[k] for k in ("dim", "model", "source")} | {"count": 0, "dead": 0}
        elif manifest["dim"] not in (None, info["dim"]):
            raise InvalidInputError(
                f"{out} holds {manifest['dim']}-d descriptors, not {info['dim']}"
            )
        for shard in range(manifest["num_shards"]):
            shard_ids = read_shard_ids(out, shard, manifest)
            if shard_ids:
                ids.extend(shard_ids)
                read = functools.partial(read_shard_rows, out, shard, manifest, len(shard_ids))
                readers.append((join(out, shard_names(shard)[0]), len(shard_ids), read))
        info["count"] += manifest["count"]
        info["dead"] += manifest["dead"]
    if len(set(ids)) != len(ids):
        raise InvalidInputError("the same id appears in more than one embeddings folder")
    if not ids:
        raise InvalidInputError(f"no descriptors in {', '.join(map(str, folders))}")
    return ids, readers, info


def load_embeddings(folders, manifests=None) -> tuple[list[str], np.ndarray, dict]:
    """Every id and descriptor of one or more descriptor folders, checked, in one array
    (`shard_readers` streams them instead).

    Args:
        folders: one folder or a list.
        manifests: their manifests, when the caller read them already (else read here).

    Returns:
        ``(ids, descriptors (n, dim) float32, info)`` with ``info = {"dim", "count",
        "dead", "model", "source"}`` (model and source of the first folder).

    Raises:
        InvalidInputError: folders of different descriptor sizes, or an id in two of them.
    """
    ids, readers, info = shard_readers(folders, manifests)
    rows = np.empty((len(ids), info["dim"]), np.float32)
    start = 0
    for _, count, read in readers:
        rows[start : start + count] = read()
        start += count
    return ids, rows, info


# --- the retired format -----------------------------------------------------------------------


def upgrade_retired(out, ids, paths, source=None, model=None) -> dict:
    """Converts a folder of the retired ``store.json`` format in place, keeping its descriptors.

    Each finished shard of the retired format (``shard-N.npy`` rows of the image paths that
    ``shard-N.json`` lists, and the paths it skipped) becomes a shard of this format, with
    ids; ``store.json`` is removed last, so an interrupted upgrade can be run again. A shard
    the retired run had not finished is left for the next ``remap index build`` to embed.

    Args:
        out: the retired folder (local).
        ids, paths: the collection it was made from (as `remap_tf.serving.collection.list_images`
            lists it: same images, same order).
        source, model: recorded in ``embed.json``.

    Returns:
        ``{"out", "converted": shards converted now, "num_shards", "manifest": None until
        every shard is finished}``.

    Raises:
        InvalidInputError: the folder holds descriptors of other images.
        FileFormatError: it is not in the retired format.
    """
    folder = Path(out)
    header_path = folder / RETIRED_STORE
    if not header_path.is_file():
        raise FileFormatError(f"{out} is not in the retired {RETIRED_STORE} format")
    header = read_json(header_path, f"the retired {RETIRED_STORE}")
    if not isinstance(header, dict) or not isinstance(header.get("shard_size"), int):
        raise FileFormatError(f"{header_path} is not a retired descriptor store header")
    if header.get("num_images") != len(paths):
        raise InvalidInputError(
            f"{out} holds descriptors of {header.get('num_images')} images, not of the "
            f"{len(paths)} images given; give the images it was made from"
        )
    run, ids, paths = _describe_run(ids, paths, header["shard_size"], source, model)
    converted = sum(_upgrade_shard(folder, s, run, ids, paths) for s in range(run["num_shards"]))
    _write_plans(out, run, ids, paths)
    header_path.unlink()
    complete = all(read_commit(out, s) is not None for s in range(run["num_shards"]))
    manifest = finalize(out, run) if complete else None
    return {
        "out": str(out),
        "converted": converted,
        "num_shards": run["num_shards"],
        "manifest": manifest,
    }


def _upgrade_shard(folder: Path, shard: int, run: dict, ids: list, paths: list) -> bool:
    """Rewrites one retired shard as a shard of this format; False when there is none."""
    npy, _, commit = shard_names(shard)
    if read_commit(folder, shard) is not None or not (folder / commit).is_file():
        return False  # converted already, or never finished
    old = read_json(folder / commit, "a retired shard record")
    rows = slice(shard * run["shard_size"], (shard + 1) * run["shard_size"])
    id_of = dict(zip(paths[rows], ids[rows], strict=True))  # paths are absolute here
    try:
        images, skipped = old["images"], old["skipped"]
        done = [id_of[str(Path(x).resolve())] for x in images]
        lost = [(str(Path(d["image"]).resolve()), d["reason"]) for d in skipped]
        dead = [{"id": id_of[path], "image": path, "reason": reason} for path, reason in lost]
    except (KeyError, TypeError) as error:
        raise InvalidInputError(
            f"{folder}: shard {shard} holds {error} that is not among those images in that "
            "order; give the images the folder was made from"
        ) from None
    if len(done) + len(dead) != len(ids[rows]):
        raise InvalidInputError(f"{folder}: shard {shard} does not cover the images given")
    descriptors = np.load(folder / npy, allow_pickle=False)
    if descriptors.shape[0] != len(done):
        raise FileFormatError(f"{folder}: {npy} has {descriptors.shape[0]} rows, not {len(done)}")
    write_shard(folder, shard, done, descriptors if done else np.zeros((0, 0), np.float32), dead)
    return True
