"""Model selection: image-grouped splitting, scorers, searches over model pieces, warm
starts, and parallel / distributed searches.

Fits are small (simulated data, tiny networks). Image-grouped cross-validation of a
merger is meaningful because the reflections of held-out images are mostly measured on
training images too (multiplicity); the data sets below are chosen for that. The scale
model uses the rotation angle and detector position instead of per-image offsets, so
that it can predict the scale of an image it never saw.
"""

import os

import joblib
import numpy as np
import pandas as pd
import pytest
from sklearn.model_selection import (
    GridSearchCV,
    GroupKFold,
    GroupShuffleSplit,
    RandomizedSearchCV,
    cross_val_score,
    cross_validate,
)
from sklearn.metrics import check_scoring
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer

import skmerge
from skmerge import InputError, ReferencePrior, StudentTLikelihood, VariationalMerger, WilsonPrior
from skmerge._tf import _thread_limit, thread_settings
from skmerge.datasets import make_unmerged
from skmerge.metrics import CCHalfScorer, ccpred, get_scorer, heldout_loglik, weighted_pearson
from skmerge.model_selection import ImageKFold, ImageShuffleSplit, image_groups

METADATA = ["dHKL", "ROT", "XDET", "YDET"]
# Without XLA: for fits this small, compiling the training loop costs more than it saves.
FAST = dict(
    metadata=METADATA, image_scales=False, mlp_layers=2, mlp_width=8, max_iter=200, jit_compile=False, random_state=0
)
HEXAGONAL = dict(spacegroup="P 61 2 2", cell=(50.0, 50.0, 60.0, 90.0, 90.0, 120.0), dmin=2.5)
SCORING = {"loglik": heldout_loglik, "ccpred": ccpred}


@pytest.fixture(scope="module")
def small():
    return make_unmerged(n_images=30, random_state=5, **HEXAGONAL)


def _images(X, rows):
    return set(np.unique(X["image_id"].to_numpy()[rows]).tolist())


def _reference(truth, noise, rng):
    """A merged reference data set (F, SIGF) from true amplitudes with relative noise."""
    ref = truth.merged[["F"]].copy()
    ref["F"] = (ref["F"] * (1 + noise * rng.standard_normal(len(ref)))).abs()
    ref["SIGF"] = noise * ref["F"] + 1e-3
    return ref.astype({"F": "SFAmplitude", "SIGF": "Stddev"})


# ------------------------------------------------------------------ splitting
@pytest.mark.parametrize(
    "cv, groups",
    [
        (ImageKFold(3), False),
        (ImageKFold(5, shuffle=True, random_state=0), False),
        (ImageShuffleSplit(4, test_size=0.25, random_state=0), False),
        (GroupKFold(3), True),
        (GroupShuffleSplit(3, test_size=0.3, random_state=0), True),
    ],
    ids=["ImageKFold", "ImageKFold-shuffled", "ImageShuffleSplit", "GroupKFold", "GroupShuffleSplit"],
)
def test_no_image_is_in_both_train_and_test(small, cv, groups):
    X, _ = small
    n_images = X["image_id"].nunique()
    tested = []
    splits = list(cv.split(X, groups=X["image_id"] if groups else None))
    assert len(splits) == cv.get_n_splits(X)
    for train, test in splits:
        assert len(test) and len(train)
        assert not _images(X, train) & _images(X, test)
        assert len(np.intersect1d(train, test)) == 0
        assert _images(X, train) | _images(X, test) == set(range(n_images))
        assert len(train) + len(test) == len(X)
        tested.append(_images(X, test))
    if isinstance(cv, (ImageKFold, GroupKFold)):  # every image held out exactly once
        assert sorted(i for fold in tested for i in fold) == list(range(n_images))


def test_image_kfold_interleaves_images_and_ignores_groups(small):
    X, _ = small
    folds = [_images(X, test) for _, test in ImageKFold(3).split(X, groups=np.zeros(len(X)))]
    assert folds[0] == set(range(0, 30, 3)) and folds[2] == set(range(2, 30, 3))
    shuffled = [_images(X, test) for _, test in ImageKFold(3, shuffle=True, random_state=1).split(X)]
    assert shuffled != folds and all(len(f) == 10 for f in shuffled)
    again = [_images(X, test) for _, test in ImageKFold(3, shuffle=True, random_state=1).split(X)]
    assert again == shuffled


def test_splitters_read_other_grouping_columns_and_explain_errors(small):
    X, _ = small
    two_files = X.copy()
    two_files["file_id"] = (two_files["image_id"].to_numpy() >= 15).astype(np.int32)
    folds = [_images(two_files, test) for _, test in ImageKFold(2, image_key="file_id").split(two_files)]
    assert folds == [set(range(15)), set(range(15, 30))]
    with pytest.raises(InputError, match="image_id"):
        next(ImageKFold(3).split(X.drop(columns=["image_id"])))
    with pytest.raises(InputError, match="groups="):
        next(ImageKFold(3).split(X.to_numpy()))
    with pytest.raises(ValueError, match="30 images"):
        next(ImageKFold(31).split(X))
    with pytest.raises(ValueError, match="n_splits"):
        next(ImageKFold(1).split(X))
    assert repr(ImageKFold(4)) == "ImageKFold(image_key='image_id', n_splits=4, random_state=None, shuffle=False)"
    assert (image_groups(X) == X["image_id"].to_numpy()).all()


def test_lazy_public_names():
    assert skmerge.ImageKFold is ImageKFold
    assert skmerge.model_selection.ImageShuffleSplit is ImageShuffleSplit
    assert skmerge.metrics.ccpred is ccpred
    assert get_scorer("loglik") is heldout_loglik and isinstance(get_scorer("cchalf"), CCHalfScorer)
    with pytest.raises(ValueError, match="ccpred"):
        get_scorer("r2")


# -------------------------------------------------------------------- scoring
def test_weighted_pearson():
    rng = np.random.RandomState(0)
    a, b = rng.normal(size=50), rng.normal(size=50)
    assert weighted_pearson(a, b) == pytest.approx(np.corrcoef(a, b)[0, 1])
    # Integer weights count an observation that many times.
    w = rng.randint(0, 4, size=50)
    assert weighted_pearson(a, b, w) == pytest.approx(np.corrcoef(np.repeat(a, w), np.repeat(b, w))[0, 1])
    assert np.isnan(weighted_pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
    with pytest.raises(InputError):
        weighted_pearson(a, b, -w)


def test_cross_validation_scores_are_the_documented_quantities(small):
    X, _ = small
    merger = VariationalMerger(**FAST)
    result = cross_validate(merger, X, cv=ImageKFold(3), scoring=SCORING, return_estimator=True, return_indices=True)
    assert np.isfinite(result["test_loglik"]).all() and (result["test_ccpred"] > 0.5).all()
    for k, fold in enumerate(result["estimator"]):
        X_test = X.iloc[result["indices"]["test"][k]]
        assert result["test_loglik"][k] == pytest.approx(fold.score(X_test))
        expected = weighted_pearson(X_test["Iobs"], fold.predict(X_test), X_test["SIGIobs"].to_numpy(float) ** -2)
        assert result["test_ccpred"][k] == pytest.approx(expected)
        # Without scoring=, scikit-learn uses the merger's score: the same number.
        assert check_scoring(merger)(fold, X_test) == pytest.approx(result["test_loglik"][k])


def _drop_negative(X):
    return X[X["Iobs"].to_numpy() > 0]


def test_scorers_work_on_pipelines(small):
    X, _ = small
    pipe = Pipeline([("drop_negative", FunctionTransformer(_drop_negative)), ("merge", VariationalMerger(**FAST))])
    pipe.fit(X)
    merger, Xt = pipe[-1], _drop_negative(X)
    assert len(Xt) < len(X)
    assert heldout_loglik(pipe, X) == pytest.approx(merger.score(Xt)) == pytest.approx(pipe.score(X))
    assert ccpred(pipe, X) == pytest.approx(ccpred(merger, Xt))
    unweighted = skmerge.metrics.CCPredScorer(weights=None)(pipe, X)
    assert unweighted == pytest.approx(np.corrcoef(Xt["Iobs"], merger.predict(Xt))[0, 1])
    cc = CCHalfScorer()(pipe, X)
    assert 0.5 < cc <= 1.0


# ------------------------------------------------------------- model choices
@pytest.mark.parametrize("outliers", [0.03, 0.0], ids=["outliers", "clean"])
def test_likelihood_choice_by_held_out_likelihood(outliers):
    X, truth = make_unmerged(n_images=60, outlier_fraction=outliers, random_state=0, **HEXAGONAL)
    assert truth.outlier.mean() == pytest.approx(outliers, abs=0.005)
    search = GridSearchCV(
        VariationalMerger(**{**FAST, "max_iter": 600}),
        {"likelihood": ["normal", "studentt"]},
        cv=ImageKFold(3),
        scoring=SCORING,
        refit="loglik" if outliers else False,
    )
    search.fit(X)
    results = pd.DataFrame(search.cv_results_).set_index("param_likelihood")
    gap = results.loc["studentt", "mean_test_loglik"] - results.loc["normal", "mean_test_loglik"]
    if outliers:
        assert search.best_params_ == {"likelihood": "studentt"}
        assert gap > 5.0  # nats per observation
        assert search.best_estimator_.likelihood == "studentt"
        assert hasattr(search.best_estimator_, "posterior_weights_")
    else:
        # Within noise: less than twice the spread of the fold scores.
        noise = 2 * results["std_test_loglik"].max()
        assert abs(gap) < noise, (gap, noise)


@pytest.mark.parametrize("reference", ["true", "unrelated"])
def test_prior_choice_by_held_out_likelihood(reference):
    X, truth = make_unmerged(n_images=40, random_state=0)
    rng = np.random.RandomState(1)
    if reference == "true":
        ref = _reference(truth, 0.05, rng)
    else:
        ref = _reference(make_unmerged(n_images=40, random_state=100)[1], 0.05, rng)
    search = GridSearchCV(
        VariationalMerger(**{**FAST, "max_iter": 300}),
        {"prior": [WilsonPrior(), ReferencePrior(ref, kind="studentt")]},
        cv=ImageKFold(3),
        refit=False,
    )
    search.fit(X)
    chosen = type(search.best_params_["prior"])
    assert chosen is (ReferencePrior if reference == "true" else WilsonPrior)
    winner = search.best_index_
    for k in range(3):  # every fold agrees: not a close call
        fold = search.cv_results_[f"split{k}_test_score"]
        assert fold[winner] > fold[1 - winner]


def test_randomized_search_over_model_pieces(small):
    X, truth = small
    ref = _reference(truth, 0.05, np.random.RandomState(0))
    space = {
        "prior": [WilsonPrior(), *(ReferencePrior(ref, kind=k) for k in ("normal", "laplace", "studentt"))],
        "likelihood": ["normal", "laplace", *(StudentTLikelihood(dof=d) for d in (2.0, 64.0))],
        "mlp_width": [4, 8],
        "image_scales": [True, False],
    }
    search = RandomizedSearchCV(
        VariationalMerger(**{**FAST, "max_iter": 50}), space, n_iter=2, cv=ImageKFold(2), random_state=0
    ).fit(X)
    assert np.isfinite(search.cv_results_["mean_test_score"]).all()
    best, params = search.best_estimator_, search.best_params_
    assert type(best.prior) is type(params["prior"]) and best.prior.get_params().keys() == params["prior"].get_params().keys()
    assert (best.mlp_width, best.image_scales) == (params["mlp_width"], params["image_scales"])
    assert best.likelihood == params["likelihood"] if isinstance(params["likelihood"], str) else (
        best.likelihood.get_params() == params["likelihood"].get_params())
    assert np.isfinite(best.score(X))


def test_held_out_intensities_never_reach_the_fit():
    """Replace the held-out fold's intensities in the table given to cross_validate: the
    fold's model (its intensity unit, Wilson curve, reference-prior normalisation,
    posterior and scales) and its predictions for the held-out rows must not change.
    Fitting the whole table, which would leak, changes them: the test would notice."""
    X, truth = make_unmerged(n_images=30, random_state=7, **HEXAGONAL)
    prior = ReferencePrior(_reference(truth, 0.05, np.random.RandomState(0)), kind="studentt")
    merger = VariationalMerger(prior=prior, **{**FAST, "max_iter": 100})
    train, test = next(ImageKFold(3).split(X))
    cv = [(train, test)]  # the first fold of ImageKFold(3)
    tampered = X.copy()
    iobs = tampered["Iobs"].to_numpy(np.float64)
    iobs[test] = 10 * iobs[test] + 1000.0
    tampered["Iobs"] = iobs.astype(np.float32)

    def first_fold(table):
        result = cross_validate(merger, table, cv=cv, scoring=heldout_loglik, return_estimator=True)
        return result["estimator"][0]

    clean, dirty = first_fold(X), first_fold(tampered)
    X_test = X.iloc[test]
    assert clean.intensity_scale_ == dirty.intensity_scale_
    for a, b in zip(clean.wilson_curve_, dirty.wilson_curve_):
        np.testing.assert_array_equal(a, b)
    for key in clean.posterior_weights_:
        np.testing.assert_array_equal(clean.posterior_weights_[key], dirty.posterior_weights_[key])
    for a, b in zip(clean.scale_weights_, dirty.scale_weights_):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(clean.predict(X_test), dirty.predict(X_test))
    assert clean.score(X_test) == dirty.score(X_test)
    # The test has teeth: a model that saw the tampered rows differs.
    leaky = VariationalMerger(prior=prior, **{**FAST, "max_iter": 100}).fit(tampered)
    assert leaky.intensity_scale_ > 1.5 * clean.intensity_scale_
    assert not np.allclose(leaky.predict(X_test), clean.predict(X_test), rtol=0.05)


# ------------------------------------------------------- warm start, transfer
def test_warm_start_starts_from_the_previous_loss(small):
    X, _ = small
    merger = VariationalMerger(warm_start=True, **{**FAST, "max_iter": 300}).fit(X)
    first = merger.loss_curve_[:, 0].copy()
    merger.fit(X)
    second = merger.loss_curve_[:, 0]
    previous_final = first[-50:].mean()
    distance_from_final = abs(second[:10].mean() - previous_final)
    distance_of_initial = abs(first[:10].mean() - previous_final)
    assert distance_from_final < 0.2 * distance_of_initial, (distance_from_final, distance_of_initial)


def test_transfer_recipe_anomalous_refit_with_frozen_scales():
    """careless's transfer recipe: fit without anomalous, then refit with anomalous=True
    reusing and freezing the scale model."""
    X, truth = make_unmerged(n_images=40, anomalous=True, anomalous_signal=0.1, random_state=4)
    merger = VariationalMerger(**{**FAST, "max_iter": 300}).fit(X)
    scales = [w.copy() for w in merger.scale_weights_]
    n_plain = len(merger.reflections_)
    merger.set_params(anomalous=True, warm_start="scales", freeze="scales").fit(X)
    for before, after in zip(scales, merger.scale_weights_):
        np.testing.assert_array_equal(before, after)
    assert len(merger.reflections_) > 1.3 * n_plain  # Friedel mates now apart
    merged = merger.transform(X)
    assert list(merged.columns) == list(merger.get_feature_names_out())
    both = merged[["DANO"]].join(truth.merged[["DANO"]], rsuffix="_true").dropna()
    assert len(both) > 1000
    assert np.corrcoef(both["DANO"].astype(float), both["DANO_true"].astype(float))[0, 1] > 0.8
    assert np.isfinite(merger.score(X))


# ---------------------------------------------------- parallel and distributed
def test_thread_limit_follows_the_environment():
    assert _thread_limit({}) is None
    assert _thread_limit({"OMP_NUM_THREADS": "2"}) == (2, 2)
    assert _thread_limit({"OMP_NUM_THREADS": "2", "TF_NUM_INTRAOP_THREADS": "3"}) == (3, 2)
    assert _thread_limit({"OMP_NUM_THREADS": "junk"}) is None
    assert _thread_limit({"TF_NUM_INTEROP_THREADS": "1"}) == (None, 1)


_THREAD_VARIABLES = {"OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"}


def _expected_threads(environment):
    """TensorFlow's (intra-op, inter-op) counts for a worker's environment (0: default)."""
    limit = _thread_limit(environment) or (None, None)
    return tuple(n or 0 for n in limit)


def _search(n_jobs=None):
    # A fixed ν: a learned one ("studentt") amplifies the float rounding that differs
    # between thread counts over a short fit, and this test is about the plumbing (so
    # two folds: three searches of four fits each).
    return GridSearchCV(
        VariationalMerger(**{**FAST, "max_iter": 50}),
        {"likelihood": ["normal", StudentTLikelihood(16.0)]},
        cv=ImageKFold(2),
        refit=False,
        n_jobs=n_jobs,
    )


def test_parallel_and_dask_searches_agree_with_the_serial_one():
    import dask
    from dask.distributed import Client, LocalCluster

    X, _ = make_unmerged(n_images=18, outlier_fraction=0.03, random_state=2, **HEXAGONAL)
    serial = _search().fit(X)
    assert repr(serial.best_params_) == "{'likelihood': StudentTLikelihood()}"

    parallel = _search(n_jobs=2).fit(X)
    assert repr(parallel.best_params_) == repr(serial.best_params_)
    np.testing.assert_allclose(parallel.cv_results_["mean_test_score"], serial.cv_results_["mean_test_score"], rtol=1e-2)
    # joblib tells its workers OMP_NUM_THREADS = cpu_count // n_jobs (unless set here
    # already); TensorFlow's thread counts follow it.
    workers = joblib.Parallel(n_jobs=2)(joblib.delayed(thread_settings)() for _ in range(2))
    for environment, counts in workers:
        assert counts == _expected_threads(environment), (environment, counts)
        if not _THREAD_VARIABLES & set(os.environ):
            assert counts == (max(1, joblib.cpu_count() // 2),) * 2

    saved = dict(os.environ)  # dask's nanny writes its workers' variables into ours
    no_trimming = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}  # as documented
    try:
        with dask.config.set(no_trimming), LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
        ) as cluster, Client(cluster, timeout="60s") as client:
            client.wait_for_workers(2, timeout=60)
            with joblib.parallel_backend("dask"):
                on_dask = _search().fit(X)
            workers = client.run(thread_settings)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert repr(on_dask.best_params_) == repr(serial.best_params_)
    np.testing.assert_allclose(on_dask.cv_results_["mean_test_score"], serial.cv_results_["mean_test_score"], rtol=1e-2)
    # dask's nanny gives its workers OMP_NUM_THREADS=1 unless it is set here.
    for environment, counts in workers.values():
        assert tuple(counts) == _expected_threads(environment), (environment, counts)
        if not _THREAD_VARIABLES & set(saved):
            assert tuple(counts) == (1, 1)


# -------------------------------------------------------------------- real data
@pytest.mark.realdata
def test_cross_val_score_on_hypf(data_dir):
    X = skmerge.read_unmerged(data_dir / "hypf_hg_sad" / "hypf_unmerged.mtz", anomalous=True)
    merger = VariationalMerger(
        anomalous=True, likelihood="studentt", metadata=["dHKL", "XDET", "YDET", "BATCH", "FRACTIONCALC"],
        image_scales=False, mlp_layers=2, mlp_width=8, max_iter=100, random_state=0,
    )
    scores = cross_val_score(merger, X, cv=ImageKFold(3), scoring=heldout_loglik)
    assert scores.shape == (3,) and np.isfinite(scores).all()
