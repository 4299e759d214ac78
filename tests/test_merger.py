"""VariationalMerger's scikit-learn surface on small simulated data."""

import copy
import pickle
import subprocess
import sys

import joblib
import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone
from sklearn.compose import ColumnTransformer
from sklearn.exceptions import NotFittedError
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler
from sklearn.utils._param_validation import InvalidParameterError

import skmerge
from skmerge import InputError, StudentTLikelihood, VariationalMerger
from skmerge.datasets import make_unmerged
from skmerge.errors import ParameterError
from skmerge.model.sandwich import applied_ratio

FAST = dict(mlp_layers=2, mlp_width=8, max_iter=150, random_state=0)


@pytest.fixture(scope="module")
def small():
    return make_unmerged(n_images=24, random_state=3)


@pytest.fixture(scope="module")
def fitted(small):
    X, _ = small
    return VariationalMerger(metadata=["dHKL", "XDET", "YDET"], **FAST).fit(X)


@pytest.fixture(scope="module")
def fitted_anomalous():
    X, truth = make_unmerged(n_images=24, anomalous=True, anomalous_signal=0.1, random_state=4)
    return X, truth, VariationalMerger(anomalous=True, **FAST).fit(X)


def test_transform_returns_merged_table_with_mtz_types(small, fitted):
    X, _ = small
    merged = fitted.transform(X)
    assert list(merged.columns) == ["F", "SIGF", "I", "SIGI", "N"]
    assert merged.index.names == ["H", "K", "L"]
    assert [str(t) for t in merged.dtypes] == ["SFAmplitude", "Stddev", "Intensity", "Stddev", "MTZInt"]
    assert merged.spacegroup.xhm() == X.spacegroup.xhm() and merged.cell == X.cell
    assert len(merged) == X["asu_index"].nunique()
    assert merged["N"].sum() == len(X)
    values = merged[["F", "SIGF", "I", "SIGI"]].to_numpy(float)
    assert np.isfinite(values).all() and (values > 0).all()


def test_intensity_is_second_moment_of_amplitude(small, fitted):
    # Of the posterior: SIGF is the posterior's SD widened by the sandwich, I is not.
    merged = fitted.transform(small[0])
    posterior_var = merged["SIGF"] ** 2 / applied_ratio(fitted.sandwich_ratio_)
    np.testing.assert_allclose(merged["I"], merged["F"] ** 2 + posterior_var, rtol=1e-4)


def test_outputs_are_in_the_units_of_the_input(small, fitted):
    X, _ = small
    merged = fitted.transform(X)
    ratio = np.median(fitted.predict(X) / np.maximum(X["Iobs"].to_numpy(float), 1e-3))
    assert 0.5 < ratio < 2.0
    assert 0.2 < merged["I"].mean() / X["Iobs"].mean() < 5.0


def test_anomalous_columns(fitted_anomalous):
    X, truth, merger = fitted_anomalous
    merged = merger.transform(X)
    assert list(merged.columns) == list(merger.get_feature_names_out())
    assert str(merged["DANO"].dtype) == "AnomalousDifference"
    assert str(merged["F(+)"].dtype) == "FriedelSFAmplitude"
    both = merged.dropna(subset=["F(+)", "F(-)"])
    np.testing.assert_allclose(both["DANO"].dropna(), (both["F(+)"] - both["F(-)"]).loc[both["DANO"].notna()], rtol=1e-5, atol=1e-5)
    centric = merged.label_centrics()["CENTRIC"].to_numpy()
    assert merged["DANO"][centric].isna().all()
    assert (merged["N"] == np.where(centric, merged["N(+)"], merged["N(+)"] + merged["N(-)"])).all()


def test_predict_follows_row_order(small, fitted):
    X, _ = small
    order = np.random.RandomState(0).permutation(len(X))
    np.testing.assert_allclose(fitted.predict(X.iloc[order]), fitted.predict(X)[order], rtol=1e-5)


def test_score_is_mean_of_score_samples_and_finite(small, fitted):
    X, _ = small
    samples = fitted.score_samples(X)
    assert samples.shape == (len(X),) and np.isfinite(samples).all()
    assert fitted.score(X) == pytest.approx(samples.mean())


def test_score_prefers_true_intensities_to_shuffled_ones(small, fitted):
    X, _ = small
    shuffled = np.random.RandomState(1).permutation(X["Iobs"].to_numpy())
    assert fitted.score(X) > fitted.score(X, y=shuffled) + 1.0


def test_held_out_images_and_unseen_reflections(small):
    X, _ = small
    images = X["image_id"].to_numpy()
    train = images < 18
    merger = VariationalMerger(**FAST).fit(X[train])
    X_test = X[~train]
    assert np.isfinite(merger.score(X_test))
    assert np.isfinite(merger.predict(X_test)).all()
    merged = merger.transform(X_test)
    unseen = ~merged.index.isin(merger.transform(X[train]).index)
    assert unseen.any()
    assert (merged["N"][unseen] == 0).all() and np.isfinite(merged["F"][unseen]).all()


def test_y_overrides_intensities(small, fitted):
    X, _ = small
    same = clone(fitted).fit(X, y=X["Iobs"].to_numpy())
    np.testing.assert_array_equal(same.transform(X)["F"], fitted.transform(X)["F"])
    shuffled = np.random.RandomState(0).permutation(X["Iobs"].to_numpy())
    other = clone(fitted).fit(X, y=shuffled)
    assert np.corrcoef(other.transform(X)["F"], fitted.transform(X)["F"])[0, 1] < 0.5


def test_same_random_state_gives_identical_fits(small):
    X, _ = small
    a = VariationalMerger(**FAST).fit(X)
    b = VariationalMerger(**FAST).fit(X)
    np.testing.assert_array_equal(a.loss_curve_, b.loss_curve_)
    np.testing.assert_array_equal(a.transform(X)["F"], b.transform(X)["F"])
    c = VariationalMerger(**{**FAST, "random_state": 1}).fit(X)
    assert not np.array_equal(a.loss_curve_, c.loss_curve_)


def test_not_fitted_errors(small):
    X, _ = small
    merger = VariationalMerger()
    for method in (merger.transform, merger.predict, merger.score):
        with pytest.raises(NotFittedError):
            method(X)


def test_clone_and_params_round_trip():
    prior = skmerge.ReferencePrior(reference=pd.DataFrame(), kind="laplace")
    merger = VariationalMerger(prior=prior, likelihood=StudentTLikelihood(dof=4.0), metadata=["dHKL", "XDET"])
    params = merger.get_params()
    assert params["likelihood__dof"] == 4.0 and params["prior__kind"] == "laplace"
    copy = clone(merger)
    assert copy.get_params()["metadata"] == ["dHKL", "XDET"]
    assert copy.prior is not prior and copy.prior.kind == "laplace"
    copy.set_params(prior__kind="normal", mlp_layers=3)
    assert copy.prior.kind == "normal" and copy.mlp_layers == 3 and prior.kind == "laplace"


@pytest.mark.parametrize(
    "params",
    [{"likelihood": "cauchy"}, {"error_model": "yes"}, {"mlp_layers": 0}, {"learning_rate": -1.0}, {"prior": "flat"}],
)
def test_invalid_parameters_raise_parameter_error(small, params):
    with pytest.raises(InputError) as info:
        VariationalMerger(**params).fit(small[0])
    assert isinstance(info.value, InvalidParameterError)
    assert next(iter(params)) in str(info.value)


def test_bad_tables_raise_input_error(small):
    X, _ = small
    merger = VariationalMerger(**FAST)
    with pytest.raises(InputError, match="Iobs"):
        merger.fit(X.drop(columns=["Iobs"]))
    with pytest.raises(InputError, match="image_id"):
        merger.fit(X.drop(columns=["image_id"]))
    bad = X.copy()
    bad.loc[3, "SIGIobs"] = -1.0
    with pytest.raises(InputError, match="σ"):
        merger.fit(bad)
    with pytest.raises(InputError, match="'DETX'.*available"):
        VariationalMerger(metadata=["dHKL", "DETX"], **FAST).fit(X)
    with pytest.raises(InputError, match="observation table"):
        merger.fit(X.to_numpy())


def test_in_a_pipeline(small):
    X, _ = small
    pipe = Pipeline([("keep_strong", FunctionTransformer(lambda t: t[t["Iobs"] > -1e9])), ("merge", VariationalMerger(**FAST))])
    merged = pipe.fit(X).transform(X)
    assert list(merged.columns) == ["F", "SIGF", "I", "SIGI", "N"]
    assert np.isfinite(pipe.score(X))


def test_set_output_and_feature_names(small, fitted):
    X, _ = small
    assert list(fitted.get_feature_names_out()) == ["F", "SIGF", "I", "SIGI", "N"]
    assert fitted.n_features_in_ == X.shape[1]
    assert list(fitted.feature_names_in_) == list(X.columns)
    merger = clone(fitted).set_output(transform="pandas").fit(X)
    assert list(merger.transform(X).columns) == ["F", "SIGF", "I", "SIGI", "N"]


def test_metadata_as_column_transformer(small):
    X, _ = small
    transformer = ColumnTransformer([("xy", StandardScaler(), ["XDET", "YDET"])])
    merger = VariationalMerger(metadata=transformer, **FAST).fit(X)
    assert merger.metadata_transformer_ is not transformer
    assert merger.n_metadata_features_ == 2
    assert not hasattr(transformer, "transformers_")


def test_image_id_in_metadata_means_per_image_offsets(small):
    X, _ = small
    merger = VariationalMerger(metadata=["dHKL", "image_id"], image_scales=False, **FAST).fit(X)
    assert len(merger.scale_weights_[-1]) == X["image_id"].nunique()
    assert merger.n_metadata_features_ == 1
    without = VariationalMerger(metadata=["dHKL"], image_scales=False, **FAST).fit(X)
    assert len(without.scale_weights_[-1]) == 0


def test_warm_start_continues_from_previous_loss(small):
    X, _ = small
    merger = VariationalMerger(warm_start=True, **{**FAST, "max_iter": 300}).fit(X)
    first_fit = merger.loss_curve_
    merger.fit(X)
    previous_final = first_fit[-50:, 0].mean()
    assert abs(merger.loss_curve_[:10, 0].mean() - previous_final) < 0.25 * abs(first_fit[:10, 0].mean() - previous_final)


def test_freeze_scales_keeps_the_scale_model(small, fitted):
    X, _ = small
    import copy

    merger = copy.deepcopy(fitted).set_params(warm_start="scales", freeze="scales")
    merger.fit(X)
    for before, after in zip(fitted.scale_weights_, merger.scale_weights_):
        np.testing.assert_array_equal(before, after)
    with pytest.raises(InputError, match="freeze"):
        VariationalMerger(freeze="scales").fit(X)


def test_early_stopping_chooses_the_steps_on_held_out_images_then_merges_every_image(small, monkeypatch):
    from skmerge.model import training

    X, _ = small
    kept, lengths = [], []
    run = training.Trainer.run

    def spy(self, max_iter, **kwargs):
        history, converged = run(self, max_iter, **kwargs)
        kept.append(self.kept_step)
        lengths.append(len(history))
        return history, converged

    monkeypatch.setattr(training.Trainer, "run", spy)
    merger = VariationalMerger(early_stopping=True, validation_fraction=0.25, tol=0.0, n_iter_no_change=100,
                               **{**FAST, "max_iter": 600}).fit(X)
    # First fit on 18 of 24 images, watching the other 6; then all 24 images for the
    # number of steps of the best held-out loss.
    assert len(kept) == 2 and 0 < kept[0] <= lengths[0]
    assert lengths[1] == kept[0] == merger.n_iter_ == len(merger.loss_curve_)
    assert len(merger.image_ids_) == X["image_id"].nunique()
    assert merger.transform(X)["N"].sum() == len(X)
    assert np.isfinite(merger.score(X))


def test_verbose_shows_a_progress_bar(small, capsys):
    VariationalMerger(verbose=1, **{**FAST, "max_iter": 60}).fit(small[0])
    assert "step" in capsys.readouterr().err


def test_large_intensities_train_like_small_ones(small):
    X, _ = small
    big = X.copy()
    big["Iobs"] = big["Iobs"] * 1e3
    big["SIGIobs"] = big["SIGIobs"] * 1e3
    assert big["Iobs"].mean() > 2e4
    a = VariationalMerger(**FAST).fit(X).transform(X)
    b = VariationalMerger(**FAST).fit(big).transform(big)
    assert np.isfinite(b.to_numpy(float)).all()
    assert np.corrcoef(a["F"], b["F"])[0, 1] > 0.999


def test_pickle_keeps_outputs_and_refuses_other_versions(small, fitted, tmp_path):
    X, _ = small
    path = tmp_path / "merger.joblib"
    joblib.dump(fitted, path)
    loaded = joblib.load(path)
    np.testing.assert_array_equal(loaded.predict(X), fitted.predict(X))
    state = fitted.__getstate__()
    state["skmerge_version_"] = "0.0.1"
    with pytest.raises(skmerge.IncompatibleVersionError, match="0.0.1"):
        VariationalMerger().__setstate__(state)


def test_joblib_round_trip_in_a_fresh_process(small, fitted, tmp_path):
    X, _ = small
    joblib.dump(fitted, tmp_path / "merger.joblib")
    joblib.dump(X, tmp_path / "X.joblib")
    script = (
        "import joblib, numpy as np\n"
        f"m = joblib.load(r'{tmp_path / 'merger.joblib'}'); X = joblib.load(r'{tmp_path / 'X.joblib'}')\n"
        f"np.save(r'{tmp_path / 'pred.npy'}', m.predict(X))\n"
        f"np.save(r'{tmp_path / 'F.npy'}', m.transform(X)['F'].to_numpy(float))\n"
        f"np.save(r'{tmp_path / 'score.npy'}', m.score(X))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "pred.npy"), fitted.predict(X))
    np.testing.assert_array_equal(np.load(tmp_path / "F.npy"), fitted.transform(X)["F"].to_numpy(float))
    assert float(np.load(tmp_path / "score.npy")) == fitted.score(X)


def test_separate_files_share_scales_but_not_amplitudes(small):
    X, _ = small
    X = X.copy()
    X["file_id"] = (X["image_id"].to_numpy() % 2).astype("int32")
    merger = VariationalMerger(separate_files=True, **FAST).fit(X)
    merged = merger.transform(X)
    assert list(merged.columns)[-1] == "file_id"
    for file_id in (0, 1):
        part = merged[merged["file_id"] == file_id]
        assert part["N"].sum() == (X["file_id"] == file_id).sum()
        assert not part.index.duplicated().any()
    first = merged[merged["file_id"] == 0]["F"]
    second = merged[merged["file_id"] == 1]["F"]
    both = first.index.intersection(second.index)
    assert len(both) > 100
    assert np.corrcoef(first.loc[both], second.loc[both])[0, 1] > 0.9
    assert len(merger.scale_weights_[-1]) == X["image_id"].nunique()


def test_image_minibatches_estimate_the_full_loss_without_bias(small, fitted):
    from skmerge._tf import tf
    from skmerge.model.training import ImageBatches

    X, _ = small
    from skmerge.model.fitted import FitState

    model = fitted._get_model()
    data, _ = FitState.from_attributes(fitted).evaluation_data(fitted, X)
    # Frozen scales make the loss deterministic given the amplitude samples.
    data["mu"], data["spread"] = model.scale_network(data["features"], data["image"])
    data["spread"] = tf.zeros_like(data["spread"])
    seed = tf.constant([5, 6])
    full = model.loss_terms(data, seed).numpy()
    counts = np.bincount(data["refl"].numpy())
    batches = ImageBatches(data, data["image"].numpy(), counts[data["refl"].numpy()], batch_size=4)
    draws = np.array([model.loss_terms(batches.draw(tf.constant([i, 1])), seed).numpy() for i in range(300)])
    spread = draws.std(axis=0) / np.sqrt(len(draws))
    assert np.all(np.abs(draws.mean(axis=0) - full) < 4 * spread + 1e-6)
    assert draws[:, 0].std() > 0


def test_minibatch_fit_matches_full_batch(small, fitted):
    X, _ = small
    minibatch = VariationalMerger(metadata=["dHKL", "XDET", "YDET"], batch_size=6, **{**FAST, "max_iter": 400}).fit(X)
    assert np.corrcoef(minibatch.transform(X)["F"], fitted.transform(X)["F"])[0, 1] > 0.99


def test_error_model_is_kept_through_pickling_and_checked_on_warm_start(small, fitted):
    X, _ = small
    merger = VariationalMerger(metadata=["dHKL", "XDET", "YDET"], error_model=True, **FAST).fit(X)
    assert merger.sdfac_ > 0 and merger.sdadd_ > 0
    loaded = pickle.loads(pickle.dumps(merger))
    assert (loaded.sdfac_, loaded.sdadd_) == (merger.sdfac_, merger.sdadd_)
    assert loaded.score(X) == merger.score(X)
    # A later fit without the error model drops its fitted values.
    without = clone(merger).set_params(error_model=False).fit(X)
    assert not hasattr(without, "sdfac_")
    # The error model changes the likelihood that score uses.
    assert merger.score(X) != without.score(X)
    with pytest.raises(ParameterError, match="error_model cannot warm-start"):
        copy.deepcopy(without).set_params(warm_start=True, error_model=True).fit(X)
