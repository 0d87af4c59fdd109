"""bench.shaped: the fit of real descriptors' shape and the vectors generated from it.

The source is synthetic: anisotropic (a decaying spectrum, rotated, off-centre) and grouped
(groups of 1 to 6 rows around their centre, as views of one scene). The fit must reproduce
its spectrum and its nearest-neighbour distances; bench.ann's clustered data of the same n
and dim must not (else the check could not tell them apart).
"""

import numpy as np
import pytest

from bench.ann import clustered_unit_vectors, shaped_distribution
from bench.shaped import (
    describe,
    fit_descriptors,
    generate,
    load_fit,
    neighbour_distances,
    save_fit,
    spectrum_shares,
)
from remap_tf.errors import BadPathError, FileFormatError, InvalidInputError

DIM = 64


@pytest.fixture(scope="module")
def source():
    """``(rows (n, DIM) unit, groups (n,))``: a unit mean direction plus group centres of
    standard deviation proportional to 1/sqrt(i+1) on direction i of a random rotation
    (0.3 in all), rows at 0.3 times that scale around their centre, L2-normalised."""
    rng = np.random.default_rng(0)
    rotation, _ = np.linalg.qr(rng.standard_normal((DIM, DIM)))
    scale = 1.0 / np.sqrt(np.arange(1, DIM + 1))
    scale *= 0.3 / np.linalg.norm(scale)
    sizes = rng.integers(1, 7, 500)
    centres = rng.standard_normal((len(sizes), DIM)) * scale
    groups = np.repeat(np.arange(len(sizes)), sizes)
    rows = centres[groups] + 0.3 * rng.standard_normal((len(groups), DIM)) * scale
    rows = rows @ rotation.T + rotation[:, 0]
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return rows.astype(np.float32), groups


@pytest.fixture(scope="module")
def fit(source):
    return fit_descriptors(*source, variance=0.95)


def test_generated_rows_have_the_source_spectrum_and_neighbours(source, fit):
    rows, _ = source
    real = describe(rows)
    shaped = describe(generate(len(rows), fit, seed=3))
    for t in ("top 8", "top 32"):
        assert abs(shaped[t] - real[t]) < 0.05, (t, shaped[t], real[t])
    for q in ("1-NN q50", "10-NN q50"):
        assert abs(shaped[q] / real[q] - 1) < 0.25, (q, shaped[q], real[q])


def test_clustered_data_does_not_pass_the_same_check(source):
    """The contrast that makes the test above able to fail: isotropic clusters have a flat
    spectrum and other neighbour distances."""
    rows, _ = source
    real = describe(rows)
    clusters = max(100, len(rows) // 100)
    for spread in (0.5, 1.0):
        clustered = describe(clustered_unit_vectors(len(rows), DIM, clusters, 1, spread, 0))
        assert abs(clustered["top 8"] - real["top 8"]) > 0.1
        assert abs(clustered["1-NN q50"] / real["1-NN q50"] - 1) > 0.25


def test_generation_is_deterministic_per_seed_unit_norm_and_float32(fit):
    a = generate(1000, fit, seed=5, chunk=300)
    assert a.dtype == np.float32 and a.shape == (1000, DIM)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(a, generate(1000, fit, seed=5, chunk=300))
    assert not np.allclose(a, generate(1000, fit, seed=6, chunk=300))


def test_fit_keeps_the_variance_asked_for(source, fit):
    """k is the fewest top directions holding 95% of the variance."""
    k = fit["basis"].shape[1]
    shares = np.cumsum(fit["eigenvalues"]) / fit["eigenvalues"].sum()
    assert shares[k - 1] >= 0.95 > shares[k - 2]
    assert len(fit["sizes"]) == 500 and fit["sizes"].sum() == len(source[0])


def test_neighbour_distances_and_spectrum_by_hand():
    """Rows at 0, 60 and 180 degrees on a circle: 1-NN distances 1 - cos 60 = 0.5, 0.5 and
    1 - cos 120 = 1.5; all variance lies on two directions."""
    angles = np.radians([0.0, 60.0, 180.0])
    rows = np.stack([np.cos(angles), np.sin(angles), np.zeros(3)], axis=1)
    np.testing.assert_allclose(neighbour_distances(rows, ks=(1,))[1], [0.5, 0.5, 1.5], atol=1e-6)
    assert spectrum_shares(rows, tops=(2,))[2] == pytest.approx(1.0)


def test_fit_round_trip_and_bad_files(fit, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_fit("fit.npz", fit, source="synthetic")  # relative, as a user types it
    loaded = load_fit("fit.npz")
    assert str(loaded["source"]) == "synthetic"
    np.testing.assert_array_equal(generate(50, loaded, 1), generate(50, fit, 1))
    with pytest.raises(BadPathError, match="missing.npz"):
        load_fit("missing.npz")
    np.savez("other.npz", x=np.zeros(3))
    with pytest.raises(FileFormatError, match="not a bench.shaped fit"):
        load_fit("other.npz")
    with pytest.raises(InvalidInputError, match="one group each"):
        fit_descriptors(np.ones((30, 4)), [0] * 29)


def test_ann_shaped_queries_are_held_out_of_the_collection(fit, tmp_path):
    save_fit(tmp_path / "fit.npz", fit, source="synthetic")
    data = shaped_distribution(tmp_path / "fit.npz")
    assert data.section != "ann"  # beside the clustered results, never over them
    database, queries = data.cases[0][1](300, 20)
    assert database.shape == (300, DIM) and queries.shape == (20, DIM)
    rows = generate(320, fit, seed=1)
    assert not (queries[:, None] == database[None]).all(axis=2).any()
    assert {r.tobytes() for r in np.concatenate([database, queries])} == {r.tobytes() for r in rows}
