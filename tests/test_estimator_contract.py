"""The scikit-learn contract of VariationalMerger.

scikit-learn's common checks feed estimators numeric 2-D arrays; VariationalMerger takes
an observation table (a DataFrame with named columns and a space group and cell), so
``check_estimator`` skips it (``input_tags.two_d_array = False``). The checks that do not
need array input run here as they are; those that fit on generated arrays are restated
below on observation tables, each named after the check it stands for.
"""

import pickle
import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone
from sklearn.compose import ColumnTransformer
from sklearn.exceptions import ConvergenceWarning, NotFittedError
from sklearn.preprocessing import StandardScaler
from sklearn.utils import estimator_checks as checks
from sklearn.utils.validation import check_is_fitted

from skmerge import InputError, NumericalError, VariationalMerger
from skmerge.datasets import make_unmerged

FAST = dict(mlp_layers=2, mlp_width=4, max_iter=60, random_state=0)

# Checks that run on the estimator unchanged.
API_CHECKS = [
    checks.check_estimator_cloneable,
    checks.check_estimator_tags_renamed,
    checks.check_valid_tag_types,
    checks.check_estimator_repr,
    checks.check_no_attributes_set_in_init,
    checks.check_parameters_default_constructible,
    checks.check_get_params_invariance,
    checks.check_set_params,
    checks.check_do_not_raise_errors_in_init_or_set_params,
    checks.check_mixin_order,
]
# Checks that need numeric array input, and why they cannot apply; the tests after them
# restate what they check on observation tables.
NOT_APPLICABLE = {
    "check_fit_score_takes_y": "fits on a numeric array; fit/score take y here (test_fit_and_score_take_y)",
    "check_estimators_overwrite_params": "fits on a numeric array (test_fit_leaves_parameters_untouched)",
    "check_dont_overwrite_parameters": "fits on a numeric array (test_fit_leaves_parameters_untouched)",
    "check_estimators_fit_returns_self": "fits on a numeric array (test_fit_leaves_parameters_untouched)",
    "check_readonly_memmap_input": "X is a DataFrame of observations, not a memory-mapped array",
    "check_estimators_unfitted": "calls predict on a numeric array (test_unfitted_merger_raises)",
    "check_n_features_in_after_fitting": "fits on a numeric array (test_feature_names_are_checked)",
    "check_positive_only_tag_during_fit": "fits on a numeric array; intensities may be negative",
    "check_fit_check_is_fitted": "fits on a numeric array (test_unfitted_merger_raises)",
    "check_dict_unchanged": "fits on a numeric array (test_evaluation_leaves_the_merger_unchanged)",
    "check_methods_subset_invariance": "fits on a numeric array (test_predictions_of_a_subset_are_a_subset)",
    "check_methods_sample_order_invariance": "fits on a numeric array (test_predictions_of_a_subset_are_a_subset)",
    "check_fit_idempotent": "fits on a numeric array (test_merger.py: identical fits with one random_state)",
    "check_transformer_general": "transform returns merged reflections, not one row per input row",
}


@pytest.fixture(scope="module")
def table():
    X, _ = make_unmerged(n_images=16, random_state=3)
    return X


@pytest.fixture(scope="module")
def fitted(table):
    return VariationalMerger(metadata=["dHKL", "XDET"], **FAST).fit(table)


@pytest.mark.parametrize("check", API_CHECKS, ids=lambda c: c.__name__)
def test_api_checks(check):
    check(type(VariationalMerger()).__name__, VariationalMerger())


def test_check_estimator_skips_only_what_cannot_apply():
    # The common checks skip an estimator without 2-D array input; NOT_APPLICABLE names
    # every check of the API set that is not run above, so a new one shows up here.
    api = {c.__name__ if hasattr(c, "__name__") else c.func.__name__
           for c in checks._yield_api_checks(VariationalMerger())}
    covered = {c.__name__ for c in API_CHECKS} | set(NOT_APPLICABLE)
    assert api <= covered, api - covered


def test_fit_leaves_parameters_untouched(table):
    merger = VariationalMerger(metadata=["dHKL", "XDET"], **FAST)
    before = pickle.dumps(merger.get_params(deep=True))
    assert merger.fit(table) is merger
    assert pickle.dumps(merger.get_params(deep=True)) == before
    public = [k for k in vars(merger) if not k.startswith("_")]
    assert all(k in merger.get_params() or k.endswith("_") for k in public)


def test_fit_and_score_take_y(table, fitted):
    y = table["Iobs"].to_numpy()
    assert np.array_equal(clone(fitted).fit(table, y).transform(table)["F"], fitted.transform(table)["F"])
    assert fitted.score(table, y) == fitted.score(table)


def test_unfitted_merger_raises(table):
    for method in ("transform", "predict", "score", "posterior"):
        with pytest.raises(NotFittedError):
            getattr(VariationalMerger(), method)(*(() if method == "posterior" else (table,)))
    check_is_fitted(VariationalMerger(**FAST).fit(table))


def test_evaluation_leaves_the_merger_unchanged(table, fitted):
    before = pickle.dumps(fitted)
    fitted.transform(table), fitted.predict(table), fitted.score(table)
    assert pickle.dumps(fitted) == before


def test_predictions_of_a_subset_are_a_subset(table, fitted):
    everything = fitted.predict(table)
    rows = np.random.RandomState(0).permutation(len(table))[: len(table) // 3]
    np.testing.assert_allclose(fitted.predict(table.iloc[rows]), everything[rows], rtol=1e-6)


def test_feature_names_are_checked(table, fitted):
    assert fitted.n_features_in_ == table.shape[1]
    assert list(fitted.feature_names_in_) == list(table.columns)
    with pytest.raises(InputError, match="XDET"):
        fitted.predict(table.drop(columns=["XDET"]))
    other = table.copy()
    other.spacegroup = "P 1"
    with pytest.raises(InputError, match="space group"):
        fitted.transform(other)


def test_set_output_pandas_with_separate_files(table):
    X = table.copy()
    X["file_id"] = (X["image_id"].to_numpy() % 2).astype("int32")
    merger = VariationalMerger(separate_files=True, **FAST).set_output(transform="pandas")
    merged = merger.fit(X).transform(X)
    assert isinstance(merged, pd.DataFrame)
    assert list(merged.columns) == list(merger.get_feature_names_out())
    assert merger.get_feature_names_out()[-1] == "file_id"
    assert set(merged["file_id"]) == {0, 1}


def test_failed_warm_fit_leaves_the_fitted_state_intact(table, fitted, monkeypatch):
    merger = pickle.loads(pickle.dumps(fitted)).set_params(warm_start=True)
    before = pickle.dumps(merger)
    bad = table["Iobs"].to_numpy().copy()
    bad[5] = np.nan
    with pytest.raises(InputError):
        merger.fit(table, bad)
    assert pickle.dumps(merger) == before

    # A failure in the middle of training, after the new model was built.
    from skmerge.model import training

    def diverge(self, *args, **kwargs):
        raise NumericalError("injected")

    monkeypatch.setattr(training.Trainer, "run", diverge)
    with pytest.raises(NumericalError):
        merger.fit(table.iloc[: len(table) // 2])
    assert pickle.dumps(merger) == before


def test_user_transformer_is_cloned(table):
    transformer = ColumnTransformer([("xy", StandardScaler(), ["XDET", "YDET"])])
    merger = VariationalMerger(metadata=transformer, **FAST).fit(table)
    with pytest.raises(NotFittedError):
        check_is_fitted(transformer)
    check_is_fitted(merger.metadata_transformer_)
    assert merger.n_metadata_features_ == 2


def test_convergence_warning_only_when_max_iter_stops_the_fit(table):
    with pytest.warns(ConvergenceWarning, match="max_iter=60"):
        merger = VariationalMerger(**FAST).fit(table)
    assert not merger.converged_
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        merger = VariationalMerger(**{**FAST, "max_iter": 200}, tol=10.0, n_iter_no_change=50).fit(table)
    assert merger.converged_ and merger.n_iter_ < 200


def test_early_stopping_keeps_the_validation_curve(table):
    merger = VariationalMerger(early_stopping=True, n_iter_no_change=50, **{**FAST, "max_iter": 300}).fit(table)
    scores = merger.validation_scores_
    assert scores.ndim == 1 and len(scores) >= 2 and np.isfinite(scores).all()
    assert merger.best_validation_score_ == scores.max()
    assert not hasattr(VariationalMerger(**FAST).fit(table), "validation_scores_")


def test_predict_returns_std_and_scale(table, fitted):
    mean = fitted.predict(table)
    again, std = fitted.predict(table, return_std=True)
    _, _, scale, scale_std = fitted.predict(table, return_std=True, return_scale=True)
    np.testing.assert_array_equal(mean, again)
    assert mean.shape == std.shape == scale.shape == scale_std.shape == (len(table),)
    assert (std > 0).all() and (scale > 0).all() and (scale_std >= 0).all()


def test_posterior_is_a_tfp_distribution_over_the_reflections(table, fitted):
    from skmerge._tf import tfd

    posterior = fitted.posterior()
    assert isinstance(posterior, tfd.Distribution)
    assert tuple(posterior.batch_shape) == (len(fitted.reflections_),)
    # transform reports the posterior mean of F, in the input's units, as the least-decayed
    # images record it.
    fall_off = np.exp(-fitted.reference_b_ / (4 * fitted.reflections_.dhkl.astype(float) ** 2))
    mean = posterior.mean().numpy() * np.sqrt(fitted.intensity_scale_) * fall_off
    np.testing.assert_allclose(np.sort(fitted.transform(table)["F"].to_numpy()), np.sort(mean), rtol=1e-5)


def test_model_pieces_are_grid_values(table):
    from sklearn.model_selection import GridSearchCV

    from skmerge import ErrorModel, ImageKFold, StudentTLikelihood

    grid = {"likelihood": ["normal", StudentTLikelihood(dof=4.0)], "error_model": [None, ErrorModel(sdadd=0.05)]}
    search = GridSearchCV(VariationalMerger(**FAST), grid, cv=ImageKFold(2)).fit(table)
    assert len(search.cv_results_["params"]) == 4 and np.isfinite(search.cv_results_["mean_test_score"]).all()
    with_error_model = [p for p in search.cv_results_["params"] if p["error_model"] is not None]
    assert all(p["error_model"].get_params() == {"sdfac": 1.0, "sdadd": 0.05} for p in with_error_model)
    best = search.best_estimator_
    assert hasattr(best, "sdfac_") == (best.error_model is not None)
    with pytest.raises(InputError, match="'dof' parameter of StudentTLikelihood"):
        VariationalMerger(likelihood=StudentTLikelihood(dof=-1.0)).fit(table)
