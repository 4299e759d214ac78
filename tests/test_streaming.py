"""Tests of fits on an observation store (:mod:`skmerge.model.streaming`): they equal the
in-memory fit of the store's table, and refuse what they cannot stream."""

import copy
import json
import warnings

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import reciprocalspaceship as rs

import skmerge
from skmerge.errors import InputError, ParameterError
from skmerge.model import streaming
from skmerge.store import read_store, write_store

PARAMS = dict(metadata=["dHKL", "XDET", "YDET"], mlp_layers=2, batch_size=6, random_state=0)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    X, truth = skmerge.datasets.make_unmerged(n_images=30, stills=True, random_state=0)
    # Small row groups, so that the store has many and a fit's passes read it in pieces.
    path = write_store(X, tmp_path_factory.mktemp("stream") / "stills.parquet", row_group_size=3000)
    return path, read_store(path), truth


def _fit(X, **params):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return skmerge.VariationalMerger(**{**PARAMS, **params}).fit(X)


@pytest.fixture(scope="module")
def start_fits(store):
    """In-memory and streamed fits of one step of no size: their starting values."""
    path, X, _ = store
    with pytest.MonkeyPatch.context() as patch:
        # Small pieces: several per pass, so that sums are carried from piece to piece.
        patch.setattr(streaming.StoreSource, "chunks", lambda self: streaming.iter_store_chunks(self.path, 5000, False))
        return _fit(X, max_iter=1, learning_rate=1e-12), _fit(path, max_iter=1, learning_rate=1e-12)


def test_streamed_start_is_the_in_memory_start(start_fits):
    """With every observation of a reflection in the robust start's reservoir, the passes
    over the store compute the in-memory start: same reflections, counts, unit, Wilson
    curve, image scales and posterior."""
    in_memory, streamed = start_fits
    assert np.array_equal(in_memory.reflections_.hkl, streamed.reflections_.hkl)
    assert np.array_equal(in_memory.reflection_counts_, streamed.reflection_counts_)
    assert np.array_equal(in_memory.image_ids_, streamed.image_ids_)
    # Both read the stills from the observed indices (the store keeps their Friedel signs).
    assert in_memory.image_layers_ == streamed.image_layers_ == 3
    assert in_memory.intensity_scale_ == pytest.approx(streamed.intensity_scale_, rel=1e-12)
    np.testing.assert_allclose(in_memory.wilson_curve_[1], streamed.wilson_curve_[1], rtol=1e-9)
    np.testing.assert_allclose(in_memory.scale_weights_[-1], streamed.scale_weights_[-1], rtol=1e-5, atol=1e-6)
    assert in_memory.reflection_counts_.max() <= streaming.RESERVOIR
    for name, values in in_memory.posterior_weights_.items():
        np.testing.assert_allclose(values, streamed.posterior_weights_[name], rtol=1e-4, atol=1e-5)


def test_streamed_fit_equals_the_in_memory_fit(store):
    path, X, truth = store
    # Without the stills' layers (or heads) of their own, whose weights move only in the
    # steps that draw their image: the two fits draw the images in different orders, and at
    # 200 steps their scales differ by 3.5 % (median), where the shared network's agree
    # within 2 %.
    in_memory = _fit(X, max_iter=200, image_layers=0, image_heads=False)
    streamed = _fit(path, max_iter=200, image_layers=0, image_heads=False)
    merged, merged_streamed = in_memory.transform(X), streamed.transform(path)
    assert merged.index.equals(merged_streamed.index)
    assert np.corrcoef(merged["F"], merged_streamed["F"])[0, 1] > 0.999
    true_f = truth.merged["F"].reindex(merged.index)
    assert np.corrcoef(merged_streamed["F"], true_f)[0, 1] > np.corrcoef(merged["F"], true_f)[0, 1] - 0.005
    _, scale, _ = in_memory.predict(X, return_scale=True)
    _, scale_streamed, _ = streamed.predict(path, return_scale=True)
    assert np.corrcoef(np.log(scale), np.log(scale_streamed))[0, 1] > 0.99
    assert np.median(np.abs(np.log(scale / scale_streamed))) < 0.02
    assert streamed.score(path) == pytest.approx(in_memory.score(X), abs=0.01)


def test_store_evaluation_equals_table_evaluation(store, start_fits):
    """transform, predict and score_samples of a store give what they give for its table,
    in the table's row order."""
    path, X, _ = store
    merger = start_fits[1]
    assert merger.transform(path).equals(merger.transform(X))
    for a, b in zip(merger.predict(path, return_std=True, return_scale=True),
                    merger.predict(X, return_std=True, return_scale=True)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    np.testing.assert_allclose(merger.score_samples(path), merger.score_samples(X), rtol=1e-6)


def test_store_batches_come_in_the_sequential_order_and_stop(store, start_fits):
    """The threads that read and encode batches ahead of the steps pass them on in the
    order of drawing them one by one (so a fit depends on its seed, not on timing), and
    close() ends them."""
    from skmerge.model.fitted import FitState

    path, X, _ = store
    merger = start_fits[1]
    state = FitState.from_attributes(merger)
    counts = np.bincount(X["image_id"].to_numpy(np.int64))[state.image_ids]
    batches = streaming.StoreBatches(merger, streaming.StoreSource(path), state, counts, seed=5)
    fed = batches._batches()
    drawn = (batches.padded(images) for images in batches._image_batches())
    for _ in range(8):  # beyond the first pass over the 30 images, 6 at a time
        threaded, sequential = next(fed), next(drawn)
        for key, values in sequential.items():
            np.testing.assert_array_equal(threaded[key], values)
    batches.close()
    assert len(batches._threads) >= 2 and not any(thread.is_alive() for thread in batches._threads)


def test_bad_store_inputs(store, start_fits, tmp_path):
    path, _, _ = store
    with pytest.raises(InputError, match="no such observation store"):
        skmerge.VariationalMerger(batch_size=4).fit(tmp_path / "missing.parquet")
    (tmp_path / "folder.parquet").mkdir()
    with pytest.raises(InputError, match="not an skmerge observation store"):
        skmerge.VariationalMerger(batch_size=4).fit(tmp_path / "folder.parquet")
    with pytest.raises(InputError, match="not an observation store.*read_unmerged"):
        skmerge.VariationalMerger(batch_size=4).fit(str(tmp_path / "data.mtz"))
    with pytest.raises(ParameterError, match="set batch_size"):
        skmerge.VariationalMerger().fit(path)
    with pytest.raises(ParameterError, match="early_stopping"):
        skmerge.VariationalMerger(batch_size=4, early_stopping=True).fit(path)
    with pytest.raises(InputError, match="y cannot"):
        start_fits[1].score_samples(path, y=np.zeros(3))


def test_ambiguous_store_needs_reindexing_none(tmp_path):
    X, _ = skmerge.datasets.make_unmerged(n_images=2, spacegroup="P 43", cell=(55, 55, 80, 90, 90, 90),
                                          random_state=0)
    path = write_store(X, tmp_path / "tetragonal.parquet")
    with pytest.raises(ParameterError, match="reindexing='none'"):
        skmerge.VariationalMerger(batch_size=1).fit(path)


def test_run_merge_streams_a_store_with_batch_size(store, tmp_path):
    """skmerge mono STORE --batch-size: the merge streams from the store and writes the
    merged MTZ, every observation's prediction, OUT_stats.json and the report, with the
    outliers among every observation."""
    path, X, _ = store
    options = dict(batch_size=6, max_iter=10, mlp_layers=2, metadata=["dHKL", "XDET"], random_state=0,
                   log=lambda level, message: None)
    result = skmerge.run_merge(path, tmp_path / "out", **options)
    assert result.merger.n_iter_ == 10
    assert result.statistics[0].table.loc["overall", "n_obs"] == len(X)
    predictions = pd.read_parquet(tmp_path / "out_predictions.parquet")
    assert len(predictions) == len(X) and np.isfinite(predictions["Ipred"]).all()
    for name in ("out_0.mtz", "out.npz", "out_stats.json", "out_report.html", "out_calibration.png"):
        assert (tmp_path / name).is_file()
    # Without a test set: the outliers among every observation, no held-out calibration.
    calibrated = result.calibration[0]
    assert calibrated.n_test == 0 and calibrated.shells.loc["overall", "n_obs"] == len(X)
    assert calibrated.images["n_obs"].sum() == len(X) and len(result.images[0]) == X["image_id"].nunique()


def test_streamed_half_datasets_and_test_set_equal_the_in_memory_ones(tmp_path, monkeypatch):
    """skmerge mono STORE --batch-size --merge-half-datasets --test-fraction: the same
    image split, test set, statistics (OUT_stats.csv and OUT_stats.json) and report as
    the in-memory merge of the MTZ file the store was converted from (within MC noise),
    without reading the store's table; and the calibration of the streamed fit's
    predictions, gathered piece by piece, is the in-memory calibration of the same
    predictions."""
    from skmerge.cli import main
    from skmerge import store as store_module, table as table_module

    X, _ = skmerge.datasets.make_unmerged(n_images=12, stills=True, random_state=3)
    mtz = tmp_path / "stills.mtz"
    raw = X[["Hobs", "Kobs", "Lobs", "BATCH", "Iobs", "SIGIobs", "XDET", "YDET"]].rename(
        columns={"Hobs": "H", "Kobs": "K", "Lobs": "L", "Iobs": "I", "SIGIobs": "SIGI"}).reset_index(drop=True)
    raw.spacegroup, raw.cell = X.spacegroup, X.cell
    raw.infer_mtz_dtypes().write_mtz(str(mtz))
    # A small model: each of the six fits traces its training step anew.
    flags = ["--quiet", "--batch-size", "4", "--iterations", "40", "--mlp-layers", "2", "--no-double-wilson",
             "--likelihood", "normal", "--merge-half-datasets", "--test-fraction", "0.1", "--seed", "0"]
    assert main(["mono", *flags, "dHKL,XDET,YDET", str(mtz), str(tmp_path / "memory")]) == 0
    assert main(["convert", "--quiet", str(mtz), str(tmp_path / "stills.parquet")]) == 0

    def full_read(*args, **kwargs):
        raise AssertionError("the streamed merge read the whole observation table")

    # The package's lazy attribute first: resolved after the table module's patch, it
    # would record the patched function as the one to restore.
    monkeypatch.setattr(skmerge, "read_unmerged", full_read)
    monkeypatch.setattr(store_module, "read_store", full_read)
    monkeypatch.setattr(table_module, "read_unmerged", full_read)
    real_read_part = store_module.read_part
    monkeypatch.setattr(store_module, "read_part", lambda store, entry, row_groups=None, **kwargs: real_read_part(
        store, entry, full_read() if row_groups is None else row_groups, **kwargs))
    assert main(["mono", *flags, "dHKL,XDET,YDET", str(tmp_path / "stills.parquet"), str(tmp_path / "streamed")]) == 0

    memory, streamed = (pd.read_csv(tmp_path / f"{run}_stats.csv").set_index("shell") for run in ("memory", "streamed"))
    assert memory["n_obs"].equals(streamed["n_obs"])
    # The same observations held out, in the order of the store's table.
    held_out = rs.read_mtz(str(tmp_path / "memory_predictions_0.mtz"))["test"].to_numpy()
    assert 0 < held_out.sum() < len(X)
    assert np.array_equal(pd.read_parquet(tmp_path / "streamed_predictions.parquet")["test"].to_numpy(), held_out)
    # The same images in each half: the same observation count N of every reflection.
    halves = [rs.read_mtz(str(tmp_path / f"{run}_xval_0.mtz")).reset_index().sort_values(["half", "H", "K", "L"])
              for run in ("memory", "streamed")]
    assert np.array_equal(halves[0]["N"].to_numpy(), halves[1]["N"].to_numpy())
    for column in ("cc_half", "cc_pred"):
        assert memory.loc["overall", column] > 0.1
        np.testing.assert_allclose(streamed[column], memory[column], atol=0.02)
    documents = [json.loads((tmp_path / f"{run}_stats.json").read_text()) for run in ("memory", "streamed")]
    memory_json, streamed_json = (document["datasets"][0] for document in documents)
    assert set(streamed_json) == set(memory_json) and set(documents[1]) <= set(documents[0])
    for column in ("cc_half", "cc_pred"):
        np.testing.assert_allclose([row[column] for row in streamed_json["shells"]],
                                   [row[column] for row in memory_json["shells"]], atol=0.02)
    assert "Per-image scale, CCpred and outliers" in (tmp_path / "streamed_report.html").read_text()

    # One fitted merger: its predictions of the whole table, calibrated in memory, give
    # the streamed run's z limit, outliers (per shell, bin of Ipred and image) and histograms.
    monkeypatch.undo()
    from skmerge.calibration import Calibration, calibration_report
    from skmerge.merge_outputs import observation_predictions, resolution_shells
    from skmerge.stats import MergingStatistics
    from skmerge.workflow import held_out_rows

    merger = skmerge.VariationalMerger.load(tmp_path / "streamed.npz")
    table = read_store(tmp_path / "stills.parquet")
    predictions = observation_predictions(merger, table, held_out_rows(np.arange(len(table)), 0.1, 0))
    expected = calibration_report(predictions, resolution_shells(MergingStatistics.from_dict(streamed_json)))
    got = Calibration.from_dict(streamed_json["calibration"])
    # The same fitted merger's predictions of the same observations, in pieces or not:
    # equal up to float32 rounding, which moves no observation across the limit.
    assert got.z_limit == pytest.approx(expected.z_limit, rel=1e-5) and got.n_test == expected.n_test
    assert got.images["n_outliers"].sum() > 0
    pd.testing.assert_series_equal(got.images["n_outliers"], expected.images["n_outliers"], check_dtype=False)
    pd.testing.assert_series_equal(got.images["n_obs"], expected.images["n_obs"], check_dtype=False)
    for part in ("shells", "intensity"):
        np.testing.assert_array_equal(getattr(got, part)[["n_obs", "n_outliers"]],
                                      getattr(expected, part)[["n_obs", "n_outliers"]])
        np.testing.assert_allclose(getattr(got, part)["z_sd"], getattr(expected, part)["z_sd"], rtol=1e-4)
    for part in ("test", "fitted"):
        np.testing.assert_array_equal(got.histogram[part], expected.histogram[part])

    # skmerge stats of the streamed run recomputes CCpred and the calibration from the
    # held-out rows and the passes over OUT_predictions.parquet, as the run reported them.
    from skmerge.workflow import calibration_from_outputs, statistics_from_outputs

    (recomputed,), _ = statistics_from_outputs(tmp_path / "streamed")
    np.testing.assert_allclose(recomputed.table["cc_pred"].to_numpy(float), streamed["cc_pred"].to_numpy(float),
                               atol=1e-6)
    (recalibrated,) = calibration_from_outputs(tmp_path / "streamed", [recomputed])
    assert recalibrated.z_limit == pytest.approx(got.z_limit, rel=1e-6) and recalibrated.n_test == got.n_test
    pd.testing.assert_series_equal(recalibrated.images["n_outliers"], got.images["n_outliers"], check_dtype=False)


def test_streamed_separate_files_with_half_datasets(tmp_path):
    """A store of two files merged separately, streamed, with half datasets: each file's
    merged and half-dataset files, statistics with a finite CC1/2, and a calibration
    and per-image table of its own images."""
    path = tmp_path / "series.parquet"
    skmerge.datasets.make_unmerged(n_images=6, stills=True, time_points=2, random_state=1, store=path)
    result = skmerge.run_merge(path, tmp_path / "out", batch_size=4, max_iter=10, mlp_layers=2,
                               metadata=["dHKL", "XDET"], separate_files=True, half_datasets=1, random_state=0,
                               log=lambda level, message: None)
    names = {p.name for p in result.paths}
    assert {"out_0.mtz", "out_1.mtz", "out_xval_0.mtz", "out_xval_1.mtz", "out_stats.json",
            "out_report.html"} <= names
    document = json.loads((tmp_path / "out_stats.json").read_text())
    assert len(document["datasets"]) == 2 and document["parents"] == [None, 0]
    files = pd.read_parquet(path / "images.parquet")["file_id"].to_numpy()
    for i, (stats, calibrated, images) in enumerate(zip(result.statistics, result.calibration, result.images)):
        assert np.isfinite(stats.table.loc["overall", "cc_half"])
        assert np.array_equal(images.index, np.flatnonzero(files == i))
        assert calibrated.images["n_obs"].sum() == stats.table.loc["overall", "n_obs"]
    # skmerge stats of the run: each file's calibration from its own rows of the predictions file.
    from skmerge.workflow import calibration_from_outputs, statistics_from_outputs

    recomputed, _ = statistics_from_outputs(tmp_path / "out")
    for again, calibrated in zip(calibration_from_outputs(tmp_path / "out", recomputed), result.calibration):
        pd.testing.assert_series_equal(again.images["n_obs"], calibrated.images["n_obs"], check_dtype=False)


def test_streamed_merge_warns_of_small_sigmas_with_the_exact_median(tmp_path, monkeypatch):
    """Without an error model and with σ five times too small, a streamed merge warns of
    the scatter of σ as an in-memory merge does, with the median of z² taken exactly over
    the predictions file's row groups."""
    from skmerge.diagnostics import sigma_scatter, sigma_scatter_warning
    from skmerge.streamed_merge import _sigma_scatter

    X, _ = skmerge.datasets.make_unmerged(n_images=8, stills=True, random_state=1)
    X["SIGIobs"] = X["SIGIobs"] / 5
    path = write_store(X, tmp_path / "small_sigma.parquet", row_group_size=1500)
    # Pieces of 2,000 rows: a predictions file of several row groups, whose median is then
    # found by the passes of the radix selection rather than in one partition.
    monkeypatch.setattr(streaming.StoreSource, "chunks",
                        lambda self: streaming.iter_store_chunks(self.path, 2000, False))
    result = skmerge.run_merge(path, tmp_path / "out", batch_size=4, max_iter=10, mlp_layers=2,
                               metadata=["dHKL", "XDET"], error_model=None, random_state=0,
                               log=lambda level, message: None)
    predictions_file = tmp_path / "out_predictions.parquet"
    assert pq.ParquetFile(predictions_file).num_row_groups > 1
    factor = sigma_scatter(pd.read_parquet(predictions_file).rename(columns={"SigIobs": "SIGIobs"}))
    assert factor > 3
    assert _sigma_scatter(predictions_file) == pytest.approx(factor, rel=1e-12)
    assert sigma_scatter_warning(factor) in result.warnings


def test_streamed_grid_marginals_equal_those_of_the_table(store, monkeypatch):
    """Grid marginals from passes over the store's pieces are those the same fitted
    model gives from the table in memory."""
    from skmerge.model.fitted import FitState, evaluation_chunks
    from skmerge.model.marginals import grid_marginals

    path, X, _ = store
    monkeypatch.setattr(streaming.StoreSource, "chunks",
                        lambda self: streaming.iter_store_chunks(self.path, 5000, False))
    streamed = _fit(path, max_iter=30, marginals="grid")
    state, model = FitState.from_attributes(streamed), streamed._get_model()
    data, _ = state.evaluation_data(streamed, X)
    from_table = grid_marginals(model, lambda: evaluation_chunks(model, data), len(state.reflections))
    np.testing.assert_allclose(streamed.marginal_moments_, from_table.values, rtol=1e-4, atol=1e-6)
    merged = streamed.transform(path)
    assert np.isfinite(merged["SIGF"]).all()


def test_a_streamed_rotation_series_is_in_its_least_decayed_images_frame(tmp_path):
    """A store's fit reads its images' B piece by piece (:mod:`skmerge.model.decay`), as
    an in-memory fit reads them from its table."""
    from skmerge.model.decay import rotation_reference_b
    from skmerge.model.fitted import FitState

    X, _ = skmerge.datasets.make_unmerged(n_images=20, random_state=1)
    path = write_store(X, tmp_path / "rotation.parquet", row_group_size=3000)
    pieces = [X.iloc[start:start + 3000] for start in range(0, len(X), 3000)]
    for merger in (_fit(X, max_iter=60), _fit(path, max_iter=60)):
        assert merger.reference_b_ < 0  # the first images are the least decayed (B rises by 8 Å²)
        state, model = FitState.from_attributes(merger), merger._get_model()
        # In its own frame the fit's least-decayed images fall off by no more: the same B.
        whole = rotation_reference_b(merger, model, state, lambda: iter([X]))
        assert whole == pytest.approx(merger.reference_b_, abs=1e-3)
        assert rotation_reference_b(merger, model, state, lambda: iter(pieces)) == pytest.approx(whole, abs=1e-9)
    # A warm start on the store (as each of its half-dataset merges) keeps the full fit's frame.
    warm = copy.deepcopy(merger).set_params(warm_start="scales", freeze="scales", max_iter=2, early_stopping=False)
    assert warm.fit(path).reference_b_ == merger.reference_b_
