"""AP, mAP, the revisited protocol, mP@k, αQE and DBA against hand-computed answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from remap_tf import evaluation as ev


def _reference_compute_map(ranks, gnd, kappas):
    """A line-by-line port of revisitop's compute_map/compute_ap (Radenović et al., CVPR 2018).

    ``ranks`` is (num_database, num_queries) as in the original. Kept independent of the
    implementation under test: the junk rank shift is the original nested while loop.
    """
    nq = len(gnd)
    aps = np.zeros(nq)
    prs = np.zeros((nq, len(kappas)))
    total_map, pr, nempty = 0.0, np.zeros(len(kappas)), 0
    for i in range(nq):
        qgnd = np.array(gnd[i]["ok"])
        if qgnd.shape[0] == 0:
            aps[i] = float("nan")
            prs[i, :] = float("nan")
            nempty += 1
            continue
        qgndj = np.array(gnd[i]["junk"])
        pos = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgnd)]
        junk = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgndj)]
        k, ij = 0, 0
        if len(junk):
            ip = 0
            while ip < len(pos):
                while ij < len(junk) and pos[ip] > junk[ij]:
                    k += 1
                    ij += 1
                pos[ip] = pos[ip] - k
                ip += 1
        ap = 0.0
        recall_step = 1.0 / len(qgnd)
        for j in range(len(pos)):
            rank = pos[j]
            precision_0 = 1.0 if rank == 0 else float(j) / rank
            precision_1 = float(j + 1) / (rank + 1)
            ap += (precision_0 + precision_1) * recall_step / 2.0
        total_map += ap
        aps[i] = ap
        pos = pos + 1
        for j in range(len(kappas)):
            kq = min(max(pos), kappas[j])
            prs[i, j] = (pos <= kq).sum() / kq
        pr = pr + prs[i, :]
    return total_map / (nq - nempty), aps, pr / (nq - nempty)


def test_perfect_ranking_has_ap_one():
    assert ev.average_precision([4, 2, 0, 1], positives=[4, 2]) == 1.0


def test_ap_hand_computed():
    """Positives at 0-based ranks 1 and 2 of 2 positives: ((0/1 + 1/2)/2 + (1/2 + 2/3)/2) / 2.

    = (1/4 + 7/12) / 2 = 5/12.
    """
    assert ev.average_precision([3, 0, 1], positives=[0, 1]) == pytest.approx(5 / 12)


def test_junk_is_removed_from_the_ranking():
    """Ranking [9, 4, 7, 2], positives {4, 2}.

    With 9 and 7 as junk the ranking is [4, 2]: AP = 1. Without junk the positives sit at
    ranks 1 and 3: ((0 + 1/2)/2 + (1/3 + 2/4)/2) / 2 = (1/4 + 5/12) / 2 = 1/3.
    """
    assert ev.average_precision([9, 4, 7, 2], [4, 2], junk=[9, 7]) == pytest.approx(1.0)
    assert ev.average_precision([9, 4, 7, 2], [4, 2]) == pytest.approx(1 / 3)
    # Only one junk in front of the second positive: ranks 1 and 2 -> 5/12.
    assert ev.average_precision([9, 4, 7, 2], [4, 2], junk=[7]) == pytest.approx(5 / 12)


def test_missing_positive_in_truncated_ranking_counts_as_not_found():
    """Top-1 = the single found positive of 2: (1 + 1)/2 * 1/2 = 0.5."""
    assert ev.average_precision([0], positives=[0, 5]) == pytest.approx(0.5)


def test_query_without_positives_is_skipped():
    assert math.isnan(ev.average_precision([0, 1, 2], positives=[]))
    assert math.isnan(ev.average_precision([0, 1, 2], positives=[1], junk=[1]))
    result = ev.mean_average_precision([[0, 1, 2], [2, 1, 0]], positives=[[0], []], junk=[[], []])
    assert result["mAP"] == pytest.approx(1.0)
    assert result["num_queries"] == 1 and result["num_skipped"] == 1
    assert math.isnan(result["ap"][1])


def test_precision_at_k_follows_revisited_definition():
    """1-based positive ranks [1, 3]: P@1 = 1/1; P@5 uses k' = min(3, 5) = 3 -> 2/3."""
    np.testing.assert_allclose(ev.precision_at_k([0, 2], (1, 5, 10)), [1.0, 2 / 3, 2 / 3])
    np.testing.assert_allclose(ev.precision_at_k([], (1, 5)), [0.0, 0.0])


def test_revisited_protocols_hand_computed():
    """easy=[0], hard=[1], junk=[2]; ranking [2, 1, 3, 0].

    easy:   positives {0}, ignore {2, 1}: ranking [3, 0] -> rank 1 -> (0 + 1/2)/2 = 1/4.
    medium: positives {0, 1}, ignore {2}: ranking [1, 3, 0] -> ranks 0, 2 ->
            ((1 + 1)/2 + (1/2 + 2/3)/2) / 2 = (1 + 7/12) / 2 = 19/24.
    hard:   positives {1}, ignore {2, 0}: ranking [1, 3] -> rank 0 -> 1.
    The second query has no hard image, so the hard protocol skips it.
    """
    gnd = [{"easy": [0], "hard": [1], "junk": [2]}, {"easy": [3], "hard": [], "junk": []}]
    rankings = np.array([[2, 1, 3, 0], [3, 0, 1, 2]])
    result = ev.revisited_map(rankings, gnd)
    np.testing.assert_allclose(result["easy"]["ap"], [1 / 4, 1.0])
    np.testing.assert_allclose(result["medium"]["ap"], [19 / 24, 1.0])
    assert result["hard"]["ap"][0] == pytest.approx(1.0)
    assert math.isnan(result["hard"]["ap"][1])
    assert result["hard"]["num_queries"] == 1
    assert result["medium"]["mAP"] == pytest.approx((19 / 24 + 1) / 2)
    # medium mP@5 of query 0: 1-based ranks [1, 3] -> k' = 3 -> 2/3; query 1: 1.
    assert result["medium"]["mP@5"] == pytest.approx((2 / 3 + 1) / 2)
    with pytest.raises(ValueError, match="protocol"):
        ev.revisited_groundtruth([0], [1], [2], "medium-hard")


def test_matches_port_of_revisitop_compute_map_on_random_data():
    rng = np.random.default_rng(0)
    num_db, num_q = 60, 12
    rankings = np.stack([rng.permutation(num_db) for _ in range(num_q)])
    gnd = []
    for i in range(num_q):
        ids = rng.permutation(num_db)
        n_ok, n_junk = (0, 5) if i == 3 else (rng.integers(1, 8), rng.integers(0, 10))
        gnd.append({"ok": ids[:n_ok].tolist(), "junk": ids[n_ok : n_ok + n_junk].tolist()})
    ref_map, ref_aps, ref_pr = _reference_compute_map(rankings.T.copy(), gnd, [1, 5, 10])
    ours = ev.mean_average_precision(
        rankings, [g["ok"] for g in gnd], [g["junk"] for g in gnd], kappas=(1, 5, 10)
    )
    assert ours["mAP"] == pytest.approx(ref_map)
    np.testing.assert_allclose(ours["ap"], ref_aps)
    np.testing.assert_allclose([ours["mP@1"], ours["mP@5"], ours["mP@10"]], ref_pr)
    assert ours["num_skipped"] == 1


def test_rank_database_orders_by_dot_product_and_truncates():
    db = np.array([[1, 0], [0, 1], [0.6, 0.8]], dtype=np.float32)
    q = np.array([[0, 1], [1, 0]], dtype=np.float32)
    np.testing.assert_array_equal(ev.rank_database(q, db), [[1, 2, 0], [0, 2, 1]])
    np.testing.assert_array_equal(ev.rank_database(q, db, top_k=2), [[1, 2], [0, 2]])
    with pytest.raises(ValueError, match="dim"):
        ev.rank_database(np.ones((1, 3)), db)


def test_label_map_hand_computed():
    """x0=(1,0), x1=(0,1), x2=(.8,.6), x3=(-1,0); labels [0, 0, 1, 1].

    q0: sims x1 0, x2 .8, x3 -1 -> [2, 1, 3], positive at rank 1 -> 1/4.
    q1: sims x0 0, x2 .6, x3 0 -> [2, 0, 3] (ties by index), positive at rank 1 -> 1/4.
    q2: sims x0 .8, x1 .6, x3 -.8 -> [0, 1, 3], positive at rank 2 -> (0 + 1/3)/2 = 1/6.
    q3: sims x0 -1, x1 0, x2 -.8 -> [1, 2, 0], positive at rank 1 -> 1/4.
    mAP = (3/4 + 1/6) / 4 = 11/48.
    """
    x = np.array([[1, 0], [0, 1], [0.8, 0.6], [-1, 0]], dtype=np.float32)
    assert ev.label_map(x, [0, 0, 1, 1]) == pytest.approx(11 / 48)
    assert ev.label_map(x, ["a", "a", "b", "b"], chunk=3) == pytest.approx(11 / 48)


def test_label_map_skips_singletons_and_matches_generic_map():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = rng.permutation(np.repeat(np.arange(8), 5))
    labels[0] = 99  # a singleton: no positive, skipped
    rankings = ev.rank_database(x, x)
    positives = [np.flatnonzero((labels == labels[i]) & (np.arange(40) != i)) for i in range(40)]
    expected = ev.mean_average_precision(rankings, positives, junk=[[i] for i in range(40)])
    assert expected["num_skipped"] == 1
    assert ev.label_map(x, labels, chunk=7) == pytest.approx(expected["mAP"])
    assert math.isnan(ev.label_map(x[:3], [1, 2, 3]))
    with pytest.raises(ValueError, match="labels"):
        ev.label_map(x, labels[:5])


def test_alpha_query_expansion_hand_computed():
    """q=(1,0); db d0=(.6,.8), d1=(0,1); top-1 is d0 with s=.6.

    alpha=0: normalize(q + d0) = normalize(1.6, .8); alpha=1: normalize(1 + .36, .48).
    """
    q = np.array([[1.0, 0.0]], dtype=np.float32)
    db = np.array([[0.6, 0.8], [0.0, 1.0]], dtype=np.float32)

    def unit(v):
        v = np.asarray(v, dtype=np.float64)
        return v / np.linalg.norm(v)

    np.testing.assert_allclose(ev.alpha_query_expansion(q, db, k=1, alpha=0)[0], unit([1.6, 0.8]))
    np.testing.assert_allclose(
        ev.alpha_query_expansion(q, db, k=1, alpha=1)[0], unit([1.36, 0.48]), rtol=1e-6
    )
    np.testing.assert_array_equal(ev.alpha_query_expansion(q, db, k=0), q)


def test_database_augmentation_excludes_self():
    """db = (1,0), (.6,.8), (0,1); k=1, alpha=0: each row plus its nearest other row.

    row0 -> +row1 (.6); row1 -> +row2 (.8 > .6); row2 -> +row1 (.8).
    """
    db = np.array([[1, 0], [0.6, 0.8], [0, 1]], dtype=np.float32)
    out = ev.database_augmentation(db, k=1, alpha=0, chunk=2)

    def unit(v):
        return np.asarray(v) / np.linalg.norm(v)

    np.testing.assert_allclose(
        out, [unit([1.6, 0.8]), unit([0.6, 1.8]), unit([0.6, 1.8])], rtol=1e-6
    )
