"""The statistics core: resolution shells, correlations, pairing of half-dataset tables."""

import gemmi
import numpy as np
import pytest
import reciprocalspaceship as rs
from scipy.stats import pearsonr, spearmanr

from skmerge.errors import InputError
from skmerge.model.initialisation import wilson_curve
from skmerge.shells import (
    correlation,
    half_correlations,
    make_shells,
    measured_reflections,
    paired_halves,
    spearman,
    weighted_pearson,
)
from skmerge.stats import resolution_shells

CELL = gemmi.UnitCell(40, 50, 60, 90, 90, 90)


def _resolutions(n=500, seed=0):
    rng = np.random.default_rng(seed)
    return 1 / np.sqrt(rng.uniform(1 / 30**2, 1 / 2**2, n))


# -------------------------------------------------------------------------- shells
def test_equal_count_shells_hold_equal_numbers_and_span_the_data():
    d = _resolutions(503)
    shells = make_shells(d, 7)
    counts = np.bincount(shells.assign(d), minlength=7)
    assert counts.sum() == len(d) and counts.max() - counts.min() <= 1
    assert shells.d_max[0] == pytest.approx(d.max()) and shells.d_min[-1] == pytest.approx(d.min())
    # A shell's reflections lie within its limits.
    shell = shells.assign(d)
    assert (d <= shells.d_max[shell] * (1 + 1e-12)).all() and (d >= shells.d_min[shell] * (1 - 1e-12)).all()
    # Computed shells take resolutions beyond the data into the outer shells.
    assert shells.assign([100.0, 0.5]).tolist() == [0, 6]


def test_equal_volume_shells_follow_the_possible_reflections():
    measured = _resolutions(300)
    possible = 1 / np.sqrt(np.linspace(1 / 30**2, 1 / 2**2, 1000))
    shells = make_shells(measured, 4, binning="equal-volume", possible_dhkl=possible)
    counts = np.bincount(shells.assign(possible), minlength=4)
    assert counts.max() - counts.min() <= 1
    assert not np.allclose(shells.edges, make_shells(measured, 4).edges)
    with pytest.raises(InputError, match="possible reflections"):
        make_shells(measured, 4, binning="equal-volume")


def test_explicit_limits_leave_reflections_outside_unassigned():
    shells = make_shells(_resolutions(), [10.0, 4.0, 3.0])
    assert shells.bounded and shells.n == 2
    assert shells.assign([12.0, 10.0, 5.0, 4.0, 3.5, 3.0, 2.9]).tolist() == [-1, 0, 0, 1, 1, 1, -1]
    np.testing.assert_allclose(shells.d_max, [10.0, 4.0])
    np.testing.assert_allclose(shells.d_min, [4.0, 3.0])


@pytest.mark.parametrize(
    "shells, kwargs, message",
    [(0, {}, "shells"), (2.5, {}, "shells"), ([3.0, 4.0], {}, "decreasing"), ([3.0], {}, "decreasing"),
     (3, {"binning": "log"}, "binning")],
)
def test_bad_shells_raise_input_error(shells, kwargs, message):
    with pytest.raises(InputError, match=message):
        make_shells(_resolutions(), shells, **kwargs)


def test_resolution_shells_and_the_wilson_curve_use_the_same_shells():
    d = _resolutions(1000, seed=3)
    y = np.random.default_rng(1).exponential(1 / d**2)
    shell, limits = resolution_shells(d, 8)
    shells = make_shells(d, 8)
    np.testing.assert_array_equal(shell, shells.assign(d))
    np.testing.assert_allclose(limits, np.column_stack([shells.d_max, shells.d_min]))
    centres, means = wilson_curve(d, y, n_bins=8)
    np.testing.assert_allclose(centres, [np.mean(1 / d[shell == i] ** 2) for i in range(8)])
    np.testing.assert_allclose(means, [np.mean(y[shell == i]) for i in range(8)])


# ---------------------------------------------------------------- correlations
def test_pearson_and_spearman_equal_scipy():
    rng = np.random.default_rng(2)
    a = rng.normal(size=200)
    b = a + rng.normal(size=200)
    b[::7] = np.round(b[::7])  # ties
    assert weighted_pearson(a, b) == pytest.approx(pearsonr(a, b)[0], rel=1e-12)
    assert spearman(a, b) == pytest.approx(spearmanr(a, b)[0], rel=1e-12)
    assert correlation(a, b, "spearman") == spearman(a, b)
    w = rng.uniform(0, 2, 200)
    assert correlation(a, b, "pearson", w) == weighted_pearson(a, b, w)
    with pytest.raises(InputError, match="no weights"):
        correlation(a, b, "spearman", w)
    with pytest.raises(InputError, match="method"):
        correlation(a, b, "kendall")


def test_correlations_leave_out_non_finite_pairs_and_need_three():
    a = np.array([1.0, 2.0, np.nan, 3.0, 5.0])
    b = np.array([2.0, 1.0, 7.0, np.inf, 4.0])
    assert spearman(a, b) == pytest.approx(spearmanr([1, 2, 5], [2, 1, 4])[0])
    assert weighted_pearson(a, b) == pytest.approx(pearsonr([1, 2, 5], [2, 1, 4])[0])
    assert np.isnan(spearman([1.0, 2.0], [1.0, 2.0]))
    assert np.isnan(weighted_pearson([1.0, 2.0, 3.0], [1.0, 1.0, 1.0]))


# ------------------------------------------------------------ half-dataset tables
def _halves(values, hkl, repeats, halves, n=None):
    data = {"H": hkl[:, 0], "K": hkl[:, 1], "L": hkl[:, 2], "I": values, "repeat": repeats, "half": halves}
    if n is not None:
        data["N"] = n
    return rs.DataSet(data, cell=CELL, spacegroup=gemmi.SpaceGroup("P 1")).set_index(["H", "K", "L"])


def test_pairing_by_index_within_each_repeat():
    hkl = np.array([[1, 0, 0], [2, 0, 0], [1, 0, 0], [3, 0, 0], [1, 0, 0], [2, 0, 0]])
    table = _halves([1.0, 2.0, 1.5, 9.0, 7.0, np.nan], hkl, [0, 0, 0, 0, 1, 1], [0, 0, 1, 1, 0, 1],
                    n=[1, 1, 1, 1, 1, 1])
    pairs = dict(paired_halves(table, "I"))
    assert list(pairs) == [0]  # repeat 1 has no reflection finite in both halves
    assert pairs[0][["H", "a", "b"]].values.tolist() == [[1, 1.0, 1.5]]
    assert pairs[0]["dHKL"].tolist() == [40.0]
    # N = 0 means not measured in that half.
    table["N"] = np.array([1, 1, 0, 1, 1, 1], dtype=np.int32)
    assert dict(paired_halves(table, "I")) == {}
    # The shells of a half table are made of the reflections measured in either half.
    np.testing.assert_allclose(np.sort(measured_reflections(table)), [40 / 3, 20.0, 40.0])


def test_half_correlations_per_repeat_and_shell():
    rng = np.random.default_rng(4)
    hkl = np.column_stack([np.arange(1, 61), np.zeros(60, int), np.zeros(60, int)])
    truth = rng.exponential(10, 60)
    rows, values, repeats, halves = [], [], [], []
    for repeat in (0, 1):
        for half in (0, 1):
            rows.append(hkl)
            values.append(truth + rng.normal(0, 3, 60))
            repeats += [repeat] * 60
            halves += [half] * 60
    table = _halves(np.concatenate(values), np.concatenate(rows), repeats, halves)
    shells = make_shells(40 / hkl[:, 0], 3)
    result = half_correlations(table, "I", shells)
    assert result.values.shape == (2, 4) and result.repeats == [0, 1]
    shell = shells.assign(40 / hkl[:, 0])
    for r in (0, 1):
        a, b = values[2 * r], values[2 * r + 1]
        expected = [pearsonr(a[shell == i], b[shell == i])[0] for i in range(3)] + [pearsonr(a, b)[0]]
        np.testing.assert_allclose(result.values[r], expected, rtol=1e-12)
        assert result.counts[r].tolist() == [20, 20, 20, 60]
    np.testing.assert_allclose(result.mean(), result.values.mean(axis=0))
    with pytest.raises(InputError, match="'DANO'"):
        half_correlations(table, "DANO", shells)
