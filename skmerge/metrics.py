"""Scores of a fitted merger on (held-out) observations, as scikit-learn scorers.

Every scorer here follows scikit-learn's callable-scorer protocol,
``scorer(estimator, X, y=None) -> float`` with higher meaning better, so it can be given
as ``scoring=`` to ``cross_val_score``, ``cross_validate``, ``GridSearchCV`` and
``RandomizedSearchCV``, alone or in a dict::

    GridSearchCV(merger, grid, cv=ImageKFold(5),
                 scoring={"loglik": heldout_loglik, "ccpred": ccpred}, refit="loglik")

``estimator`` is a fitted :class:`~skmerge.VariationalMerger` or a fitted ``Pipeline``
whose last step is one; X is the raw observation table. For a pipeline, X is passed
through the pipeline's earlier steps (their ``transform``) and the merger scores the
result, so a step that drops observations drops them from the score too. ``y``, when
given, replaces the intensities ``Iobs`` of the table the merger sees (so with a
pipeline it must match that table's rows).

========================  ===============================================================
name                      what it measures
========================  ===============================================================
``heldout_loglik``        mean log predictive density per observation (the merger's
                          ``score``); the default choice for model selection
``ccpred``                Pearson correlation of the observed and the predicted
                          intensities, weighted by 1/σ²
``CCHalfScorer()``        overall CC1/2 of half-dataset merges (expensive: two fits per
                          repeat)
========================  ===============================================================
"""

import numpy as np
from sklearn.pipeline import Pipeline

from .errors import InputError
from .half_datasets import half_dataset_merges
from .shells import weighted_pearson
from .stats import cc_half

__all__ = [
    "CCHalfScorer",
    "CCPredScorer",
    "LogLikelihoodScorer",
    "SCORERS",
    "ccpred",
    "get_scorer",
    "half_dataset_cc",
    "heldout_loglik",
    "weighted_pearson",
]


def _unwrap(estimator, X):
    """The merger at the end of ``estimator`` and X as that merger sees it.

    Pipelines (nested too) are unwound by transforming X through every step but the
    last; a fitted search object stands for its ``best_estimator_``."""
    while True:
        if isinstance(estimator, Pipeline):
            if len(estimator.steps) > 1:
                X = estimator[:-1].transform(X)
            estimator = estimator.steps[-1][1]
        elif hasattr(estimator, "best_estimator_"):
            estimator = estimator.best_estimator_
        else:
            return estimator, X


def _observed(X, y):
    """Observed intensities (``y`` or ``X["Iobs"]``) and their σ (``X["SIGIobs"]``)."""
    if not hasattr(X, "columns") or "SIGIobs" not in X.columns or (y is None and "Iobs" not in X.columns):
        raise InputError(
            "scoring needs the observation table with Iobs and SIGIobs columns (from "
            "skmerge.read_unmerged) at the merger's input."
        )
    intensity = X["Iobs"].to_numpy(np.float64) if y is None else np.asarray(y, dtype=np.float64).ravel()
    if len(intensity) != len(X):
        raise InputError(f"y has {len(intensity)} values for the {len(X)} observations the merger scores.")
    return intensity, X["SIGIobs"].to_numpy(np.float64)


class _Scorer:
    """Base of the scorers: a picklable callable ``scorer(estimator, X, y=None)``."""

    name = "score"

    def __call__(self, estimator, X, y=None):
        raise NotImplementedError

    def __repr__(self):
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({params})"


class LogLikelihoodScorer(_Scorer):
    """Mean held-out log predictive density per observation (higher is better).

    The score of observations X under a fitted merger is

        (1/n) Σᵢ log p(Iᵢ | training data),

    where p(Iᵢ | training data) is the likelihood of the observed intensity Iᵢ averaged
    over the fitted posterior of its reflection's amplitude F (the prior for reflections
    the fit never saw) and over the scale model's distribution of its scale (the mean
    per-image offset for images the fit never saw), estimated with 32 Monte Carlo
    samples; densities are per unit of the input intensities. This is
    :meth:`skmerge.VariationalMerger.score`. On held-out images it measures how well the
    model predicts new measurements, and it compares models with different priors,
    likelihoods and scale models directly, because every model is scored by the density
    it assigns to the same numbers.

    Examples
    --------
    >>> from skmerge import VariationalMerger
    >>> from skmerge.datasets import make_unmerged
    >>> from skmerge.metrics import heldout_loglik
    >>> X, _ = make_unmerged(n_images=12, random_state=0)
    >>> train, test = X[X["image_id"] < 9], X[X["image_id"] >= 9]
    >>> merger = VariationalMerger(mlp_layers=2, max_iter=100, random_state=0).fit(train)
    >>> bool(heldout_loglik(merger, test) < 0)   # a log density per unit of intensity
    True
    """

    name = "loglik"

    def __call__(self, estimator, X, y=None):
        merger, Xt = _unwrap(estimator, X)
        return float(merger.score(Xt, y))


class CCPredScorer(_Scorer):
    """CCpred: correlation of observed and predicted intensities (higher is better).

    For every observation i of X the fitted merger predicts Ipredᵢ = E[Σᵢ]·E[F²]
    (:meth:`~skmerge.VariationalMerger.predict`; reflections the fit never saw use
    their prior, images it never saw the mean image offset). CCpred is the Pearson
    correlation of Iobsᵢ and Ipredᵢ over the observations, each weighted (by default)
    by wᵢ = 1/σᵢ², σᵢ being the observation's ``SIGIobs`` — see
    :func:`weighted_pearson`. Weighting by 1/σ² gives precise measurements the most say
    (as a least-squares scaling program would); note that with counting errors the
    precise observations are the weak ones, so the weighted CCpred is the more
    sensitive to the scale model at high resolution.

    Parameters
    ----------
    weights : {"inverse_variance", None}, default="inverse_variance"
        wᵢ = 1/σᵢ², or None for the unweighted Pearson correlation.

    Examples
    --------
    >>> from skmerge import VariationalMerger
    >>> from skmerge.datasets import make_unmerged
    >>> from skmerge.metrics import ccpred, CCPredScorer
    >>> X, _ = make_unmerged(n_images=12, random_state=0)
    >>> train, test = X[X["image_id"] < 9], X[X["image_id"] >= 9]
    >>> merger = VariationalMerger(mlp_layers=2, max_iter=100, random_state=0).fit(train)
    >>> bool(ccpred(merger, test) > 0.5), bool(CCPredScorer(weights=None)(merger, test) > 0.5)
    (True, True)
    """

    name = "ccpred"

    def __init__(self, weights="inverse_variance"):
        if weights not in ("inverse_variance", None):
            raise ValueError(f"weights={weights!r}: use 'inverse_variance' or None.")
        self.weights = weights

    def __call__(self, estimator, X, y=None):
        merger, Xt = _unwrap(estimator, X)
        intensity, sigma = _observed(Xt, y)
        predicted = np.asarray(merger.predict(Xt), dtype=np.float64)
        w = sigma**-2.0 if self.weights == "inverse_variance" else None
        return weighted_pearson(intensity, predicted, w)


def half_dataset_cc(estimator, X, *, n_repeats=1, column="I", n_bins=10, random_state=None):
    """CC1/2 per resolution shell of a fitted merger on observations X.

    The images of X are split at random into halves; each half is merged by the
    merger with its scale model frozen (:func:`skmerge.half_datasets.half_dataset_merges`) and
    the halves' ``column`` are correlated per shell (:func:`skmerge.stats.cc_half`).
    Works on a Pipeline ending in a merger (X is transformed by the earlier steps).

    Parameters
    ----------
    estimator : VariationalMerger or Pipeline
        Fitted.
    X : rs.DataSet
        Observations to split into halves: the training table, or held-out images (whose
        scales then come from the scale model without per-image offsets).
    n_repeats : int, default=1
    column : str, default="I"
    n_bins : int, default=10
    random_state : int, RandomState instance or None

    Returns
    -------
    pandas.DataFrame
        One row per shell and an ``overall`` row, with d_max, d_min, n and ``CC1/2``.

    Examples
    --------
    >>> half_dataset_cc(merger, X, n_repeats=2)  # doctest: +SKIP
    """
    merger, Xt = _unwrap(estimator, X)
    halves = half_dataset_merges(merger, Xt, n_repeats=n_repeats, random_state=random_state)
    return cc_half(halves, column=column, n_bins=n_bins)


class CCHalfScorer(_Scorer):
    """Overall CC1/2 of half-dataset merges, as a scorer (expensive).

    Each call refits the posteriors twice per repeat (see :func:`half_dataset_cc`), so a
    search scored with it costs several times more than one scored by likelihood. Do
    not use it to choose between priors: an informative (reference) prior pulls both
    halves towards the same values and raises CC1/2 whether or not the reference is
    right. It is meaningful for choosing likelihoods and scale models.

    Parameters
    ----------
    n_repeats : int, default=1
        Random half splits averaged.
    column : str, default="I"
        Merged column to correlate.
    random_state : int, default=0
        Seed of the half splits (fixed, so that every candidate sees the same halves).

    Examples
    --------
    >>> from sklearn.model_selection import cross_validate
    >>> from skmerge.metrics import CCHalfScorer, heldout_loglik
    >>> cross_validate(merger, X, cv=ImageKFold(3),
    ...                scoring={"loglik": heldout_loglik, "cchalf": CCHalfScorer()})  # doctest: +SKIP
    """

    name = "cchalf"

    def __init__(self, n_repeats=1, column="I", random_state=0):
        self.n_repeats = n_repeats
        self.column = column
        self.random_state = random_state

    def __call__(self, estimator, X, y=None):
        if y is not None:
            raise InputError("CCHalfScorer merges the table's own intensities; y is not supported.")
        table = half_dataset_cc(
            estimator, X, n_repeats=self.n_repeats, column=self.column, n_bins=1, random_state=self.random_state
        )
        return float(table.loc["overall", "CC1/2"])


heldout_loglik = LogLikelihoodScorer()
ccpred = CCPredScorer()

SCORERS = {"loglik": heldout_loglik, "ccpred": ccpred}
"""Scorers by name, for ``scoring={name: SCORERS[name] ...}``."""


def get_scorer(name):
    """The scorer called ``name``: ``"loglik"``, ``"ccpred"`` or ``"cchalf"``.

    Examples
    --------
    >>> from skmerge.metrics import get_scorer
    >>> get_scorer("ccpred")
    CCPredScorer(weights='inverse_variance')
    """
    if name == "cchalf":
        return CCHalfScorer()
    try:
        return SCORERS[name]
    except KeyError:
        raise ValueError(f"no skmerge scorer {name!r}; choose from {sorted([*SCORERS, 'cchalf'])}.") from None
