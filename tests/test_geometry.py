"""Beam directions from the observed Miller indices, stills told from rotation series, and
the image layers or heads and the shallower scale network that "auto" gives stills."""

import json

import numpy as np
import pytest

from skmerge import VariationalMerger
from skmerge.datasets import make_unmerged
from skmerge.errors import ParameterError
from skmerge.geometry import MIN_SPOTS, beam_directions, consecutive_beam_angles, recorded_as_stills
from skmerge.merge_outputs import fit_messages
from skmerge.model.fitting import resolved_network_shape

FAST = dict(metadata=["dHKL", "XDET", "YDET"], mlp_layers=2, mlp_width=6, max_iter=30, random_state=0)


def _beams(X):
    image_ids, image = np.unique(X["image_id"].to_numpy(), return_inverse=True)
    return beam_directions(X[["Hobs", "Kobs", "Lobs"]].to_numpy(), X.cell, image.ravel(), len(image_ids))


@pytest.mark.parametrize("oscillation", [0.2, 1.0, 3.0])
def test_consecutive_rotation_images_turn_the_beam_by_the_oscillation(oscillation):
    X, _ = make_unmerged(n_images=8, oscillation=oscillation, random_state=0)
    angles = consecutive_beam_angles(X)
    assert len(angles) == 7
    np.testing.assert_allclose(angles, oscillation, rtol=0.05, atol=0.05)
    assert not recorded_as_stills(X)


def test_the_spots_of_a_still_lie_on_the_ewald_sphere_of_its_beam():
    X, _ = make_unmerged(n_images=4, stills=True, wavelength=1.0, random_state=2)
    s = X[["Hobs", "Kobs", "Lobs"]].to_numpy(float) @ np.array(X.cell.frac.mat.tolist())
    beams = _beams(X)
    image = X["image_id"].to_numpy()
    k = beams[image] / 1.0  # |k| = 1/λ
    assert np.median(np.abs(np.linalg.norm(s + k, axis=1) - 1.0)) < 0.005


def test_stills_point_their_beams_anywhere():
    X, _ = make_unmerged(n_images=20, stills=True, random_state=1)
    assert np.median(consecutive_beam_angles(X)) > 45
    assert recorded_as_stills(X)


def test_images_with_too_few_spots_or_no_observed_indices_tell_nothing():
    X, _ = make_unmerged(n_images=6, stills=True, random_state=1)
    sparse = X[(X["image_id"] != 2) | (X.groupby("image_id").cumcount() < MIN_SPOTS - 1)]
    beams = _beams(sparse)
    assert np.isnan(beams[2]).all() and np.isfinite(np.delete(beams, 2, axis=0)).all()
    assert len(consecutive_beam_angles(sparse)) == 3  # pairs (0,1), (3,4), (4,5)
    assert not recorded_as_stills(X.drop(columns=["Hobs", "Kobs", "Lobs"]))
    assert not recorded_as_stills(X[X["image_id"] < 2])  # a single pair


def test_images_of_different_files_are_not_compared():
    X, _ = make_unmerged(n_images=6, random_state=0)
    X["file_id"] = (X["image_id"] >= 3).astype(np.int32)  # two sweeps of the same rotation
    assert len(consecutive_beam_angles(X)) == 4


@pytest.fixture(scope="module")
def tables():
    """Eight stills and eight rotation images, simulated once for the tests of "auto"."""
    return {kind: make_unmerged(n_images=8, stills=kind == "stills", random_state=0)[0]
            for kind in ("stills", "rotation")}


@pytest.mark.parametrize("params, layers", [(dict(), 3), (dict(image_layers=0), 0)])
def test_auto_gives_stills_layers_or_heads_and_a_warm_start_keeps_them(tables, params, layers):
    stills = tables["stills"]
    merger = VariationalMerger(**FAST, **params).fit(stills)
    assert merger.image_layers_ == layers and merger.image_heads_ == (not layers)
    if layers:
        assert merger.scale_weights_[-2].shape == (8, 6)  # the last image layer's bias: one per image
        assert any("image layers: 3" in line and "the images are stills" in line for line in fit_messages(merger))
    else:
        assert merger.scale_weights_[-3].shape == (8, 3)  # the heads' means
        assert any("image heads" in line and "the images are stills" in line for line in fit_messages(merger))
    assert sum("image layers" in line or "image heads" in line for line in fit_messages(merger)) == 1
    merger.set_params(warm_start=True, max_iter=5).fit(stills[stills["image_id"] < 6])
    assert (merger.image_layers_, merger.image_heads_) == (layers, not layers)


@pytest.mark.parametrize("params, data, freedom", [
    (dict(), "stills", (3, False)),
    (dict(image_layers=0), "stills", (0, True)),
    (dict(image_heads=True), "stills", (0, True)),
    (dict(image_heads=False), "stills", (3, False)),
    (dict(image_layers=1), "stills", (1, False)),
    (dict(image_layers=0, image_heads=False), "stills", (0, False)),
    (dict(image_layers=2, image_heads=True), "stills", (2, True)),
    (dict(image_model="encoder"), "stills", (0, False)),
    (dict(laue=True), "stills", (0, False)),
    (dict(), "rotation", (0, False)),
    (dict(image_layers=0), "rotation", (0, False)),
    (dict(image_layers=1), "rotation", (1, False)),
    (dict(image_heads=True), "rotation", (0, True)),
])
def test_auto_gives_image_freedom_to_serial_stills_only(tables, params, data, freedom):
    shape = resolved_network_shape(VariationalMerger(**FAST, **params), tables[data])
    assert shape == (FAST["mlp_layers"], *freedom)


@pytest.mark.parametrize("params, data, depth", [
    (dict(), "stills", 6),
    (dict(image_layers=1), "stills", 6),
    (dict(image_heads=False), "stills", 6),
    (dict(image_model="encoder"), "stills", 20),
    (dict(image_layers=0), "stills", 20),
    (dict(image_heads=True), "stills", 20),
    (dict(laue=True), "stills", 20),
    (dict(), "rotation", 20),
    (dict(mlp_layers=3), "stills", 3),
    (dict(mlp_layers=3), "rotation", 3),
])
def test_auto_gives_serial_stills_with_image_layers_a_shallower_scale_network(tables, params, data, depth):
    merger = VariationalMerger(**{**FAST, "mlp_layers": "auto", **params})
    assert resolved_network_shape(merger, tables[data]).mlp_layers == depth


def test_the_auto_depth_reaches_the_fit_the_log_and_a_warm_start(tables):
    stills = tables["stills"]
    merger = VariationalMerger(**{**FAST, "mlp_layers": "auto"}).fit(stills)
    assert merger.mlp_layers_ == 6
    # The shared stack's kernels come first, one per layer, then its biases.
    assert next(i for i, w in enumerate(merger.scale_weights_) if np.ndim(w) == 1) == 6
    assert any(line == "scale network: 6 layers deep (the images are stills)" for line in fit_messages(merger))
    merger.set_params(warm_start=True, max_iter=3).fit(stills[stills["image_id"] < 6])
    assert merger.mlp_layers_ == 6 and np.isfinite(merger.predict(stills)).all()
    with pytest.raises(ParameterError, match="mlp_layers=6, mlp_width=6; a warm start needs the same"):
        merger.set_params(mlp_layers=20).fit(stills)
    rotation = VariationalMerger(**{**FAST, "mlp_layers": "auto", "max_iter": 3}).fit(tables["rotation"])
    assert rotation.mlp_layers_ == 20
    assert not any("scale network" in line for line in fit_messages(rotation))


def test_explicit_image_freedom_reaches_the_fit(tables):
    merger = VariationalMerger(**FAST, image_layers=1, image_heads=True).fit(tables["rotation"])
    assert (merger.image_layers_, merger.image_heads_) == (1, True)
    assert merger.scale_weights_[-4].shape == (8, 6) and merger.scale_weights_[-3].shape == (8, 3)


def test_the_choice_is_in_the_statistics_json(tmp_path):
    from skmerge.cli import main

    from test_cli import _write_unmerged

    X, _ = make_unmerged(n_images=6, stills=True, random_state=0)
    path = _write_unmerged(X, tmp_path / "stills.mtz")
    main(["mono", "--iterations", "10", "--mlp-layers", "2", "dHKL", str(path), str(tmp_path / "out")])
    document = json.loads((tmp_path / "out_stats.json").read_text())
    assert document["image_layers"] == 3 and document["image_heads"] is False and document["mlp_layers"] == 2
