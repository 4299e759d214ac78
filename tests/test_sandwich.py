"""The sandwich ratio J/H against reference computations, and how the merged table
applies it (:mod:`skmerge.model.sandwich`)."""

import numpy as np
import pytest
from scipy import integrate, stats

from skmerge import StudentTLikelihood, VariationalMerger
from skmerge._tf import tf
from skmerge.datasets import make_unmerged
from skmerge.model.likelihoods import NormalLikelihood
from skmerge.model.sandwich import applied_ratio, sandwich_ratio, shared_correlation


class _Fixed:
    """A model reduced to what the ratio reads: amplitudes held at ``f``, every scale 1."""

    def __init__(self, f, likelihood):
        self.f, self.likelihood = np.asarray(f, np.float32), likelihood

    def amplitude_moments(self):
        return tf.constant(self.f), tf.constant(self.f**2)

    def predict(self, chunk):
        mean = tf.gather(tf.constant(self.f**2), chunk["refl"])
        return mean, tf.zeros_like(mean), tf.ones_like(mean), tf.zeros_like(mean)

    def observation_log_likelihood(self, data, predicted):
        return self.likelihood.log_prob(data["intensity"], predicted, data["sigma"])


def _ratio(f, refl, intensity, sigma, likelihood):
    chunk = {"refl": tf.constant(refl), "intensity": tf.constant(intensity, tf.float32),
             "sigma": tf.constant(sigma, tf.float32)}
    return sandwich_ratio(_Fixed(f, likelihood), lambda: iter([chunk]), len(f))


def _gaussian_observations(n_reflections, n_obs, seed, sigma=1.0):
    rng = np.random.default_rng(seed)
    f_true = rng.uniform(5.0, 10.0, n_reflections)
    refl = np.repeat(np.arange(n_reflections), n_obs)
    intensity = f_true[refl] ** 2 + sigma * rng.normal(size=refl.size)
    return refl, intensity


@pytest.mark.parametrize("n_obs", [2, 3, 8])
@pytest.mark.parametrize("claimed", [1.0, 0.5])
def test_a_normal_likelihood_gives_the_square_of_its_sigmas_misstatement(n_obs, claimed):
    # Each reflection held at the mean of its own observations (the fit of a Normal
    # likelihood with equal σ): Bessel's n/(n − 1) undoes the shrinkage of the residuals
    # at any multiplicity; σ stated at half the noise's makes the scores' variance 4 × H.
    refl, intensity = _gaussian_observations(4000, n_obs, seed=n_obs)
    f = np.sqrt(np.bincount(refl, intensity) / n_obs)
    ratio = _ratio(f, refl, intensity, np.full(refl.size, claimed), NormalLikelihood())
    assert ratio == pytest.approx(1 / claimed**2, rel=0.05)


def test_a_student_t_on_gaussian_noise_gives_its_information_ratio():
    # The reference: J/H of a t of ν 3 and scale 0.8 on standard normal residuals,
    # E[ψ²]/E[ψ'] by quadrature (ψ the t's score); 1.2 or so, as for skmerge's fits of
    # simulated data with outliers. Many observations per reflection, held at the truth.
    dof, scale = 3.0, 0.8

    def score(r):
        u = r / scale
        return (dof + 1) * u / (dof + u**2) / scale

    def curvature(r):
        u = r / scale
        return (dof + 1) * (dof - u**2) / (dof + u**2) ** 2 / scale**2

    j = integrate.quad(lambda r: score(r) ** 2 * stats.norm.pdf(r), -np.inf, np.inf)[0]
    h = integrate.quad(lambda r: curvature(r) * stats.norm.pdf(r), -np.inf, np.inf)[0]
    n_obs = 40
    refl, intensity = _gaussian_observations(3000, n_obs, seed=1)
    f = np.sqrt(np.bincount(refl, intensity) / n_obs)
    likelihood = StudentTLikelihood(dof=dof)
    ratio = _ratio(f, refl, intensity, np.full(refl.size, scale), likelihood)
    assert j / h > 1.1
    assert ratio == pytest.approx(j / h, rel=0.05)


def test_single_observations_leave_the_posterior_as_it_is():
    refl = np.arange(50)
    intensity = np.random.default_rng(0).normal(25.0, 3.0, 50)
    assert _ratio(np.full(50, 5.0), refl, intensity, np.ones(50), NormalLikelihood()) == 1.0


def test_the_ratio_only_widens():
    assert applied_ratio(0.8) == 1.0 and applied_ratio(1.3) == 1.3


def test_shared_correlation_keeps_the_variance_of_the_difference():
    rng = np.random.default_rng(0)
    variance, mate_variance = rng.uniform(0.5, 2.0, (2, 1000))
    correlation = rng.uniform(-0.5, 0.9, 1000)
    ratio = 1.3
    widened = shared_correlation(correlation, variance, mate_variance, ratio)
    product = np.sqrt(variance * mate_variance)
    inside = np.abs(widened) < 1
    before = variance + mate_variance - 2 * correlation * product
    after = ratio * (variance + mate_variance - 2 * widened * product)
    np.testing.assert_allclose(after[inside], before[inside], rtol=1e-10)
    assert inside.mean() > 0.9 and (np.abs(widened) <= 1).all()
    # Where it cannot (halves of very different widths), the difference widens least.
    assert (after[~inside] >= before[~inside]).all()
    np.testing.assert_allclose(shared_correlation(correlation, variance, mate_variance, 1.0), correlation)


def test_merged_table_widens_sigf_and_keeps_sigdano():
    X, _ = make_unmerged(n_images=12, anomalous=True, anomalous_signal=0.05, random_state=0)
    merger = VariationalMerger(anomalous=True, mlp_layers=2, max_iter=100, random_state=0).fit(X)
    assert np.isfinite(merger.sandwich_ratio_) and merger.sandwich_ratio_ > 0
    tables = {}
    for ratio in (1.0, 1.5):
        merger.sandwich_ratio_ = ratio
        merger._model = None  # rebuilt from the attributes, as after loading
        tables[ratio] = merger.transform(X)
    plain, widened = tables[1.0], tables[1.5]
    for column in ("F", "F(+)", "F(-)", "DANO", "I"):
        np.testing.assert_allclose(widened[column].to_numpy(float), plain[column].to_numpy(float), equal_nan=True)
    fitted = plain["N"].to_numpy() > 0
    for column in ("SIGF(+)", "SIGF(-)", "SIGI(+)", "SIGI(-)"):
        np.testing.assert_allclose(widened[column].to_numpy(float), np.sqrt(1.5) * plain[column].to_numpy(float),
                                   rtol=1e-5, equal_nan=True)
    np.testing.assert_allclose(widened["SIGDANO"].to_numpy(float), plain["SIGDANO"].to_numpy(float), rtol=1e-5,
                               equal_nan=True)
    # The mean of a pair widens by more than its halves: the extra spread is shared.
    gain = widened["SIGF"].to_numpy(float)[fitted] / plain["SIGF"].to_numpy(float)[fitted]
    assert (gain >= np.sqrt(1.5) - 1e-5).all()
