"""Benchmark vectors shaped like real REMAP descriptors: a fit of their spectrum and clusters.

bench.ann's clustered data (isotropic Gaussian clusters around random centres) has a flat
spectrum and well separated clusters; real descriptors have neither. This module fits the
shape of real ones and draws any number of vectors from the fit:

1. ``fit``: the photos of the shared data pack (multiview, holidays, ukbench: every image of
   every split, as their ``groundtruth.json`` list them) are embedded by the product's own
   path (the bundled default model, `remap_tf.specs.BUNDLED_DEFAULT`, exported at
   `remap_tf.contract.DEFAULT_IMAGE_SIZE` and run by `remap_tf.serving.local_embed` into
   the descriptor-shard format; cached next to the fit, so a rerun resumes). Then, on the
   L2-normalised rows: the mean, the PCA (eigenvalues, eigenvectors), the top-k directions
   that keep ``--variance`` of it, and in that k-d space the photos' cluster structure: their
   groups (the views of one scene or object that ``groundtruth.json`` lists; a distractor is
   a group of one) as a Gaussian of group centres, a pooled diagonal within-group Gaussian,
   and each group's size and tightness; plus the isotropic variance of the other
   directions (split, like the rest, into a group-shared and a per-row part). Saved as an
   .npz with the source described in it. (A diagonal Gaussian mixture chosen by BIC was
   tried first: BIC picks one component on 1,932 rows in ~460 dims, and then no near
   neighbours are generated; docs/benchmarks.md has the figures.)
2. `generate`: n rows from the fit (new groups drawn like the real ones until there are n
   rows, back-projected, plus the residual noise, L2-normalised), float32, in chunks:
   n x dim x 4 bytes plus a few chunks of `CHUNK` rows.
3. ``check``: real against generated at equal size (and bench.ann's clustered data at noise
   0.5 and 1.0 for contrast): the variance of the top 8/32/128 PCA directions and the 1-NN
   and 10-NN cosine-distance quantiles; a markdown table, written to docs/benchmarks.md
   (section "shaped-fit") unless ``--no-write``.

Usage:
    python -m bench.shaped fit --out ~/.cache/remap-bench/shaped-fit.npz
    python -m bench.shaped check --fit ~/.cache/remap-bench/shaped-fit.npz
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from remap_tf.errors import BadPathError, FileFormatError, InvalidInputError, RemapError

DATA_ROOT = Path("/work/shared/data")
DATA_SETS = ("multiview", "holidays", "ukbench")
DEFAULT_FIT = Path("~/.cache/remap-bench/shaped-fit.npz")
# Fraction of the variance the group model's PCA space keeps; the rest is isotropic noise.
VARIANCE_KEPT = 0.95
TOPS = (8, 32, 128)  # the spectrum check: variance share of the top directions
QUANTILES = (10, 50, 90)
FIT_FORMAT = "remap-bench-shaped-fit-1"
CHUNK = 16_384  # rows generated at once (a few float32 arrays of CHUNK x dim)


# --- the real descriptors ---------------------------------------------------------------------


def list_photos(root: Path, sets=DATA_SETS) -> tuple[list[str], list[str], list[str]]:
    """``(paths, ids, groups)`` of every image the sets' ``groundtruth.json`` name (groups,
    queries and distractors), each once; ids ``<set>/<relative path>``, groups
    ``<set>/<group name>`` (a distractor is a group of its own)."""
    paths, ids, groups = [], [], []
    for name in sets:
        folder = Path(root) / name
        listing = folder / "groundtruth.json"
        if not listing.is_file():
            raise BadPathError(f"--data {root}: {listing} is missing (the data pack's sets).")
        truth = json.loads(listing.read_text(encoding="utf-8"))
        owner = {}
        for group in truth["groups"]:
            for image in group["images"] + group.get("queries", []):
                owner.setdefault(image, f"{name}/{group['name']}")
        for image in truth.get("distractors", []):
            owner.setdefault(image, f"{name}/{image}")
        for relative, group in owner.items():
            paths.append(str(folder / relative))
            ids.append(f"{name}/{relative}")
            groups.append(group)
    return paths, ids, groups


def embed_photos(paths: list[str], ids: list[str], cache: Path, source: str) -> tuple:
    """``(ids, (num_images, dim) descriptors)`` of ``paths`` by the bundled default model, exported
    at the default image size into ``cache/model`` and embedded in process into
    ``cache/descriptors`` (both reused: a rerun resumes the embedding)."""
    from remap_tf import REMAP
    from remap_tf.contract import DEFAULT_IMAGE_SIZE
    from remap_tf.export.saved_model import export_model
    from remap_tf.serving import embeddings
    from remap_tf.serving.client import LocalEmbedder
    from remap_tf.serving.local_embed import embed_collection
    from remap_tf.specs import BUNDLED_DEFAULT, BUNDLED_WEIGHTS

    models = cache / "model"
    if not any(models.glob("[0-9]*")):
        arguments, _ = BUNDLED_WEIGHTS["mobilenet"]
        model = REMAP("mobilenet", weights="imagenet", backbone_kwargs=arguments)
        export_model(model, models, image_size=DEFAULT_IMAGE_SIZE)
    embedder = LocalEmbedder(models)
    out = cache / "descriptors"
    summary = embed_collection(embedder, paths, ids, out, source=source, model=BUNDLED_DEFAULT)
    if summary["dead"]:
        print(f"{len(summary['dead'])} photos could not be embedded: {summary['dead'][:3]}")
    embedded, rows, _ = embeddings.load_embeddings(str(out))
    return embedded, rows


def unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# --- the fit ----------------------------------------------------------------------------------


def pca(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(mean (dim,), eigenvalues (r,), eigenvectors (dim, r))`` of the rows of ``x``,
    eigenvalues descending, r = min(num_rows - 1, dim)."""
    x = np.asarray(x, np.float64)
    mean = x.mean(axis=0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    r = min(len(x) - 1, x.shape[1])
    return mean, (s[:r] ** 2) / (len(x) - 1), vt[:r].T


def group_structure(z: np.ndarray, labels: np.ndarray) -> dict:
    """The group structure of ``z (num_rows, k)`` under integer ``labels (num_rows,)``.

    Returns ``between (k,)``: the variance of the group centres per direction (the total
    minus ``within``), ``within (k,)``: the pooled within-group variance per direction,
    ``sizes (num_groups,)`` and ``scales (num_groups,)``: each group's mean squared distance
    to its centre as a multiple of the pooled one (1 for a group of one row), so that tight
    and loose groups are both drawn.
    """
    _, labels = np.unique(labels, return_inverse=True)
    sizes = np.bincount(labels)
    centres = np.zeros((len(sizes), z.shape[1]))
    np.add.at(centres, labels, z)
    centres /= sizes[:, None]
    deviations = z - centres[labels]
    shared = sizes[labels] > 1
    freedom = max(int(shared.sum()) - int((sizes > 1).sum()), 1)
    within = (deviations[shared] ** 2).sum(axis=0) / freedom
    spread = np.bincount(labels, (deviations**2).sum(axis=1)) / np.maximum(sizes - 1, 1)
    scales = np.where(sizes > 1, spread / max(within.sum(), 1e-30), 1.0)
    between = np.maximum(z.var(axis=0, ddof=1) - within, 0.0)
    return {"between": between, "within": within, "sizes": sizes, "scales": scales}


def fit_descriptors(descriptors, groups, variance=VARIANCE_KEPT) -> dict:
    """The shape of ``descriptors (num_rows, dim)`` whose rows fall in ``groups (num_rows,)``
    (views of one scene or object): mean, PCA, and in the top-k PCA space (k keeps
    ``variance`` of the total) the group structure (`group_structure`), plus the isotropic
    variance of the other directions, split like the rest into a part shared by a group and
    a part of each row.

    Returns a dict of arrays (`save_fit` writes it): ``mean (dim,)``, ``eigenvalues (r,)``,
    ``basis (dim, k)``, ``between (k,)``, ``within (k,)``, ``sizes (num_groups,)``,
    ``scales (num_groups,)``, ``residual`` (variance per remaining direction),
    ``residual_within`` (its within-group part), ``count``.
    """
    x = unit_rows(descriptors)
    if len(x) < 20 or len(groups) != len(x):
        raise InvalidInputError(
            f"a fit needs >= 20 descriptors and one group each, got {len(x)} and {len(groups)}."
        )
    mean, eigenvalues, vectors = pca(x)
    total = eigenvalues.sum()
    k = min(int(np.searchsorted(np.cumsum(eigenvalues) / total, variance)) + 1, len(eigenvalues))
    others = max(x.shape[1] - k, 1)
    residual = (total - eigenvalues[:k].sum()) / others
    groups = np.asarray(groups)
    structure = group_structure((x - mean) @ vectors[:, :k], groups)
    # The residual's within-group share: all within-group variance less the top-k directions'.
    within_all = group_structure(x - mean, groups)["within"].sum()
    residual_within = min(max(within_all - structure["within"].sum(), 0.0) / others, residual)
    return {
        "mean": mean.astype(np.float32),
        "eigenvalues": eigenvalues,
        "basis": vectors[:, :k].astype(np.float32),
        **structure,
        "residual": np.float64(residual),
        "residual_within": np.float64(residual_within),
        "count": np.int64(len(x)),
    }


def save_fit(path, fit: dict, source: str) -> Path:
    """Writes ``fit`` and its ``source`` description to the .npz ``path`` (atomically)."""
    from remap_tf.io import atomic_write

    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tags = {"format": np.array(FIT_FORMAT), "source": np.array(source)}
    return atomic_write(path, lambda file: np.savez(file, **tags, **fit))


def load_fit(path) -> dict:
    """The fit `save_fit` wrote; a missing or foreign file is a one-line error."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise BadPathError(f"--fit {path}: no such file (`python -m bench.shaped fit` makes it).")
    try:
        with np.load(path, allow_pickle=False) as data:
            fit = {name: data[name] for name in data.files}
    except (OSError, ValueError, EOFError) as error:
        raise FileFormatError(f"--fit {path}: not a readable .npz ({error}).") from None
    if str(fit.get("format")) != FIT_FORMAT:
        raise FileFormatError(f"--fit {path}: not a bench.shaped fit (no {FIT_FORMAT!r} tag).")
    return fit


# --- generation -------------------------------------------------------------------------------


def generate(n: int, fit: dict, seed: int, chunk: int = CHUNK) -> np.ndarray:
    """``(n, dim)`` float32 unit rows drawn from ``fit``; the same ``seed`` gives the same rows.

    Groups are drawn as the real ones come (a real group's size and tightness, at random)
    until there are n rows: a new centre from the between-group Gaussian in the top-k PCA
    space plus an isotropic offset of the residual's between-group part in every direction;
    its rows from the within-group Gaussian plus isotropic noise of the residual's
    within-group part (both scaled by the group's tightness); the top-k variances are
    lowered by what the isotropic parts add there, so each keeps its fitted value. Then the
    mean is added and rows are L2-normalised. The number of groups grows with n, as in a
    real collection. Memory: the output and a few chunks.
    """
    basis = np.asarray(fit["basis"], np.float32)
    mean = np.asarray(fit["mean"], np.float32)
    residual_within = float(fit["residual_within"])
    shared = np.float32(np.sqrt(float(fit["residual"]) - residual_within))
    out = np.empty((n, len(mean)), np.float32)
    for number, start in enumerate(range(0, n, chunk)):
        rng = np.random.default_rng([seed, number])
        count = min(chunk, n - start)
        z, drawn, row_group = _group_rows(count, fit, rng)
        offsets = rng.standard_normal((len(drawn), len(mean)), dtype=np.float32)
        offsets *= shared
        x = rng.standard_normal((count, len(mean)), dtype=np.float32)
        x *= np.sqrt(fit["scales"][drawn] * residual_within).astype(np.float32)[row_group, None]
        x += offsets[row_group]
        x += z @ basis.T
        x += mean
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        out[start : start + count] = x
    return out


def _group_rows(count: int, fit: dict, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(z (count, k) float32 rows in the PCA space, drawn (num_groups,) the real groups
    each new group copies, row_group (count,) each row's new group)``; whole groups, the
    last one cut."""
    sizes, scales = fit["sizes"], fit["scales"]
    drawn = np.empty(0, np.int64)
    while sizes[drawn].sum() < count:
        more = rng.integers(0, len(sizes), count // max(int(sizes.min()), 1) // 4 + 8)
        drawn = np.concatenate([drawn, more])
    ends = np.cumsum(sizes[drawn])
    drawn = drawn[: int(np.searchsorted(ends, count)) + 1]
    row_group = np.repeat(np.arange(len(drawn)), sizes[drawn])[:count]
    residual_within = float(fit["residual_within"])
    residual_between = float(fit["residual"]) - residual_within
    k = len(fit["between"])
    centres = rng.standard_normal((len(drawn), k), dtype=np.float32)
    centres *= np.sqrt(np.maximum(fit["between"] - residual_between, 0.0)).astype(np.float32)
    spreads = np.outer(scales[drawn], np.maximum(fit["within"] - residual_within, 0.0))
    z = rng.standard_normal((count, k), dtype=np.float32)
    z *= np.sqrt(spreads).astype(np.float32)[row_group]
    z += centres[row_group]
    return z, drawn, row_group


# --- the check --------------------------------------------------------------------------------


def neighbour_distances(x: np.ndarray, ks=(1, 10), block: int = 1024) -> dict:
    """Per k in ``ks``: ``(num_rows,)`` cosine distance (1 - dot) from each row to its k-th
    nearest other row (exact, in blocks of rows)."""
    x = unit_rows(x)
    out = {k: np.empty(len(x), np.float32) for k in ks}
    for start in range(0, len(x), block):
        similarity = x[start : start + block] @ x.T
        rows = np.arange(len(similarity))
        similarity[rows, start + rows] = -np.inf  # not its own neighbour
        top = -np.sort(-similarity, axis=1)[:, : max(ks)]
        for k in ks:
            out[k][start : start + block] = 1.0 - top[:, k - 1]
    return out


def spectrum_shares(x: np.ndarray, tops=TOPS) -> dict:
    """Per t in ``tops``: the share of the total variance of ``x``'s rows on its top t PCA
    directions."""
    _, eigenvalues, _ = pca(unit_rows(x))
    cumulative = np.cumsum(eigenvalues) / eigenvalues.sum()
    return {t: float(cumulative[min(t, len(cumulative)) - 1]) for t in tops}


def describe(x: np.ndarray) -> dict:
    """The figures the check compares: spectrum shares and 1-NN / 10-NN distance quantiles."""
    distances = neighbour_distances(x)
    figures = {f"top {t}": share for t, share in spectrum_shares(x).items()}
    for k, values in distances.items():
        for q, value in zip(QUANTILES, np.percentile(values, QUANTILES), strict=True):
            figures[f"{k}-NN q{q}"] = float(value)
    return figures


def compare(real: np.ndarray, fit: dict, seed: int = 1) -> list[tuple[str, dict]]:
    """``[(name, describe(...))]`` for the real rows, as many generated ones, and bench.ann's
    clustered data (noise 0.5 and 1.0, its n/100 >= 100 clusters) of the same n and dim."""
    from bench.ann import clustered_unit_vectors

    n, dim = real.shape
    clusters = max(100, n // 100)
    sets = [("real descriptors", real), ("shaped (generated from the fit)", generate(n, fit, seed))]
    for spread in (0.5, 1.0):
        data = clustered_unit_vectors(n, dim, clusters, seed, spread, centres_seed=0)
        sets.append((f"clustered, noise {spread}", data))
    return [(name, describe(x)) for name, x in sets]


def table(rows: list[tuple[str, dict]]) -> str:
    """The check's markdown table."""
    columns = list(rows[0][1])
    lines = [
        "| data | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for name, figures in rows:
        lines.append(f"| {name} | " + " | ".join(f"{figures[c]:.3f}" for c in columns) + " |")
    return "\n".join(lines)


def fit_text(fit: dict) -> str:
    """One paragraph: what the fit holds."""
    k = fit["basis"].shape[1]
    kept_total = fit["eigenvalues"][:k].sum()
    kept = kept_total / fit["eigenvalues"].sum()
    sizes = fit["sizes"]
    scales = np.percentile(fit["scales"][sizes > 1], QUANTILES)
    return (
        f"Fit: {int(fit['count']):,} descriptors of {fit['basis'].shape[0]} dims "
        f"({fit['source']}); top {k} PCA directions keep {kept:.1%} of the variance; "
        f"{len(sizes):,} groups of {sizes.min()} to {sizes.max()} photos (mean "
        f"{sizes.mean():.1f}); within-group variance {fit['within'].sum() / kept_total:.1%} of "
        "the kept variance; group tightness (mean squared distance to the centre over the "
        f"pooled one) q10/q50/q90 {'/'.join(f'{v:.2f}' for v in scales)}; residual variance "
        f"{float(fit['residual']):.2e} per remaining direction "
        f"({float(fit['residual_within']) / float(fit['residual']):.0%} of it within groups)."
    )


# --- the commands -----------------------------------------------------------------------------


def cache_folder(fit_path: Path) -> Path:
    """Where the export and the real descriptors are kept: beside the fit."""
    return fit_path.with_name(fit_path.stem + ".cache")


def run_fit(out, data_root=DATA_ROOT, sets=DATA_SETS, variance=VARIANCE_KEPT) -> dict:
    """Embeds the photos (cached beside ``out``), fits them and saves the fit to ``out``."""
    from remap_tf.contract import DEFAULT_IMAGE_SIZE
    from remap_tf.specs import BUNDLED_DEFAULT

    out = Path(out).expanduser()
    started = time.perf_counter()
    paths, ids, groups = list_photos(data_root, sets)
    embedded, descriptors = embed_photos(paths, ids, cache_folder(out), str(data_root))
    print(f"{len(descriptors)} descriptors in {time.perf_counter() - started:.0f} s", flush=True)
    group_of = dict(zip(ids, groups, strict=True))
    fit = fit_descriptors(descriptors, [group_of[i] for i in embedded], variance)
    source = (
        f"{BUNDLED_DEFAULT} exported at {DEFAULT_IMAGE_SIZE} px, embedded in process, on every "
        f"photo of {', '.join(sets)} in {data_root}"
    )
    save_fit(out, fit, source)
    fit["source"] = np.array(source)
    print(fit_text(fit))
    print(f"saved {out}")
    return fit


def real_descriptors(fit_path: Path) -> np.ndarray:
    """The cached real descriptors a fit was made from."""
    from remap_tf.serving import embeddings

    folder = cache_folder(fit_path) / "descriptors"
    if not folder.is_dir():
        raise BadPathError(f"--fit {fit_path}: its real descriptors ({folder}) are missing.")
    return embeddings.load_embeddings(str(folder))[1]  # the real rows, in any order


def run_check(fit_path, seed: int = 1, write: bool = True) -> str:
    """The check's markdown (fit description and table); written to docs/benchmarks.md's
    "shaped-fit" section when ``write``."""
    fit_path = Path(fit_path).expanduser()
    fit = load_fit(fit_path)
    real = unit_rows(real_descriptors(fit_path))
    rows = compare(real, fit, seed)
    command = "python -m bench.shaped " + " ".join(sys.argv[1:])
    md = "\n".join(
        [
            "### Check: real descriptors against generated ones at equal size",
            "",
            f"Command: `{command.strip()}` · date: "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            "",
            fit_text(fit),
            "",
            f"Each data set has {len(real):,} rows of {real.shape[1]} dims. 'top t': the share "
            "of the variance on the set's own top t PCA directions; 'k-NN qQ': the Q-th "
            "percentile over rows of the cosine distance (1 - dot) to the k-th nearest other "
            "row.",
            "",
            table(rows),
        ]
    )
    if write:
        from bench.report import write_section

        write_section("shaped-fit", md)
    print(md)
    return md


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    fit = commands.add_parser("fit", help="embed the shared photos and fit their shape")
    fit.add_argument("--out", default=str(DEFAULT_FIT), help=f"the fit .npz ({DEFAULT_FIT})")
    fit.add_argument("--data", default=str(DATA_ROOT), help="the data pack's folder")
    fit.add_argument("--sets", nargs="+", default=list(DATA_SETS))
    fit.add_argument("--variance", type=float, default=VARIANCE_KEPT)
    check = commands.add_parser("check", help="real against generated, as a markdown table")
    check.add_argument("--fit", default=str(DEFAULT_FIT), help=f"the fit .npz ({DEFAULT_FIT})")
    check.add_argument("--seed", type=int, default=1)
    check.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    try:
        if args.command == "fit":
            if not 0 < args.variance < 1:
                raise InvalidInputError(f"--variance must be in (0, 1), got {args.variance}.")
            run_fit(args.out, Path(args.data), args.sets, args.variance)
        else:
            run_check(args.fit, args.seed, write=not args.no_write)
    except RemapError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
