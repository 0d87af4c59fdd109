"""The output of ``remap embed``: descriptor shards with their ids, dead letters, a manifest.

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

A shard is finished when its commit record exists and its two files have the recorded sizes
(`shard_complete`, the cheap check a rerun uses to skip it); readers (`iter_shards`,
`load_embeddings`) check every SHA-256 against the manifest. Local files are written
atomically with `remap_tf.io`; on other filesystems through Beam's ``FileSystems`` (a
temporary name, then a rename).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from remap_tf.errors import BadPathError, FileFormatError, InvalidInputError
from remap_tf.io import atomic_write_bytes
from remap_tf.serving.manifest import sha256_bytes

FORMAT = "remap-embeddings"
FORMAT_VERSION = 1
RUN_FILE = "embed.json"
MANIFEST = "manifest.json"
DEAD_LETTER = "dead_letter.jsonl"


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
    return f"lists/shard-{shard:05d}.json"


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
    write_json(join(out, MANIFEST), manifest)
    return manifest


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


# --- reading ---------------------------------------------------------------------------------


def read_manifest(out) -> dict:
    """The verified-format manifest of a finished ``remap embed`` folder."""
    if not is_remote(out) and not Path(out).is_dir():
        raise BadPathError(f"no embeddings folder at {out}")
    manifest = read_json(join(out, MANIFEST), f"the {FORMAT} manifest; is the run finished?")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise FileFormatError(f"{join(out, MANIFEST)} is not a {FORMAT} manifest")
    if not isinstance(manifest.get("format_version"), int) or manifest["format_version"] > 1:
        raise FileFormatError(f"{join(out, MANIFEST)}: unsupported format_version")
    return manifest


def _checked(out, name: str, manifest: dict) -> bytes:
    entry = manifest["files"].get(name)
    if entry is None:
        raise FileFormatError(f"{join(out, MANIFEST)} does not list {name}")
    try:
        data = read_bytes(join(out, name))
    except FileNotFoundError:
        raise FileFormatError(f"{out}: {name} is missing") from None
    if len(data) != entry["bytes"] or sha256_bytes(data) != entry["sha256"]:
        raise FileFormatError(f"{out}: {name} does not match its size and SHA-256 (altered)")
    return data


def read_shard(out, shard: int, manifest: dict) -> tuple[list, np.ndarray]:
    """``(ids, descriptors (n, dim) float32)`` of one shard, checksums checked."""
    npy, ids_name, _ = shard_names(shard)
    ids = json.loads(_checked(out, ids_name, manifest).decode("utf-8"))
    if not ids:
        return [], np.zeros((0, manifest["dim"] or 0), np.float32)
    rows = np.load(io.BytesIO(_checked(out, npy, manifest)), allow_pickle=False)
    if rows.shape != (len(ids), manifest["dim"]) or rows.dtype != np.float32:
        raise FileFormatError(f"{out}: {npy} has shape {rows.shape} {rows.dtype}")
    return ids, rows


def iter_shards(out, manifest: dict | None = None) -> Iterator[tuple[int, list, np.ndarray]]:
    """``(shard, ids, descriptors (n, dim) float32)`` of each non-empty shard, checksums
    checked."""
    manifest = manifest or read_manifest(out)
    for shard in range(manifest["num_shards"]):
        ids, rows = read_shard(out, shard, manifest)
        if ids:
            yield shard, ids, rows


def load_embeddings(folders) -> tuple[list[str], np.ndarray, dict]:
    """Every id and descriptor of one or more ``remap embed`` folders, checked.

    Returns:
        ``(ids, descriptors (n, dim) float32, info)`` with ``info = {"dim", "count",
        "dead", "model", "source"}`` (model and source of the first folder).

    Raises:
        InvalidInputError: folders of different descriptor sizes, or an id in two of them.
    """
    folders = [folders] if isinstance(folders, str | os.PathLike) else list(folders)
    ids, parts, info = [], [], None
    for out in folders:
        manifest = read_manifest(out)
        if info is None:
            info = {k: manifest[k] for k in ("dim", "model", "source")} | {"count": 0, "dead": 0}
        elif manifest["dim"] not in (None, info["dim"]):
            raise InvalidInputError(
                f"{out} holds {manifest['dim']}-d descriptors, not {info['dim']}"
            )
        for _, shard_ids, rows in iter_shards(out, manifest):
            ids.extend(shard_ids)
            parts.append(rows)
        info["count"] += manifest["count"]
        info["dead"] += manifest["dead"]
    if len(set(ids)) != len(ids):
        raise InvalidInputError("the same id appears in more than one embeddings folder")
    if not ids:
        raise InvalidInputError(f"no descriptors in {', '.join(map(str, folders))}")
    return ids, np.concatenate(parts), info
