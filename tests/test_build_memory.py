"""A ScaNN build in bounded memory: trained on a sample, the rest streamed in batches.

The acceptance test measures a 200k-vector build's peak resident memory in a fresh process
against the bound `build_memory_bound` states; the others check the pieces that keep it
there: lazily read rows are read one part at a time, the tuning's exact neighbours are
streamed, and the partitioning tuning holds one searcher at a time.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import numpy as np
import pytest

from remap_tf.serving import embeddings
from remap_tf.serving.index import LazyRows, ScannIndex, load_index
from remap_tf.serving.index.scann import build_memory_bound
from remap_tf.serving.index.tuning import (
    HeldOut,
    exact_neighbours,
    streamed_neighbours,
    tune_builds,
)
from remap_tf.serving.search import build_index_from_embeddings
from tests.test_index import clustered_unit_vectors

ROOT = Path(__file__).resolve().parents[1]

# Run in a fresh process: the vectors are made (chunk by chunk, so that making them does not
# raise the peak), the peak resident set is reset to the current one (VmHWM, through
# /proc/self/clear_refs), then the index is built; the growth of the peak is the build's own.
_CHILD = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import numpy as np
    from scann.scann_ops.py import scann_ops_pybind  # noqa: F401  (in the baseline)
    from remap_tf.serving.index import ScannIndex

    def status(key):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    num, dim, sample = map(int, sys.argv[1:4])
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((num // 100, dim), dtype=np.float32)
    vectors = np.empty((num, dim), np.float32)
    for start in range(0, num, 10_000):
        x = centres[rng.integers(0, len(centres), 10_000)]
        x += 0.5 * rng.standard_normal(x.shape, dtype=np.float32)
        vectors[start : start + 10_000] = x / np.linalg.norm(x, axis=1, keepdims=True)
    ids = [f"v{i:09d}" for i in range(num)]
    index = ScannIndex(dim, training_sample_size=sample)
    Path("/proc/self/clear_refs").write_text("5")
    base = status("VmRSS:")
    index.add(ids, vectors)
    index.build()
    growth = status("VmHWM:") - base
    found, _ = index.search(vectors[:200], 1)
    hits = float(np.mean(found[:, 0] == np.array(ids[:200], dtype=object)))
    print("RESULT " + json.dumps({"growth": growth, "config": index.config, "hits": hits}))
    """
)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_a_200k_build_stays_under_its_stated_memory_bound():
    """200,000 x 128 clustered unit vectors, trained on 40,000 (so the bound is set by the
    rows, not by the training: 1.25 x 200k >= 5.25 x 40k), tuned as by default: the peak
    growth stays under `build_memory_bound` (~2.1x the 102 MB of raw rows here, ids and
    a fixed 64 MiB included; 1.8x measured, 2.0x while the index built its id map at every
    add). Before the build streamed it was 4.9x (200k x 256, docs/scale.md). The growth
    must also exceed the raw rows, which ScaNN has to hold: a measurement that saw nothing
    would fail."""
    num, dim, sample = 200_000, 128, 40_000
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, str(num), str(dim), str(sample)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    line = [x for x in result.stdout.splitlines() if x.startswith("RESULT ")][-1]
    measured = json.loads(line[len("RESULT ") :])
    bound, raw = build_memory_bound(num, dim, sample), num * dim * 4
    assert raw < measured["growth"] <= bound, (measured["growth"] / raw, bound / raw)
    assert measured["config"]["mode"] == "tree_ah"
    assert measured["config"]["training_sample_size"] == sample
    assert measured["hits"] >= 0.95  # each vector finds itself: the streamed rows are there


def _lazy(parts, alive):
    """`LazyRows` over ``parts`` whose reads record how many earlier reads are still held."""

    def reader(rows):
        def read():
            alive.append(sum(ref() is not None for ref in refs))
            fresh = rows.copy()
            refs.append(weakref.ref(fresh))
            return fresh

        return read

    refs = []
    return [LazyRows(len(p), reader(p), f"part {n}") for n, p in enumerate(parts)]


def test_lazy_rows_build_the_same_index_reading_one_part_at_a_time():
    """An index of 12 lazily read parts of 2,500 rows answers as one given the whole array,
    and no read happens while an earlier part is still held (the rows are never joined)."""
    x = clustered_unit_vectors(30_000, 32, 60, seed=5)
    ids = [f"r{i}" for i in range(len(x))]
    alive: list[int] = []
    lazy = ScannIndex(32, mode="ah", target_recall=0.9)
    lazy.add_lazily(ids, _lazy(np.split(x, 12), alive))
    lazy.build()
    whole = ScannIndex(32, mode="ah", target_recall=0.9)
    whole.add(ids, x)
    whole.build()
    assert len(alive) >= 24 and max(alive) == 0, alive  # two passes at least, one part held
    queries = x[::997]
    # The same search settings for both: the tuning keeps the fastest setting it measures,
    # which can differ between two builds on a loaded machine (seen in CI).
    knobs = {"reorder": 100}
    same = lazy.search(queries, 10, **knobs)[0] == whole.search(queries, 10, **knobs)[0]
    assert same.mean() >= 0.95
    assert lazy.search(queries, 1)[0][:, 0].tolist() == ids[::997]


def test_lazy_rows_are_checked_when_read():
    """A part that holds other rows than it announced fails the build in one line naming it."""
    from remap_tf.errors import InvalidInputError

    index = ScannIndex(8, mode="brute_force")
    index.add_lazily(["a", "b"], [LazyRows(2, lambda: np.ones((3, 8), np.float32), "shard 7")])
    with pytest.raises(InvalidInputError, match="shard 7 holds 3 rows, not 2"):
        index.build()
    with pytest.raises(InvalidInputError, match="1 ids for 2 descriptors"):
        ScannIndex(8).add_lazily(["a"], [LazyRows(2, lambda: np.ones((2, 8)), "x")])


def test_streamed_neighbours_equal_the_exact_ones():
    """The running top-k over blocks of 700 rows equals the top-k over the whole matrix, and
    a `HeldOut` made from streamed blocks holds the same truth as one made from the matrix."""
    x = clustered_unit_vectors(5_000, 16, 30, seed=3)
    own = np.arange(4_900, 5_000)
    blocks = (x[i : i + 700] for i in range(0, len(x), 700))
    assert np.array_equal(streamed_neighbours(blocks, x[own], 11), exact_neighbours(x, x[own], 11))
    held = HeldOut(x, 10, query_rows=own)
    streamed = HeldOut.streamed(iter([x[:2_500], x[2_500:]]), len(x), x[own], own)
    assert np.array_equal(held.truth, streamed.truth) and np.array_equal(held.own, streamed.own)


def test_one_at_a_time_holds_one_searcher_and_rebuilds_the_best():
    """Three candidates, the first the fastest: with ``one_at_a_time`` no build starts while
    another searcher is alive, and the first is built again at the end (``rebuild_seconds``);
    without it, the best is kept alive through the later builds."""

    class Searcher:
        pass

    def run(one_at_a_time):
        live, seen = weakref.WeakSet(), []

        def build(candidate):
            seen.append(len(live))
            searcher = Searcher()
            live.add(searcher)
            seconds = {1: 1e-4, 2: 1e-2, 3: 2e-2}[candidate["n"]]

            def search(queries, k, leaves, reorder):
                import time

                time.sleep(seconds)
                return held.truth

            return searcher, search, [None], [None]

        stages = [lambda best: [{"n": 1}, {"n": 2}, {"n": 3}]]
        result = tune_builds(build, stages, held, 0.9, budget=1e6, one_at_a_time=one_at_a_time)
        return result, seen

    x = clustered_unit_vectors(300, 8, 5, seed=1)
    held = HeldOut(x, 3, num_queries=20)
    result, seen = run(True)
    assert seen == [0, 0, 0, 0] and result["candidate"] == {"n": 1}
    assert result["rebuild_seconds"] >= 0 and isinstance(result["searcher"], Searcher)
    result, seen = run(False)
    assert seen == [0, 1, 1] and result["rebuild_seconds"] == 0


def test_index_build_from_embeddings_streams_the_shards(tmp_path, monkeypatch):
    """``remap index build --from-embeddings`` (`build_index_from_embeddings`) never joins the
    shards into one array: `load_embeddings` is not called, each shard is read on its own,
    and the saved index finds every vector."""
    x = clustered_unit_vectors(6_000, 16, 20, seed=9)
    ids = [f"img{i:05d}.jpg" for i in range(len(x))]
    embeddings.write_embeddings(tmp_path / "e", ids, x, shard_size=1_000)

    def refuse(*args, **kwargs):
        raise AssertionError("load_embeddings joins every shard")

    monkeypatch.setattr(embeddings, "load_embeddings", refuse)
    reads = []
    read_rows = embeddings.read_shard_rows

    def counting(out, shard, manifest, count):
        reads.append(shard)
        return read_rows(out, shard, manifest, count)

    monkeypatch.setattr(embeddings, "read_shard_rows", counting)
    summary = build_index_from_embeddings([tmp_path / "e"], tmp_path / "idx", kind="scann")
    assert summary["count"] == 6_000 and sorted(set(reads)) == list(range(6))
    found, _ = load_index(tmp_path / "idx").search(x[::500], 1)
    assert found[:, 0].tolist() == ids[::500]
