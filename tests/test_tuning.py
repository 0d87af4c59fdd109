"""Recall-targeted ScaNN tuning: the chosen setting keeps its target on queries it never saw."""

from __future__ import annotations

import numpy as np
import pytest

from remap_tf.serving.index import ExactIndex, ScannConfig, ScannIndex, load_index
from remap_tf.serving.index.tuning import exact_neighbours, leaves_candidates, tune_search
from tests.test_index import clustered_unit_vectors


def _recall(found, truth):
    return sum(len(set(a) & set(b)) for a, b in zip(found, truth, strict=True)) / truth.size


@pytest.fixture(scope="module")
def noisy():
    """20k x 64 noisy clusters (the database) and 400 fresh queries from the same clusters.

    Noise 0.9 per dimension against unit-variance centres: a query's true neighbours spread
    over many tree leaves, so one leaf is far from enough and the tuning has work to do.
    """
    rng = np.random.default_rng(11)
    centres = rng.normal(size=(200, 64)).astype(np.float32)

    def draw(count):
        x = centres[rng.integers(0, 200, count)] + 0.9 * rng.normal(size=(count, 64))
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    return draw(20_000), draw(400)


@pytest.fixture(scope="module")
def truth(noisy):
    database, queries = noisy
    exact = ExactIndex(64)
    exact.add([str(i) for i in range(len(database))], database)
    return exact.search(queries, k=10)[0]


def _tree(database, **config):
    index = ScannIndex(64, mode="tree_ah", num_leaves=100, num_threads=2, **config)
    index.add([str(i) for i in range(len(database))], database)
    index.build()
    return index


@pytest.mark.parametrize("target", [0.9, 0.97])
def test_tuning_reaches_the_target_on_held_out_queries(noisy, truth, target, tmp_path):
    """The setting chosen on the database's own vectors reaches the target on 400 fresh
    queries it never saw, and a cheaper setting would not have (so the tuning did work)."""
    database, queries = noisy
    index = _tree(database, target_recall=target)
    config = index.config
    tuning = config["tuning"]
    assert tuning["reached"] and tuning["target_recall"] == target
    assert tuning["recall_lower_bound"] >= target
    found, _ = index.search(queries, k=10)
    assert _recall(found, truth) >= target
    # The cheapest setting misses the target here: 1 leaf is not enough on this data.
    cheap, _ = index.search(queries, k=10, leaves_to_search=1, reorder=25)
    assert _recall(cheap, truth) < target
    # Saved and loaded, the index keeps searching with the tuned values.
    loaded = load_index(index.save(tmp_path / "index"))
    assert loaded.config["num_leaves_to_search"] == config["num_leaves_to_search"]
    again, _ = loaded.search(queries, k=10)
    np.testing.assert_array_equal(again, found)


def test_higher_target_searches_more(noisy):
    database, _ = noisy
    low = _tree(database, target_recall=0.8).config
    high = _tree(database, target_recall=0.99).config
    assert high["tuning"]["measured_recall"] > low["tuning"]["measured_recall"]
    # Recall grows with both knobs, so a higher recall needs more of at least one.
    assert (
        high["num_leaves_to_search"] > low["num_leaves_to_search"]
        or high["reorder"] > low["reorder"]
    )


def test_no_target_keeps_the_fixed_defaults_and_explicit_knobs_stay_fixed(noisy):
    database, _ = noisy
    fixed = _tree(database, target_recall=None).config
    assert (fixed["num_leaves_to_search"], fixed["reorder"]) == (10, 100)  # leaves/10, 100
    assert fixed["tuning"] is None
    pinned = _tree(database, num_leaves_to_search=7).config  # reorder tuned, leaves kept
    assert pinned["num_leaves_to_search"] == 7
    assert pinned["tuning"]["evaluated"] >= 1
    with pytest.raises(ValueError, match="target_recall"):
        ScannConfig(target_recall=1.5)


def test_brute_force_is_never_tuned():
    data = clustered_unit_vectors(500, 16, 5, seed=1)
    index = ScannIndex(16)
    index.add([str(i) for i in range(500)], data)
    index.build()
    assert index.config["mode"] == "brute_force" and index.config["tuning"] is None


def test_tune_search_on_a_plain_function_picks_the_cheapest_sufficient_setting():
    """A fake searcher whose recall is exactly known: it returns the true neighbours for
    ``leaves >= 5`` and garbage below, so the tuning must pick 5 leaves."""
    rng = np.random.default_rng(0)
    database = rng.normal(size=(600, 8)).astype(np.float32)

    def search(queries, k, leaves, reorder):
        rows = exact_neighbours(database, queries, k)
        return rows if leaves >= 5 else rows[::-1]  # other queries' answers: wrong

    result = tune_search(
        search, database, 0.95, k=10, num_queries=200, leaves=list(range(1, 9)), reorders=[None]
    )
    assert result["leaves"] == 5 and result["reached"]
    assert result["measured_recall"] == 1.0
    assert leaves_candidates(1000)[0] == 1 and leaves_candidates(1000)[-1] == 1000
