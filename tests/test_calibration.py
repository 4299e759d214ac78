"""skmerge.calibration: predictive z-scores, interval coverage, outliers and bad images,
and their place in the outputs of a run."""

import contextlib
import io
import json

import gemmi
import numpy as np
import pandas as pd
import pytest
import reciprocalspaceship as rs
from scipy import integrate, stats

import skmerge
from skmerge.calibration import (
    Calibration,
    calibration_report,
    coverage,
    likelihood_law,
    normal_score,
    outlier_weight,
    predictive_z,
    refined_sigma,
    robust_sd,
)
from skmerge.cli import main
from skmerge.datasets import make_unmerged
from skmerge.shells import make_shells
from skmerge.workflow import calibration_from_outputs, format_statistics, statistics_from_outputs

KEYS = ["dHKL", "XDET", "YDET", "BATCH"]
FAST = {"mlp_layers": 2, "max_iter": 200, "random_state": 0}
DARK, SHUFFLED = 8, 4  # the simulated bad images: a third of the scale; intensities shuffled


# ------------------------------------------------------------------ the scores
def test_z_robust_sd_and_coverage_agree_with_numpy_and_scipy():
    rng = np.random.default_rng(0)
    iobs, ipred = rng.normal(100, 30, 500), rng.normal(100, 30, 500)
    sigma, sd = rng.uniform(1, 10, 500), rng.uniform(0, 5, 500)
    np.testing.assert_allclose(predictive_z(iobs, ipred, sigma, sd), (iobs - ipred) / np.hypot(sigma, sd))

    z = rng.standard_t(3, 1001)
    assert robust_sd(z) == pytest.approx(stats.median_abs_deviation(z, scale="normal"), rel=1e-4)
    assert coverage(z, 0.95) == np.count_nonzero(np.abs(z) <= 1.959964) / len(z)

    # Overdispersed z (σ understated by 2): coverage 2Φ(q/2) − 1 for the interval ±q.
    wide = rng.normal(0, 2, 200_000)
    for level in (0.68, 0.95):
        q = stats.norm.ppf((1 + level) / 2)
        assert coverage(wide, level) == pytest.approx(2 * stats.norm.cdf(q / 2) - 1, abs=0.005)
    assert robust_sd(wide) == pytest.approx(2, rel=0.02)
    assert np.isnan(coverage([], 0.68)) and np.isnan(robust_sd([]))


@pytest.mark.parametrize("z", [0.0, 1.5, 6.0])
def test_weight_is_the_posterior_mean_of_the_student_t_precision(z):
    # Student-t(ν) = N(0, 1/w) with w ~ Gamma(ν/2, rate ν/2): E[w | z] by quadrature.
    nu = 5.0
    joint = lambda w, k: w**k * stats.gamma.pdf(w, nu / 2, scale=2 / nu) * stats.norm.pdf(z, scale=w**-0.5)
    mean = integrate.quad(joint, 0, np.inf, args=(1,))[0] / integrate.quad(joint, 0, np.inf, args=(0,))[0]
    assert outlier_weight(z, nu) == pytest.approx(mean, rel=1e-6)


def _synthetic_predictions(n=6000, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"Z": rng.normal(size=n), "Ipred": rng.exponential(100, n), "test": rng.random(n) < 0.3,
                         "image_id": np.arange(n) // 200, "Scale": 1 + 0.01 * rng.normal(size=n),
                         "dHKL": rng.uniform(2, 10, n)})


def test_report_per_shell_and_intensity_bin_is_the_numpy_computation():
    predictions = _synthetic_predictions()
    predictions.loc[:9, "Z"] = 50.0
    shells = make_shells(np.unique(predictions["dHKL"]), 4)
    report = calibration_report(predictions, shells=shells, n_bins=5)
    z, test = predictions["Z"].to_numpy(), predictions["test"].to_numpy()
    shell = shells.assign(predictions["dHKL"].to_numpy())
    for i in range(4):
        held = z[(shell == i) & test]
        row = report.shells.loc[i + 1]
        assert row["n_test"] == len(held) and row["z_sd"] == pytest.approx(np.std(held))
        assert row["coverage_68"] == pytest.approx(np.mean(np.abs(held) <= stats.norm.ppf(0.84)))
        assert row["n_outliers"] == np.count_nonzero((np.abs(z) > report.z_limit) & (shell == i))
    assert report.z_limit == pytest.approx(4 * max(1, robust_sd(z)))
    assert report.shells.loc["overall", "n_outliers"] == 10
    # Equal-count bins of Ipred over the held-out observations.
    assert report.intensity.drop(index="overall")["n_test"].tolist() == pytest.approx([test.sum() / 5] * 5, abs=1)
    assert report.intensity.loc["overall", "z_robust_sd"] == pytest.approx(robust_sd(z[test]))


def test_the_outlier_limit_follows_understated_sigmas():
    predictions = _synthetic_predictions()
    predictions["Z"] *= 3  # every σ 3× too small: a third of the scatter, not 10 % outliers
    report = calibration_report(predictions)
    assert report.z_limit == pytest.approx(12, rel=0.05)
    assert report.shells.loc["overall", "n_outliers"] <= 2


def test_images_listed_for_their_scale_their_outliers_or_their_scatter_and_no_other():
    predictions = _synthetic_predictions()
    image = predictions["image_id"]
    predictions.loc[image == 7, "Scale"] /= 3
    predictions.loc[image == 20, "Z"] = 9.0
    predictions.loc[image == 25, "Z"] = 9.0  # the last image: a half window
    predictions.loc[image == 12, "Z"] *= 2.5  # few beyond the outlier limit, but all scattered
    predictions.loc[image == 13, "Z"] *= 1.3  # within the spread real images have
    report = calibration_report(predictions)
    images = report.flagged
    assert images.index.tolist() == [7, 12, 20, 25]
    assert images.loc[7, "scale_ratio"] == pytest.approx(1 / 3, rel=0.02)
    assert "scale 0.33x" in images.loc[7, "reason"] and "100% of its observations" in images.loc[20, "reason"]
    assert images.loc[12, "outlier_fraction"] < 0.2 and "its observations scatter 2." in images.loc[12, "reason"]
    z = predictions.loc[image == 12, "Z"]
    assert images.loc[12, "z_robust_sd"] == pytest.approx(1.4826 * np.median(np.abs(z - np.median(z))))
    assert images.loc[12, "spread_ratio"] == pytest.approx(2.5, rel=0.15)
    assert report.images.loc[13, "spread_ratio"] == pytest.approx(1.3, rel=0.15)


def test_images_of_one_or_two_observations_are_not_listed_for_their_scatter():
    # Most images hold one observation (robust SD of z 0), a few hold two or many.
    rng = np.random.default_rng(0)
    image_id = np.r_[np.arange(100), 100, 100, np.repeat([101, 102, 103], 50)]
    z = rng.normal(size=len(image_id))
    z[image_id == 103] *= 3
    predictions = pd.DataFrame({"Z": z, "Ipred": rng.exponential(100, len(z)), "test": False, "image_id": image_id,
                                "Scale": 1.0, "dHKL": rng.uniform(2, 10, len(z))})
    report = calibration_report(predictions, shells=2, n_bins=2)
    assert report.images["z_robust_sd"].notna().sum() == 3  # the images of 50
    assert report.flagged.index.tolist() == [103]
    assert report.images.loc[103, "spread_ratio"] == pytest.approx(3, rel=0.3)


def test_equal_predictions_have_only_the_overall_intensity_row():
    rng = np.random.default_rng(0)
    n = 500
    predictions = pd.DataFrame({"Z": rng.normal(size=n), "Ipred": 100.0, "test": rng.random(n) < 0.3,
                                "image_id": np.arange(n) // 50, "Scale": 1.0, "dHKL": rng.uniform(2, 10, n)})
    report = calibration_report(predictions, shells=2, n_bins=4)
    assert report.intensity.index.tolist() == ["overall"]
    assert report.intensity.loc["overall", "n_obs"] == n == report.shells.loc["overall", "n_obs"]


def test_a_still_of_garbled_intensities_is_listed(tmp_path):
    """Stills have no neighbours to compare scales with; a still whose intensities belong
    to no reflection it is indexed as (shuffled here) still stands out by its scatter."""
    X, _ = make_unmerged(n_images=30, stills=True, mosaicity_spread=0.5, spacegroup="P 4 3 2",
                         cell=(40, 40, 40, 90, 90, 90), dmin=2.5, outlier_fraction=0.02, random_state=0)
    garbled = X["image_id"].to_numpy() == 11
    X.loc[garbled, "Iobs"] = np.random.default_rng(0).permutation(X.loc[garbled, "Iobs"].to_numpy())
    # 400 steps: the stills' image layers start at zero, and after 200 steps a still
    # whose partialities they had not yet learned scattered 2.3× as widely too.
    result = skmerge.run_merge(X, tmp_path / "stills", metadata=["dHKL", "EWALD_OFFSET", "XDET", "YDET"], shells=4,
                               log=lambda *line: None, **{**FAST, "max_iter": 400})
    listed = result.calibration[0].flagged
    assert listed.index.tolist() == [11]
    assert "its observations scatter" in listed.loc[11, "reason"] and listed.loc[11, "spread_ratio"] > 2


def test_report_round_trips_through_json():
    report = calibration_report(_synthetic_predictions())
    again = Calibration.from_dict(json.loads(json.dumps(report.to_dict())))
    assert again.to_string() == report.to_string()
    pd.testing.assert_frame_equal(again.shells, report.shells)


# ------------------------------------------------------------- a simulated run
@pytest.fixture(scope="module")
def simulated():
    """2 % gross outliers, one image at a third of its scale, one of shuffled intensities."""
    X, truth = make_unmerged(n_images=16, spacegroup="P 4 3 2", cell=(40, 40, 40, 90, 90, 90), dmin=2.5,
                             outlier_fraction=0.02, random_state=0)
    image = X["image_id"].to_numpy()
    X.loc[image == DARK, ["Iobs", "SIGIobs"]] /= 3
    rng = np.random.default_rng(0)
    X.loc[image == SHUFFLED, "Iobs"] = rng.permutation(X.loc[image == SHUFFLED, "Iobs"].to_numpy())
    return X, truth


@pytest.fixture(scope="module")
def run(simulated, tmp_path_factory):
    X, _ = simulated
    out = tmp_path_factory.mktemp("run") / "sim"
    lines = []
    result = skmerge.run_merge(X, out, metadata=KEYS, test_fraction=0.2, shells=4,
                               log=lambda *line: lines.append(line), **FAST)
    return result, out, lines


def test_injected_outliers_and_bad_images_are_found(simulated, run):
    X, truth = simulated
    result, _, lines = run
    report = result.calibration[0]
    z = result.predictions[0]["Z"].to_numpy(np.float64)
    outlier = np.abs(z) > report.z_limit
    image = X["image_id"].to_numpy()
    # Zingers lie ≥ 10 σ above the truth; shadowed weak spots can be within the noise.
    zinger = truth.outlier & ((X["Iobs"].to_numpy() - truth.Itrue) / X["SIGIobs"].to_numpy() > 10)
    assert zinger.sum() >= 15 and outlier[zinger].mean() >= 0.8
    # At a multiplicity of 3.4 a bad observation drags the prediction of its reflection's
    # other observations too; those of reflections without one are (nearly) never flagged.
    reflection = X["asu_index"].to_numpy()
    clean = ~np.isin(reflection, reflection[truth.outlier | (image == SHUFFLED)])
    assert clean.sum() > 700 and outlier[clean].mean() <= 0.02
    assert report.flagged.index.tolist() == [SHUFFLED, DARK]
    assert 0.25 < report.flagged.loc[DARK, "scale_ratio"] < 0.45  # the image was put at a third of its scale
    assert "scale 0." in report.flagged.loc[DARK, "reason"]
    images = report.images["outlier_fraction"]
    assert images[SHUFFLED] > 3 * images.median()  # listed for its scale or its outliers
    assert sum(f"image_id {DARK} " in message for message in result.warnings) == 1
    assert any("held-out SD(z)" in message for _, message in lines)


def test_honest_sigmas_are_calibrated_on_held_out_observations():
    X, _ = make_unmerged(n_images=16, spacegroup="P 4 3 2", cell=(40, 40, 40, 90, 90, 90), dmin=2.5, random_state=1)
    result = skmerge.run_merge(X, metadata=KEYS, test_fraction=0.2, log=lambda *line: None, **FAST)
    overall = result.calibration[0].shells.loc["overall"]
    assert overall["n_test"] == result.test.sum() > 250
    assert 0.85 < overall["z_sd"] < 1.2 and 0.85 < overall["z_robust_sd"] < 1.2
    assert 0.6 < overall["coverage_68"] < 0.76 and 0.91 < overall["coverage_95"] < 0.99
    assert overall["n_outliers"] <= 2 and result.calibration[0].flagged.empty


def test_predictions_file_has_z_and_weight(run, simulated):
    result, out, _ = run
    X, _ = simulated
    mtz = gemmi.read_mtz_file(f"{out}_predictions_0.mtz")
    assert {c.label: c.type for c in mtz.columns}.items() >= {"Z": "R", "Weight": "W"}.items()
    predictions = rs.read_mtz(f"{out}_predictions_0.mtz")
    z = predictions["Z"].to_numpy(np.float64)
    ipred = predictions["Ipred"].to_numpy(np.float64)
    sigma = refined_sigma(result.merger, X["SIGIobs"].to_numpy(np.float64), ipred)
    residual = predictive_z(X["Iobs"], ipred, sigma, predictions["SigIpred"])
    law = likelihood_law(result.merger)
    assert law == {"dof": pytest.approx(result.merger.likelihood_dof_)}  # the default likelihood's own ν
    np.testing.assert_allclose(z, normal_score(residual, law), rtol=1e-4, atol=1e-4)
    assert (np.abs(z) <= np.abs(residual) + 1e-6).all()  # a Student-t residual is less surprising
    np.testing.assert_allclose(predictions["Weight"].to_numpy(np.float64), outlier_weight(residual, law["dof"]),
                               rtol=1e-4)


def test_a_two_piece_likelihood_scores_each_residual_by_its_sides_law():
    from skmerge.calibration import observation_scores

    X, _ = make_unmerged(n_images=6, outlier_fraction=0.02, random_state=3)
    merger = skmerge.VariationalMerger(likelihood="two-piece", mlp_layers=2, mlp_width=4, max_iter=30,
                                       random_state=0).fit(X)
    ipred, ipred_sd = merger.predict(X, return_std=True)
    z, weight = observation_scores(merger, X, ipred, ipred_sd)
    below, above = merger.likelihood_dof_below_, merger.likelihood_dof_above_
    assert likelihood_law(merger) == {"dof_below": below, "dof_above": above}
    residual = predictive_z(X["Iobs"], ipred, refined_sigma(merger, X["SIGIobs"].to_numpy(np.float64), ipred),
                            ipred_sd)
    assert (residual < 0).any() and (residual > 0).any()
    peak_ratio = stats.t(below).pdf(0.0) / stats.t(above).pdf(0.0)
    dof = np.where(residual < 0, below, above)
    width = np.where(residual < 0, np.sqrt(peak_ratio), 1 / np.sqrt(peak_ratio))
    tail = stats.t(dof).sf(np.abs(residual) / width)
    np.testing.assert_allclose(z, np.sign(residual) * stats.norm.isf(tail), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(weight, (dof + 1) / (dof + (residual / width) ** 2), rtol=1e-6)


def test_outputs_carry_the_calibration(run):
    result, out, _ = run
    document = json.loads(out.with_name("sim_stats.json").read_text())
    saved = document["datasets"][0]["calibration"]
    assert saved["flagged_images"] == [SHUFFLED, DARK] and saved["n_test"] == result.test.sum()
    assert out.with_name("sim_calibration.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = format_statistics(result.statistics, result.names, result.calibration)  # what skmerge mono prints
    assert "CCpred" in text and "in95" in text and f"image_id {DARK}: scale" in text

    # skmerge stats recomputes the same report from the MTZ files, or reads the JSON.
    statistics, _ = statistics_from_outputs(out, shells=4)
    again = calibration_from_outputs(out, statistics)[0]
    pd.testing.assert_frame_equal(again.shells, result.calibration[0].shells, rtol=1e-4)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["stats", "--shells", "4", str(out)]) == 0
    assert f"Calibration on {result.test.sum():,} held-out observations" in stdout.getvalue()


def test_calibration_from_the_json_when_the_mtz_files_are_gone(run, tmp_path):
    result, out, _ = run
    (tmp_path / "sim_stats.json").write_bytes(out.with_name("sim_stats.json").read_bytes())
    statistics, _ = statistics_from_outputs(tmp_path / "sim")
    assert calibration_from_outputs(tmp_path / "sim", statistics)[0].to_string() == result.calibration[0].to_string()


def test_refined_sigma_applies_the_fitted_error_model(simulated):
    X, _ = simulated
    merger = skmerge.VariationalMerger(metadata=KEYS, error_model=True, **{**FAST, "max_iter": 20}).fit(X)
    sigma, ipred = X["SIGIobs"].to_numpy(), merger.predict(X)
    expected = merger.sdfac_ * np.sqrt(sigma**2 + (merger.sdadd_ * ipred) ** 2)
    np.testing.assert_allclose(refined_sigma(merger, sigma, ipred), expected, rtol=1e-5)
    np.testing.assert_array_equal(refined_sigma(merger.set_params(error_model=None), sigma, ipred), sigma)


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 1001])
def test_order_statistics_of_pieces_are_those_of_the_sorted_values(n):
    """Exact order statistics of values given in pieces (ties, ±0, negative values),
    and the robust SD of numpy's median from them."""
    from skmerge.calibration import _robust_sd_of, order_statistics

    rng = np.random.default_rng(n)
    values = np.round(rng.standard_t(2, n), 1)
    values[: n // 5] = -0.0
    pieces = np.array_split(values, 3)
    assert np.array_equal(order_statistics(lambda: pieces, np.arange(n)), np.sort(values))
    assert _robust_sd_of(lambda: pieces) == robust_sd(values)
    assert np.isnan(_robust_sd_of(lambda: [*pieces, np.array([np.nan])]))


def test_streamed_calibration_equals_the_calibration_of_the_whole_table():
    """Predictions given piece by piece (whole images per piece) are calibrated as the
    whole table is: the same z limit, tables, histograms and listed images."""
    from skmerge.calibration import streamed_calibration

    rng = np.random.default_rng(2)
    n = 6000
    z = rng.standard_t(3, n) * 1.5
    z[:300] = 40.0  # one image of outliers
    predictions = pd.DataFrame({"Z": z, "Ipred": rng.exponential(100, n), "test": rng.random(n) < 0.1,
                                "image_id": np.arange(n) // 300, "file_id": 0, "Scale": rng.uniform(0.9, 1.1, n),
                                "dHKL": rng.uniform(2, 10, n)})
    shells = make_shells(np.unique(predictions["dHKL"]), 4)
    for test in (predictions["test"], np.zeros(n, bool)):
        table = predictions.assign(test=test)
        expected = calibration_report(table, shells)
        got = streamed_calibration(lambda columns: (table.iloc[i:i + 900] for i in range(0, n, 900)), shells)
        assert got.z_limit == expected.z_limit and got.n_test == expected.n_test
        pd.testing.assert_frame_equal(got.shells, expected.shells)
        pd.testing.assert_frame_equal(got.intensity, expected.intensity)
        pd.testing.assert_frame_equal(got.images, expected.images)
        for part in ("test", "fitted"):
            assert np.array_equal(got.histogram[part], expected.histogram[part])
        assert got.flagged.index.tolist() == [0]
