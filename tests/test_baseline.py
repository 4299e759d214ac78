"""Tests of :func:`skmerge.merge_inverse_variance`, the inverse-variance baseline.

On real data it must agree with ``rs.algorithms.merge``; on small hand-made tables with
the weighted mean worked out by hand.
"""

import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import reciprocalspaceship as rs

import skmerge
from skmerge.baseline import merge_inverse_variance
from skmerge.errors import InputError

# reciprocalspaceship sums in float32: agreement to float32 precision means a relative
# error of ~1e-5, or a small fraction of σ where weighted sums cancel (I ≈ 0).
RTOL = 1e-5
ATOL_PER_SIGMA = 1e-4

REAL = {"hypf": ("hypf_hg_sad/hypf_unmerged.mtz", "SIGI"), "pyp_off": ("pyp_laue/off.mtz", "SigI")}
FRIEDEL_PAIRS = [("I(+)", "SIGI(+)"), ("I(-)", "SIGI(-)")]


def small_dataset(hkl, batch, intensity, sigma, spacegroup="P 21 21 21"):
    hkl = np.asarray(hkl)
    ds = rs.DataSet(
        {"H": hkl[:, 0], "K": hkl[:, 1], "L": hkl[:, 2], "BATCH": batch, "I": intensity, "SIGI": sigma},
        spacegroup=spacegroup,
        cell=(40.0, 50.0, 60.0, 90.0, 90.0, 90.0),
        merged=False,
    )
    return ds.astype({"H": "HKL", "K": "HKL", "L": "HKL", "BATCH": "Batch", "I": "Intensity", "SIGI": "Stddev"})


def values(ds, column):
    return ds[column].to_numpy(np.float64, na_value=np.nan)


def assert_close_to_float32(ours, theirs, sigma, name):
    ours, theirs, sigma = map(np.asarray, (ours, theirs, sigma))
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs), err_msg=f"{name}: NaN pattern")
    ok = ~np.isnan(theirs)
    error = np.abs(ours[ok] - theirs[ok])
    allowed = RTOL * np.abs(theirs[ok]) + ATOL_PER_SIGMA * sigma[ok]
    worst = np.argmax(error / allowed)
    assert (error <= allowed).all(), (
        f"{name}: {(error > allowed).sum()} values differ; worst {ours[ok][worst]} vs {theirs[ok][worst]}"
    )


# --------------------------------------------------------------------------- real data


@pytest.fixture(scope="module", params=[(key, anom) for key in REAL for anom in (False, True)],
                ids=lambda p: f"{p[0]}-{'anomalous' if p[1] else 'mean'}")
def both_merges(request, data_dir):
    key, anomalous = request.param
    name, sigma_key = REAL[key]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Mtz contains multiple datasets")
        ds = rs.read_mtz(str(data_dir / name))
    theirs = rs.algorithms.merge(ds, "I", sigma_key, anomalous=anomalous, sort=True)
    X = skmerge.read_unmerged(data_dir / name)
    ours = merge_inverse_variance(X, anomalous=anomalous)
    return SimpleNamespace(ours=ours, theirs=theirs, anomalous=anomalous)


@pytest.mark.realdata
def test_same_reflections_in_the_same_order_as_rs(both_merges):
    ours, theirs = both_merges.ours, both_merges.theirs
    assert list(ours.index.names) == ["H", "K", "L"]
    np.testing.assert_array_equal(ours.get_hkls(), theirs.get_hkls())


@pytest.mark.realdata
def test_mean_intensity_matches_rs(both_merges):
    ours, theirs = both_merges.ours, both_merges.theirs
    i = "IMEAN" if both_merges.anomalous else "I"
    assert_close_to_float32(values(ours, "I"), values(theirs, i), values(ours, "SIGI"), "I")


@pytest.mark.realdata
def test_mean_sigma_matches_rs(both_merges):
    ours, theirs = both_merges.ours, both_merges.theirs
    sig = "SIGIMEAN" if both_merges.anomalous else "SIGI"
    np.testing.assert_allclose(values(ours, "SIGI"), values(theirs, sig), rtol=RTOL)


@pytest.mark.realdata
def test_counts_match_rs(both_merges):
    ours, theirs = both_merges.ours, both_merges.theirs
    if both_merges.anomalous:
        for n in ("N(+)", "N(-)"):
            np.testing.assert_array_equal(ours[n].to_numpy(), theirs[n].to_numpy(np.int64), err_msg=n)
    else:
        np.testing.assert_array_equal(ours["N"].to_numpy(), theirs["N"].to_numpy())


@pytest.mark.realdata
@pytest.mark.parametrize("intensity, sigma", FRIEDEL_PAIRS)
def test_friedel_halves_match_rs(both_merges, intensity, sigma):
    ours, theirs = both_merges.ours, both_merges.theirs
    if not both_merges.anomalous:
        assert intensity not in ours.columns and sigma not in ours.columns
        return
    assert_close_to_float32(values(ours, intensity), values(theirs, intensity), values(ours, sigma), intensity)
    np.testing.assert_allclose(values(ours, sigma), values(theirs, sigma), rtol=RTOL, err_msg=sigma)


@pytest.mark.realdata
def test_anomalous_columns_and_dtypes(both_merges):
    ours = both_merges.ours
    expected = ["I", "SIGI", "N"]
    if both_merges.anomalous:
        expected += ["I(+)", "SIGI(+)", "I(-)", "SIGI(-)", "N(+)", "N(-)"]
    assert sorted(ours.columns) == sorted(expected)
    assert str(ours["I"].dtype) == "Intensity" and str(ours["SIGI"].dtype) == "Stddev"
    if both_merges.anomalous:
        assert str(ours["I(+)"].dtype) == "FriedelIntensity"
        assert str(ours["SIGI(-)"].dtype) == "StddevFriedelI"


# --------------------------------------------------------------------------- by hand


@pytest.fixture
def symmetric_pair():
    """(1,2,3) three times, once as its symmetry mate (-1,-2,3) of P 21 21 21 and once as
    the Friedel mate (-1,-2,-3); the centric (1,2,0) twice, once as its Friedel mate."""
    ds = small_dataset(
        [[1, 2, 3], [-1, -2, 3], [-1, -2, -3], [1, 2, 0], [-1, -2, 0]],
        [1, 2, 3, 1, 2],
        np.array([10.0, 20.0, 40.0, 5.0, 7.0]),
        np.array([1.0, 2.0, 4.0, 1.0, 1.0]),
    )
    return skmerge.read_unmerged(ds)


def test_weighted_mean_by_hand(symmetric_pair):
    merged = merge_inverse_variance(symmetric_pair)
    np.testing.assert_array_equal(merged.get_hkls(), [[1, 2, 0], [1, 2, 3]])
    w = np.array([1.0, 1 / 4, 1 / 16])
    np.testing.assert_allclose(values(merged, "I"), [6.0, (w @ [10.0, 20.0, 40.0]) / w.sum()])
    np.testing.assert_allclose(values(merged, "SIGI"), [2**-0.5, w.sum() ** -0.5])
    np.testing.assert_array_equal(merged["N"].to_numpy(), [2, 3])


def test_anomalous_merge_keeps_friedel_halves_apart(symmetric_pair):
    merged = merge_inverse_variance(symmetric_pair, anomalous=True)
    w = np.array([1.0, 1 / 4])
    acentric = merged.loc[(1, 2, 3)]
    assert acentric["I(+)"] == pytest.approx((w @ [10.0, 20.0]) / w.sum())
    assert acentric["SIGI(+)"] == pytest.approx(w.sum() ** -0.5)
    assert acentric["I(-)"] == pytest.approx(40.0)
    assert acentric["SIGI(-)"] == pytest.approx(4.0)
    assert (acentric["N(+)"], acentric["N(-)"]) == (2, 1)


def test_anomalous_merge_shows_centrics_in_both_halves(symmetric_pair):
    centric = merge_inverse_variance(symmetric_pair, anomalous=True).loc[(1, 2, 0)]
    assert centric["I(+)"] == centric["I(-)"] == pytest.approx(6.0)
    assert centric["N(+)"] == centric["N(-)"] == 2


def test_unobserved_friedel_half_is_nan_with_zero_count():
    ds = small_dataset([[1, 2, 3], [1, 2, 3]], [1, 2], np.array([1.0, 3.0]), np.array([1.0, 1.0]))
    merged = merge_inverse_variance(skmerge.read_unmerged(ds), anomalous=True)
    row = merged.loc[(1, 2, 3)]
    assert np.isnan(row["I(-)"]) and np.isnan(row["SIGI(-)"])
    assert row["N(-)"] == 0 and row["N(+)"] == 2


def test_result_does_not_depend_on_how_the_table_was_read(symmetric_pair):
    raw = small_dataset(
        [[1, 2, 3], [-1, -2, 3], [-1, -2, -3], [1, 2, 0], [-1, -2, 0]],
        [1, 2, 3, 1, 2],
        np.array([10.0, 20.0, 40.0, 5.0, 7.0]),
        np.array([1.0, 2.0, 4.0, 1.0, 1.0]),
    )
    anomalous_table = skmerge.read_unmerged(raw, anomalous=True)
    for anomalous in (False, True):
        a = merge_inverse_variance(symmetric_pair, anomalous=anomalous)
        b = merge_inverse_variance(anomalous_table, anomalous=anomalous)
        assert a.equals(b)


def test_scale_divides_intensity_and_sigma(symmetric_pair):
    scale = np.array([2.0, 4.0, 8.0, 0.5, 0.5])
    merged = merge_inverse_variance(symmetric_pair, scale=scale)
    # every observation of (1,2,3) becomes 5 ± 0.5; of (1,2,0): 10 ± 2 and 14 ± 2
    np.testing.assert_allclose(values(merged, "I"), [12.0, 5.0])
    np.testing.assert_allclose(values(merged, "SIGI"), [2**0.5, 0.5 / 3**0.5])


@pytest.mark.parametrize("scale", [np.ones(4), np.array([1.0, 1.0, 0.0, 1.0, 1.0]), -np.ones(5)],
                         ids=["wrong-length", "zero", "negative"])
def test_invalid_scale_is_an_input_error(symmetric_pair, scale):
    with pytest.raises(InputError, match="scale"):
        merge_inverse_variance(symmetric_pair, scale=scale)


def test_other_intensity_columns_can_be_merged(symmetric_pair):
    X = symmetric_pair.copy()
    X["Itwice"] = (2 * X["Iobs"].to_numpy()).astype(np.float32)
    merged = merge_inverse_variance(X, intensity_key="Itwice")
    np.testing.assert_allclose(values(merged, "I"), 2 * values(merge_inverse_variance(symmetric_pair), "I"))


def test_table_without_space_group_is_an_input_error(symmetric_pair):
    X = symmetric_pair.copy()
    X.spacegroup = None
    with pytest.raises(InputError, match="space group"):
        merge_inverse_variance(X)


def test_robust_mean_ignores_gross_outliers_and_equals_the_weighted_mean_without_them():
    from skmerge.baseline import inverse_variance_mean, robust_mean

    rng = np.random.default_rng(0)
    group = np.repeat(np.arange(200), 8)
    truth = rng.uniform(1, 10, 200)
    sigma = np.full(len(group), 0.5)
    values = truth[group] + sigma * rng.standard_normal(len(group))
    clean_mean, _ = inverse_variance_mean(group, values, sigma, 200)
    # On clean data only the rare 3σ deviates are weighed down: at most half a standard error.
    difference = np.abs(robust_mean(group, values, sigma, 200)[0] - clean_mean)
    assert difference.max() < 0.5 * 0.5 / np.sqrt(8) and np.mean(difference > 1e-6) < 0.05
    values[::40] += 50.0  # one zinger in every fifth group
    plain, _ = inverse_variance_mean(group, values, sigma, 200)
    robust, _ = robust_mean(group, values, sigma, 200)
    assert np.abs(plain - truth).max() > 5
    assert np.abs(robust - truth).max() < 1.0
    # Understated σ (all ×1/3): the scatter of the bulk sets the cut, not σ.
    robust_understated, _ = robust_mean(group, values, sigma / 3, 200)
    assert np.abs(robust_understated - truth).max() < 1.0
    assert np.isnan(robust_mean(np.array([0, 0]), np.array([1.0, 2.0]), np.ones(2), 2)[0][1])


def test_the_start_of_a_pair_with_a_gross_outlier_is_its_inlier_and_of_a_concordant_pair_their_mean():
    """A pair's median is its midpoint, from which the robust merge keeps a zinger; its most
    probable observation under the Wilson prior is the inlier (a zinger is the larger),
    and a concordant pair still merges to its inverse-variance mean."""
    from skmerge.baseline import inverse_variance_mean, robust_mean
    from skmerge.model.initialisation import probable_observations

    rng = np.random.default_rng(1)
    n = 400
    group = np.repeat(np.arange(n), 2)
    truth = 0.5 + rng.exponential(1.0, n)  # zingers of the weakest would be no gross outliers
    sigma = 0.05 + 0.05 * truth[group]
    values = truth[group] + sigma * rng.standard_normal(2 * n)
    zinger = np.zeros(2 * n, bool)
    zinger[rng.choice(n, 40, replace=False) * 2 + rng.integers(0, 2, 40)] = True
    values[zinger] *= rng.uniform(3, 10, zinger.sum())
    centric = rng.random(n) < 0.2
    start = probable_observations(group, values, sigma, n, np.ones(n), centric)
    from_median, _ = robust_mean(group, values, sigma, n)
    robust, _ = robust_mean(group, values, sigma, n, start=start)
    hit = group[zinger]
    inlier = ~zinger & np.isin(group, hit)
    # What is left of the zinger's weight moves the merge by less than the inlier's σ.
    assert np.all(np.abs(robust[hit] - values[inlier]) < sigma[inlier])
    assert np.abs(from_median[hit] - truth[hit]).max() > 1.0
    clean = ~np.isin(np.arange(n), hit)
    plain, _ = inverse_variance_mean(group, values, sigma, n)
    np.testing.assert_allclose(robust[clean], plain[clean], rtol=1e-6)


def test_groups_of_one_and_a_start_at_one_observation_do_not_make_sound_pairs_outliers():
    """Residuals about a group's own centre understate the scatter (0 for a group of one,
    half the difference for a pair): with half the groups single and σ understated 3×,
    the start must still take sound pairs for decided and merge them to their
    inverse-variance means (0.81 of them did when the scatter counted every residual)."""
    from skmerge.baseline import inverse_variance_mean, robust_mean
    from skmerge.model.initialisation import probable_observations

    rng = np.random.default_rng(2)
    n = 600
    group = np.concatenate([np.arange(n // 2), np.repeat(np.arange(n // 2, n), 2)])
    truth = 2.0 + rng.exponential(1.0, n)
    sigma = np.full(len(group), 0.3)
    values = truth[group] + sigma * rng.standard_normal(len(group))
    understated = sigma / 3
    start = probable_observations(group, values, understated, n, np.ones(n), np.zeros(n, bool))
    robust, _ = robust_mean(group, values, understated, n, start=start)
    plain, _ = inverse_variance_mean(group, values, understated, n)
    pairs = np.arange(n // 2, n)
    assert np.mean(np.isclose(robust[pairs], plain[pairs], rtol=1e-3)) > 0.98
