"""Tests of the simulator :func:`skmerge.datasets.make_unmerged`.

The simulator is the ground truth of the other tests, so these check that what it returns
is self-consistent and that its noise model holds: merging with the true scales must
correlate with the true intensities exactly as well as the reported σ predict.
"""

import numpy as np
import pandas as pd
import pytest
import reciprocalspaceship as rs

from skmerge.baseline import merge_inverse_variance
from skmerge.datasets import make_unmerged
from skmerge.table import TABLE_COLUMNS


@pytest.fixture(scope="module")
def sim():
    return make_unmerged(n_images=60, random_state=0)


@pytest.fixture(scope="module")
def sim_weak():
    """Low signal-to-noise: the correlation with the truth is far from 1, so it measures
    the noise."""
    return make_unmerged(n_images=60, mean_intensity=20.0, random_state=1)


@pytest.fixture(scope="module")
def sim_anomalous():
    return make_unmerged(n_images=60, anomalous=True, random_state=0)


@pytest.fixture(scope="module")
def sim_outliers():
    return make_unmerged(n_images=60, outlier_fraction=0.05, random_state=0)


@pytest.fixture(scope="module")
def sim_laue():
    return make_unmerged(n_images=10, laue=True, wavelength_range=(0.95, 1.75), random_state=0)


def column(ds, name):
    return ds[name].to_numpy(np.float64, na_value=np.nan)


def truth_on(merged, truth):
    """The true merged table reindexed onto a merge's reflections."""
    aligned = truth.merged.reindex(merged.index)
    assert not aligned["I"].isna().any(), "merged reflections missing from the truth"
    return aligned


def correlation(a, b):
    return np.corrcoef(a, b)[0, 1]


def expected_cc(i_true, sigma):
    """CC of noisy estimates with the truth when the noise has the given σ."""
    return np.sqrt(np.var(i_true) / (np.var(i_true) + np.mean(sigma**2)))


# --------------------------------------------------------------------------- reproducibility


def test_same_random_state_gives_identical_data():
    X1, t1 = make_unmerged(n_images=15, random_state=7)
    X2, t2 = make_unmerged(n_images=15, random_state=7)
    pd.testing.assert_frame_equal(X1, X2)
    pd.testing.assert_frame_equal(t1.merged, t2.merged)
    for key in ("scale", "Itrue", "outlier"):
        np.testing.assert_array_equal(t1[key], t2[key], err_msg=key)


def test_different_random_state_gives_different_data():
    X1, t1 = make_unmerged(n_images=15, random_state=7)
    X2, t2 = make_unmerged(n_images=15, random_state=8)
    assert len(X1) != len(X2) or not np.array_equal(column(X1, "Iobs"), column(X2, "Iobs"))
    common = t1.merged.index.intersection(t2.merged.index)
    assert len(common) > 100
    assert not np.allclose(t1.merged.loc[common, "F"], t2.merged.loc[common, "F"])


# --------------------------------------------------------------------------- shape of the output


def test_observation_table_has_the_table_columns_and_metadata(sim):
    X, _ = sim
    assert list(X.columns[: len(TABLE_COLUMNS)]) == list(TABLE_COLUMNS)
    assert {"BATCH", "ROT", "XDET", "YDET"} <= set(X.columns)
    assert X["image_id"].nunique() == 60
    assert len(X) > 10_000


def test_scale_has_one_positive_value_per_row(sim):
    X, truth = sim
    assert truth.scale.shape == (len(X),)
    assert np.isfinite(truth.scale).all() and (truth.scale > 0).all()
    # the scale varies (image, resolution and detector position effects)
    assert truth.scale.std() / truth.scale.mean() > 0.05


def test_true_intensity_is_scale_times_true_merged_intensity(sim):
    X, truth = sim
    i_merged = truth.merged["I"].reindex(pd.MultiIndex.from_arrays([X["H"], X["K"], X["L"]])).to_numpy()
    # truth.merged is stored in float32
    np.testing.assert_allclose(truth.Itrue, truth.scale * i_merged, rtol=1e-6)


def test_truth_covers_exactly_the_observed_reflections(sim):
    X, truth = sim
    merged = merge_inverse_variance(X)
    assert merged.index.equals(truth.merged.index.sort_values())
    assert truth.merged["I"].to_numpy() == pytest.approx(truth.merged["F"].to_numpy() ** 2)


def test_truth_flags_match_the_table(sim):
    X, truth = sim
    index = pd.MultiIndex.from_arrays([X["H"], X["K"], X["L"]])
    np.testing.assert_array_equal(truth.merged["CENTRIC"].reindex(index).to_numpy(bool), X["CENTRIC"].to_numpy(bool))
    np.testing.assert_array_equal(truth.merged["EPSILON"].reindex(index).to_numpy(int), X["EPSILON"].to_numpy(int))


# --------------------------------------------------------------------------- noise model


def test_observation_errors_follow_the_reported_sigma(sim):
    X, truth = sim
    z = (column(X, "Iobs") - truth.Itrue) / column(X, "SIGIobs")
    assert abs(z.mean()) < 0.03
    assert 0.97 < z.std() < 1.03


def test_merged_errors_follow_the_merged_sigma(sim):
    X, truth = sim
    merged = merge_inverse_variance(X, scale=truth.scale)
    z = (column(merged, "I") - truth_on(merged, truth)["I"].to_numpy()) / column(merged, "SIGI")
    assert abs(z.mean()) < 0.05
    assert 0.95 < z.std() < 1.05


@pytest.mark.parametrize("which", ["sim", "sim_weak"])
def test_scaled_merge_correlates_with_truth_as_the_noise_predicts(request, which):
    X, truth = request.getfixturevalue(which)
    merged = merge_inverse_variance(X, scale=truth.scale)
    i_true = truth_on(merged, truth)["I"].to_numpy()
    predicted = expected_cc(i_true, column(merged, "SIGI"))
    observed = correlation(column(merged, "I"), i_true)
    assert observed == pytest.approx(predicted, abs=0.01)


def test_weak_data_are_really_noisy(sim_weak):
    # guards the previous test: at this signal level a wrong σ would move the CC a lot
    X, truth = sim_weak
    merged = merge_inverse_variance(X, scale=truth.scale)
    predicted = expected_cc(truth_on(merged, truth)["I"].to_numpy(), column(merged, "SIGI"))
    assert 0.7 < predicted < 0.95


def test_merge_without_the_true_scales_correlates_clearly_worse(sim):
    X, truth = sim
    scaled = merge_inverse_variance(X, scale=truth.scale)
    unscaled = merge_inverse_variance(X)
    i_true = truth_on(scaled, truth)["I"].to_numpy()
    cc_scaled = correlation(column(scaled, "I"), i_true)
    cc_unscaled = correlation(column(unscaled, "I"), i_true)
    assert cc_unscaled < cc_scaled - 0.02


# --------------------------------------------------------------------------- anomalous


def test_anomalous_truth_has_friedel_amplitudes(sim_anomalous):
    _, truth = sim_anomalous
    merged = truth.merged
    assert {"F(+)", "F(-)", "DANO"} <= set(merged.columns)
    np.testing.assert_allclose(column(merged, "DANO"), column(merged, "F(+)") - column(merged, "F(-)"), atol=1e-6)
    centric = merged["CENTRIC"].to_numpy(bool)
    assert (merged["DANO"].to_numpy()[centric] == 0).all()
    assert (merged["DANO"].to_numpy()[~centric] != 0).mean() > 0.99


def test_anomalous_table_negates_friedel_minus_indices(sim_anomalous):
    X, _ = sim_anomalous
    hkl = X[["H", "K", "L"]].to_numpy()
    asu, isym = rs.utils.hkl_to_asu(X[["Hobs", "Kobs", "Lobs"]].to_numpy(), X.spacegroup)
    minus = (isym % 2 == 0) & ~X["CENTRIC"].to_numpy(bool)
    assert 0.3 < minus.mean() < 0.6
    np.testing.assert_array_equal(hkl[minus], -asu[minus])
    np.testing.assert_array_equal(hkl[~minus], asu[~minus])
    assert not rs.utils.in_asu(hkl[minus], X.spacegroup).any()


def test_anomalous_differences_are_measurable(sim_anomalous):
    X, truth = sim_anomalous
    merged = merge_inverse_variance(X, anomalous=True, scale=truth.scale)
    true = truth_on(merged, truth)
    measured = column(merged, "I(+)") - column(merged, "I(-)")
    expected = (true["F(+)"] ** 2 - true["F(-)"] ** 2).to_numpy()
    both = ~np.isnan(measured) & ~true["CENTRIC"].to_numpy(bool)
    assert both.sum() > 1000
    assert correlation(measured[both], expected[both]) > 0.7


# --------------------------------------------------------------------------- outliers


def test_outlier_fraction_flags_about_that_many_rows(sim_outliers):
    X, truth = sim_outliers
    assert truth.outlier.shape == (len(X),)
    assert 0.04 < truth.outlier.mean() < 0.06


def test_outliers_deviate_by_many_sigma(sim_outliers):
    X, truth = sim_outliers
    z = np.abs(column(X, "Iobs") - truth.Itrue) / column(X, "SIGIobs")
    outlier = truth.outlier
    assert np.median(z[outlier]) > 10
    assert (z[outlier] > 3).mean() > 0.8
    assert (z[~outlier] > 3).mean() < 0.01


def test_no_outliers_by_default(sim):
    _, truth = sim
    assert not truth.outlier.any()


# --------------------------------------------------------------------------- Laue


def test_laue_wavelengths_lie_in_the_band(sim_laue):
    X, _ = sim_laue
    wavelength = column(X, "Wavelength")
    assert wavelength.min() >= 0.95 and wavelength.max() <= 1.75
    assert wavelength.max() - wavelength.min() > 0.6


def test_laue_harmonics_have_one_row_per_harmonic_of_each_spot(sim_laue):
    X, truth = sim_laue
    harmonics = truth.harmonics
    assert {"spot", "H", "K", "L", "n", "Wavelength", "scale", "I"} <= set(harmonics.columns)
    np.testing.assert_array_equal(np.unique(harmonics["spot"]), np.arange(len(X)))
    # harmonics of one spot lie on one ray: n·λ is the same for all of them
    n_lambda = (harmonics["n"] * harmonics["Wavelength"]).to_numpy()
    spot = harmonics["spot"].to_numpy()
    assert (np.diff(spot) >= 0).all()  # harmonics are listed spot by spot
    first_of_spot = np.searchsorted(spot, spot)
    np.testing.assert_allclose(n_lambda, n_lambda[first_of_spot], rtol=1e-9)


def test_laue_spots_with_several_harmonics_exist(sim_laue):
    X, truth = sim_laue
    per_spot = np.bincount(truth.harmonics["spot"], minlength=len(X))
    assert 0.01 < (per_spot > 1).mean() < 0.2


def test_laue_spot_intensity_is_the_sum_of_its_harmonics(sim_laue):
    X, truth = sim_laue
    total = np.bincount(truth.harmonics["spot"], weights=truth.harmonics["I"], minlength=len(X))
    np.testing.assert_allclose(total, truth.Itrue, rtol=1e-10)


def test_laue_spot_is_reported_at_its_lowest_harmonic(sim_laue):
    X, truth = sim_laue
    harmonics = truth.harmonics
    first = harmonics.groupby("spot").head(1)
    assert (first["n"] == harmonics.groupby("spot")["n"].min().to_numpy()).all()
    np.testing.assert_allclose(first["Wavelength"].to_numpy(), column(X, "Wavelength"), rtol=1e-6)
    np.testing.assert_array_equal(first[["H", "K", "L"]].to_numpy(), X[["H", "K", "L"]].to_numpy())
    np.testing.assert_allclose(first["scale"].to_numpy(), truth.scale)


def test_stills_partiality_widths_spread_per_image():
    """With ``mosaicity_spread`` every still gets its own partiality width, log-normally
    spread about ``mosaicity``; without it every still has ``mosaicity``. A still records
    the reflections within three widths of the Ewald sphere, so its outermost spot tells
    its width."""
    def widths(X):
        offset = pd.Series(np.abs(X["EWALD_OFFSET"].to_numpy(np.float64)))
        return offset.groupby(X["image_id"].to_numpy()).max().to_numpy() / 3

    same, _ = make_unmerged(n_images=40, stills=True, random_state=0)
    spread, truth = make_unmerged(n_images=40, stills=True, mosaicity_spread=0.5, random_state=0)
    np.testing.assert_allclose(widths(same), 0.002, rtol=0.02)
    assert 0.35 < np.log(widths(spread)).std() < 0.65
    # Each row's true scale holds its partiality exp(−ε²/2w²) with its still's width w:
    # without it, what is left varies within a still only with the detector position.
    offset = spread["EWALD_OFFSET"].to_numpy(np.float64)
    image = spread["image_id"].to_numpy()
    rest = np.log(truth.scale) + offset**2 / (2 * widths(spread)[image] ** 2)
    assert pd.Series(rest).groupby(image).std().max() < 0.1


@pytest.mark.parametrize("options", [dict(mosaicity_spread=0.5), dict(stills=True, mosaicity_spread=-0.1)])
def test_mosaicity_spread_needs_stills_and_a_spread_of_at_least_zero(options):
    from skmerge.errors import InputError

    with pytest.raises(InputError, match="mosaicity_spread"):
        make_unmerged(n_images=2, **options)
