"""skmerge.shadows: a detector shadow found from where strongly predicted spots are
extinguished, and the merge that leaves its observations out."""

import json

import numpy as np
import pandas as pd
import pytest
from matplotlib.patches import Circle

import skmerge
from skmerge.calibration import calibration_report
from skmerge.datasets import make_unmerged
from skmerge.plotting import plot_shadow
from skmerge.errors import InputError
from skmerge.shadows import detector_columns, find_shadows

KEYS = ["dHKL", "XDET", "YDET", "BATCH"]


@pytest.fixture(scope="module")
def arm():
    """90 images behind a beam-stop arm, with 1 % gross outliers elsewhere too."""
    return make_unmerged(n_images=90, beamstop_arm=True, outlier_fraction=0.01, random_state=0)


def test_the_simulated_arm_shadows_a_stripe_of_spots(arm):
    X, truth = arm
    shadowed = truth.shadowed
    assert 0.005 < shadowed.mean() < 0.03
    # The arm runs from the beam (1500, 1500) towards the upper left.
    assert (X["XDET"].to_numpy()[shadowed] < 1500).all() and (X["YDET"].to_numpy()[shadowed] > 1500).all()
    ratio = X["Iobs"].to_numpy()[shadowed] / truth.Itrue[shadowed]
    assert np.median(ratio) < 0.1


def test_a_perfect_prediction_finds_the_arm_and_little_else(arm):
    X, truth = arm
    mask = find_shadows(X, truth.Itrue)
    inside = mask.contains(X)
    assert inside[truth.shadowed].mean() > 0.85
    assert inside[~truth.shadowed].mean() < 0.01
    assert mask.columns == ("XDET", "YDET")
    assert mask.n_extinct.sum() > 0.6 * mask.n_strong.sum() and mask.extinct_rate < 0.02
    assert "detector shadow" in mask.describe()
    # The arm's root next to the beam has too few spots per cell; a beam zone takes it.
    assert mask.beam_zone is None or np.hypot(*(mask.beam_zone.centre - 1500.0)) < 20.0
    document = json.loads(json.dumps(mask.to_dict()))
    assert len(document["cells"]) == len(mask.cells)


def test_spots_that_disagree_around_the_beam_make_a_beam_zone():
    """A penumbra: 40 % of the spots within 150 pixels of the beam (1500, 1500) come out
    2.5-4× above or below their intensity, as next to PYP's beam stop."""
    X, truth = make_unmerged(n_images=90, outlier_fraction=0.01, random_state=0)
    rng = np.random.default_rng(1)
    distance = np.hypot(X["XDET"].to_numpy() - 1500.0, X["YDET"].to_numpy() - 1500.0)
    spoiled = (distance < 150.0) & (rng.uniform(size=len(X)) < 0.4)
    factor = np.exp(rng.choice([-1.0, 1.0], spoiled.sum()) * rng.uniform(np.log(2.5), np.log(4.0), spoiled.sum()))
    X.loc[spoiled, "Iobs"] *= factor
    mask = find_shadows(X, truth.Itrue)
    zone = mask.beam_zone
    assert len(mask.cells) == 0
    assert np.hypot(*(zone.centre - 1500.0)) < 20.0
    assert 100.0 < zone.radius < 200.0
    assert zone.n_discordant > 10 * zone.discordant_rate * zone.n_strong
    inside = mask.contains(X)
    assert inside[spoiled].mean() > 0.7
    assert not inside[distance > 250.0].any()
    assert "around the beam" in mask.describe()
    # Without resolutions there is no beam position to look around.
    assert find_shadows(X.drop(columns=["dHKL"]), truth.Itrue) is None
    assert find_shadows(X.assign(dHKL=np.nan), truth.Itrue) is None
    assert json.loads(json.dumps(mask.to_dict()))["beam_zone"]["radius"] == pytest.approx(zone.radius)
    circles = [patch for patch in plot_shadow(mask, X, truth.Itrue).axes[0].patches if isinstance(patch, Circle)]
    assert len(circles) == 1 and circles[0].get_radius() == pytest.approx(zone.radius)


def test_no_shadow_in_data_without_one():
    """Zingers and low outliers scattered at random (1 %) are not a shadow."""
    X, truth = make_unmerged(n_images=90, outlier_fraction=0.01, random_state=0)
    assert find_shadows(X, truth.Itrue) is None


def test_a_shadow_needs_detector_positions(arm):
    X, truth = arm
    assert find_shadows(X.drop(columns=["XDET", "YDET"]), truth.Itrue) is None
    assert detector_columns(X) == ("XDET", "YDET")
    X_named = X.rename(columns={"XDET": "xpix", "YDET": "ypix"})
    assert find_shadows(X_named, truth.Itrue, columns=["xpix", "ypix"]) is not None
    with pytest.raises(InputError, match="xpix"):
        find_shadows(X, truth.Itrue, columns=["xpix", "ypix"])


def test_positions_outside_the_grid_or_missing_are_not_shadowed(arm):
    X, truth = arm
    mask = find_shadows(X, truth.Itrue)
    far = pd.DataFrame({"XDET": [-1e6, np.nan, 1e9], "YDET": [1e6, 1500.0, np.inf]})
    assert not mask.contains(far).any()


def test_the_merge_leaves_the_shadow_out_and_says_so(arm, tmp_path):
    """run_merge finds the arm after its fit, fits again without it, flags its
    observations in the predictions and keeps them out of the calibration; the
    amplitudes come closer to the truth than a merge that keeps them."""
    X, truth = arm
    options = dict(metadata=KEYS, max_iter=300, mlp_layers=2, random_state=0, test_fraction=0.1)
    lines = []
    masked = skmerge.run_merge(X, log=lambda *line: lines.append(line), **options)
    kept = skmerge.run_merge(X, mask_shadows=False, log=lambda *line: None, **options)

    assert masked.shadow is not None and kept.shadow is None
    assert any("detector shadow" in message for _, message in lines)
    flagged = masked.predictions[0]["shadowed"].to_numpy() > 0
    assert flagged[truth.shadowed].mean() > 0.6 and flagged[~truth.shadowed].mean() < 0.01
    assert not (kept.predictions[0]["shadowed"].to_numpy() > 0).any()
    # Held-out observations behind the shadow are not part of the calibration.
    held_out = masked.predictions[0]["test"].to_numpy() > 0
    assert (held_out & flagged).any()
    assert masked.calibration[0].shells.loc["overall", "n_test"] == (held_out & ~flagged).sum()

    def cc_truth(result):
        merged = result.merged[0]
        return np.corrcoef(merged["F"], truth.merged.loc[merged.index, "F"])[0, 1]

    assert cc_truth(masked) > cc_truth(kept) + 0.003

    paths = {path.name for path in masked.write(tmp_path / "arm")}
    assert "arm_shadow.png" in paths and "arm_shadow.png" not in {p.name for p in kept.write(tmp_path / "kept")}
    document = json.loads((tmp_path / "arm_stats.json").read_text())
    assert document["shadow"]["columns"] == ["XDET", "YDET"] and len(document["shadow"]["cells"]) == len(
        masked.shadow.cells)


def test_calibration_counts_only_unshadowed_held_out_rows():
    rng = np.random.default_rng(0)
    n = 2000
    predictions = pd.DataFrame({"Z": rng.normal(size=n), "Ipred": rng.exponential(100, n), "test": 1,
                                "shadowed": 0, "image_id": rng.integers(0, 10, n), "Scale": 1.0,
                                "dHKL": rng.uniform(2, 10, n)})
    predictions.loc[:99, "Z"] = -50.0
    predictions.loc[:99, "shadowed"] = 1
    report = calibration_report(predictions, shells=2)
    assert report.shells.loc["overall", "n_test"] == n - 100
    assert abs(report.shells.loc["overall", "z_sd"] - 1) < 0.1
