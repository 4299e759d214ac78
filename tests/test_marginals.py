"""The grid marginals (skmerge.model.marginals) against direct integrals of the same
posterior with scipy, and their place in the estimator."""

import warnings

import numpy as np
import pytest
from scipy import integrate, signal, special, stats

from skmerge import DoubleWilsonPrior, VariationalMerger
from skmerge.datasets import make_unmerged
from skmerge.model.data import encode
from skmerge.model.fitted import FitState, evaluation_chunks
from skmerge.model.marginals import GridMarginals, grid_marginals
from skmerge.model.posterior import softplus_inverse
from skmerge.model.sandwich import applied_ratio
from skmerge.symmetry import lookup_keys


def _fit(anomalous, **params):
    X, _ = make_unmerged(n_images=8, anomalous=anomalous, random_state=3)
    X = X.reset_index(drop=True)
    # A reflection measured twice, once 5× too bright: its posterior has two modes.
    keys = encode(X, anomalous=anomalous, separate_files=False).keys
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    twice = np.flatnonzero((counts[inverse] == 2) & ~X["CENTRIC"].to_numpy(bool))
    row = twice[np.argmax(X["Iobs"].to_numpy()[twice] / X["SIGIobs"].to_numpy()[twice])]
    X.loc[row, "Iobs"] *= 5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merger = VariationalMerger(anomalous=anomalous, max_iter=150, random_state=0, marginals="grid",
                                   **params).fit(X)
    known = merger.reflections_.keys
    return merger, X, lookup_keys(known, keys), lookup_keys(known, keys[[row]])[0]


def _observation_terms(merger, X, refl, reflection):
    """The log-likelihood of one reflection's observations as a function of its F (in
    standardised units), as the fitted model sees them: scales, σ′ and ν fitted."""
    c = merger.intensity_scale_
    rows = np.flatnonzero(refl == reflection)
    _, scale, _ = merger.predict(X.iloc[rows], return_scale=True)
    scale = scale * _intensity_fall_off(merger, X["dHKL"].to_numpy(float)[rows])  # the model's frame
    intensity, sigma = X["Iobs"].to_numpy()[rows] / c, X["SIGIobs"].to_numpy()[rows] / c

    def log_likelihood(f):
        predicted = scale * f**2
        sigma_prime = merger.sdfac_ * np.sqrt(sigma**2 + (merger.sdadd_ * predicted) ** 2)
        return stats.t.logpdf(intensity, merger.likelihood_dof_, predicted, sigma_prime).sum()

    return log_likelihood


def _intensity_fall_off(merger, d):
    """The factor of the merged table's intensities (and the predictions' scales' divisor)
    at resolutions ``d``: the frame of the least-decayed images (``reference_b_``)."""
    return np.exp(-merger.reference_b_ / (2 * d**2))


def _wilson_log_prior(merger, reflection):
    prior = merger._get_model().prior
    law = getattr(prior, "wilson", prior)
    v = float(law.mean_square.numpy()[reflection])
    if bool(law.centric.numpy()[reflection]):
        return lambda f: 0.5 * np.log(2 / (np.pi * v)) - f**2 / (2 * v)
    return lambda f: np.log(2 * f / v) - f**2 / v if f > 0 else -np.inf


def _moments_by_quad(log_density, top, mode):
    peak = log_density(mode)
    density = lambda f: np.exp(log_density(f) - peak)  # noqa: E731
    points = sorted({mode, *np.linspace(0, top, 9)[1:-1]})
    mass, m1, m2 = (integrate.quad(lambda f: density(f) * f**k, 0, top, points=points, limit=400)[0]
                    for k in (0, 1, 2))
    return m1 / mass, np.sqrt(m2 / mass - (m1 / mass) ** 2)


def test_univariate_marginals_equal_the_integral_of_their_posterior():
    merger, X, refl, doctored = _fit(False, prior="wilson")
    moments = GridMarginals(merger.marginal_moments_, np.full(len(merger.reflections_), -1))
    counts = merger.reflection_counts_
    chosen = [doctored, *np.flatnonzero(counts == 1)[:2], *np.flatnonzero(counts >= 4)[:3]]
    for reflection in chosen:
        log_likelihood = _observation_terms(merger, X, refl, reflection)
        log_prior = _wilson_log_prior(merger, reflection)
        m1, sd = moments.values[0, reflection], np.sqrt(moments.variance[reflection])
        grid = np.linspace(1e-6, m1 + 30 * sd + 3, 4001)
        log_post = np.array([log_likelihood(f) + log_prior(f) for f in grid])
        ref_mean, ref_sd = _moments_by_quad(lambda f: log_likelihood(f) + log_prior(f), grid[-1],
                                            grid[np.argmax(log_post)])
        assert m1 == pytest.approx(ref_mean, rel=2e-3, abs=0.02 * ref_sd)
        assert sd == pytest.approx(ref_sd, rel=0.03)
    # The doctored reflection's two modes: the marginal spans both, the fit's truncated
    # normal is narrower.
    q = merger.posterior()
    assert np.sqrt(moments.variance[doctored]) > 2 * float(q.stddev().numpy()[doctored])
    # Wherever the fit's posterior sits (on either mode, narrow), the grid finds both
    # modes and the valley between them.
    log_likelihood = _observation_terms(merger, X, refl, doctored)
    log_prior = _wilson_log_prior(merger, doctored)
    grid = np.linspace(1e-6, 3 * moments.values[0, doctored], 6001)
    log_post = np.array([log_likelihood(f) + log_prior(f) for f in grid])
    modes = grid[signal.argrelmax(log_post)[0]]
    assert len(modes) == 2 and modes[1] > 1.3 * modes[0]
    ref_mean, ref_sd = _moments_by_quad(lambda f: log_likelihood(f) + log_prior(f), grid[-1], modes[0])
    for mode in modes:
        moved = _grid_marginals_with_fit_at(merger, X, doctored, mode, 0.02 * mode)
        assert moved.values[0, doctored] == pytest.approx(ref_mean, rel=2e-3, abs=0.02 * ref_sd)
        assert np.sqrt(moved.variance[doctored]) == pytest.approx(ref_sd, rel=0.03)


def _grid_marginals_with_fit_at(merger, X, reflection, loc, scale):
    """The grid marginals of a fitted merger's data with one reflection's fitted
    posterior moved to ``loc`` ± ``scale``."""
    model = merger._get_model()
    posterior = model.posterior
    for variable, value in ((posterior.loc_raw, loc), (posterior.scale_raw, scale)):
        values = variable.numpy()
        values[reflection] = softplus_inverse(np.array(value))
        variable.assign(values)
    state = FitState.from_attributes(merger)
    return grid_marginals(model, lambda: evaluation_chunks(model, state.evaluation_data(merger, X)[0]),
                          len(merger.reflections_))


def test_friedel_pair_marginals_and_covariance_equal_the_two_dimensional_integral():
    merger, X, refl, _ = _fit(True)
    model = merger._get_model()
    parent = model.prior.parent
    moments = GridMarginals(merger.marginal_moments_, parent)
    counts = merger.reflection_counts_
    children = np.flatnonzero((parent >= 0) & (counts > 0))
    children = children[(counts[parent[children]] > 0)][:4]
    k, w = (t.numpy().astype(np.float64) for t in model.prior._pair_terms())
    centric = model.prior.centric.numpy()
    for child in children:
        mother = parent[child]
        assert not centric[child]
        like_child = _observation_terms(merger, X, refl, child)
        like_parent = _observation_terms(merger, X, refl, mother)
        log_root = _wilson_log_prior(merger, mother)
        spans = [(moments.values[0, r], np.sqrt(moments.variance[r])) for r in (child, mother)]
        axes = [np.linspace(max(m - 12 * s, 1e-6), m + 12 * s, 801) for m, s in spans]
        a, b = np.meshgrid(*axes, indexing="ij")  # a: child, b: parent
        x = a * k[child] * b / w[child]
        log_joint = (np.array([like_child(f) for f in axes[0]])[:, None]
                     + np.array([like_parent(f) + log_root(f) for f in axes[1]])[None, :]
                     + np.log(a / w[child]) - (a**2 + (k[child] * b) ** 2) / (2 * w[child])
                     + np.log(special.i0e(x)) + x)
        p = np.exp(log_joint - log_joint.max())
        p /= p.sum()
        mean_a, mean_b = (p * a).sum(), (p * b).sum()
        var_a, var_b = (p * (a - mean_a) ** 2).sum(), (p * (b - mean_b) ** 2).sum()
        cov = (p * (a - mean_a) * (b - mean_b)).sum()
        assert moments.values[0, child] == pytest.approx(mean_a, abs=0.03 * np.sqrt(var_a))
        assert moments.values[0, mother] == pytest.approx(mean_b, abs=0.03 * np.sqrt(var_b))
        assert moments.variance[child] == pytest.approx(var_a, rel=0.05)
        assert moments.variance[mother] == pytest.approx(var_b, rel=0.05)
        assert moments.covariance([child], [mother])[0] == pytest.approx(cov, abs=0.05 * np.sqrt(var_a * var_b))


@pytest.mark.parametrize("prior", ["wilson", "double-wilson"])  # the second: a forest without edges
def test_transform_reports_the_grid_marginals_and_variational_the_fit(prior):
    merger, X, _, _ = _fit(False, prior=prior)
    merged = merger.transform(X)
    rows = lookup_keys(merger.reflections_.keys, encode(X, anomalous=False, separate_files=False).keys)
    root = np.sqrt(merger.intensity_scale_ * _intensity_fall_off(merger, merger.reflections_.dhkl[np.unique(rows)]))
    m1, m2 = (m[np.unique(rows)] for m in merger.marginal_moments_[:2])  # the merged table's order
    np.testing.assert_allclose(merged["F"].to_numpy(), m1 * root, rtol=1e-5)
    # Widened by the sandwich's J/H and each reflection's factor for its images' offsets.
    widening = np.sqrt(applied_ratio(merger.sandwich_ratio_) * merger.image_weight_ratio_[np.unique(rows)])
    np.testing.assert_allclose(merged["SIGF"].to_numpy(), np.sqrt(m2 - m1**2) * root * widening, rtol=1e-3)
    variational = VariationalMerger(**{**merger.get_params(), "marginals": "variational"}).fit(X)
    assert not hasattr(variational, "marginal_moments_")
    q_mean = variational.posterior().mean().numpy().astype(np.float64)
    root = np.sqrt(variational.intensity_scale_
                   * _intensity_fall_off(variational, variational.reflections_.dhkl[np.unique(rows)]))
    np.testing.assert_allclose(variational.transform(X)["F"].to_numpy(), q_mean[np.unique(rows)] * root, rtol=1e-5)


def test_time_series_families_and_partial_fit_keep_marginals():
    X, _ = make_unmerged(n_images=9, time_points=3, random_state=0)
    merger = VariationalMerger(separate_files=True, prior=DoubleWilsonPrior(parents=[None, 0, 1]), max_iter=60,
                               random_state=0, marginals="grid")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merger.fit(X)
    moments = merger.marginal_moments_
    assert np.isfinite(moments).all() and (moments[1] >= moments[0] ** 2).all()
    # A chain of three files: grandchildren have parents that have parents.
    parent = merger._get_model().prior.parent
    assert (parent[parent[parent >= 0]] >= 0).any()
    assert (moments[3][parent >= 0] != 0).any() and (moments[3][parent < 0] == 0).all()
    images = X["image_id"].to_numpy()
    first = VariationalMerger(prior="wilson", max_iter=40, random_state=0, marginals="grid")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first.partial_fit(X[images < 4]).partial_fit(X[images >= 4])
    assert first.marginal_moments_.shape == (4, len(first.reflections_))
    assert np.isfinite(first.transform(X)["SIGF"]).all()
