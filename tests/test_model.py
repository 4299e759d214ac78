"""The model pieces against closed forms and scipy: truncated-normal moments, sampling
and entropy, likelihood densities, prior moments and the expected log-prior."""

import numpy as np
import pytest
from scipy import integrate, stats

from skmerge._tf import tf
from skmerge.errors import NumericalError
from skmerge.model.likelihoods import LaplaceLikelihood, NormalLikelihood, StudentTLikelihood
from skmerge.model.posterior import TruncatedNormalPosterior, truncated_normal_moments
from skmerge.model.training import LOSS_TERMS, Trainer

LOC = np.array([0.05, 0.5, 1.0, 3.0, 10.0])
SCALE = np.array([1.0, 0.3, 2.0, 0.5, 0.1])


def _scipy_truncnorm(loc, scale):
    return stats.truncnorm(-loc / scale, np.inf, loc=loc, scale=scale)


def test_truncated_normal_moments_match_scipy():
    m = [t.numpy() for t in truncated_normal_moments(tf.constant(LOC, tf.float64), tf.constant(SCALE, tf.float64))]
    for k, moment in enumerate(m, start=1):
        expected = [_scipy_truncnorm(l, s).moment(k) for l, s in zip(LOC, SCALE)]
        np.testing.assert_allclose(moment, expected, rtol=1e-6)


def test_posterior_parameters_round_trip_through_softplus():
    loc, scale = TruncatedNormalPosterior(LOC, SCALE).parameters()
    np.testing.assert_allclose(loc.numpy(), LOC, rtol=1e-5)
    np.testing.assert_allclose(scale.numpy(), SCALE, rtol=1e-4)


def test_posterior_samples_follow_the_truncated_normal():
    posterior = TruncatedNormalPosterior(LOC, SCALE)
    samples = posterior.sample(20000, tf.constant([3, 4])).numpy()
    assert (samples >= 0).all()
    for j, (l, s) in enumerate(zip(LOC, SCALE)):
        assert stats.kstest(samples[:, j], _scipy_truncnorm(l, s).cdf).pvalue > 1e-3


def test_posterior_entropy_matches_scipy():
    entropy = TruncatedNormalPosterior(LOC, SCALE).entropy().numpy()
    def numeric(dist):
        return integrate.quad(lambda x: -dist.pdf(x) * dist.logpdf(x), 0, dist.ppf(1 - 1e-12))[0]

    expected = [numeric(_scipy_truncnorm(l, s)) for l, s in zip(LOC, SCALE)]
    np.testing.assert_allclose(entropy, expected, rtol=1e-4, atol=1e-4)


def test_posterior_samples_are_differentiable():
    posterior = TruncatedNormalPosterior(LOC, SCALE)
    with tf.GradientTape() as tape:
        total = tf.reduce_sum(posterior.sample(8, tf.constant([1, 2])))
    grads = tape.gradient(total, [posterior.loc_raw, posterior.scale_raw])
    assert all(g is not None and np.isfinite(g.numpy()).all() for g in grads)


@pytest.mark.parametrize(
    "likelihood, reference",
    [
        (NormalLikelihood(), lambda x, m, s: stats.norm(m, s).logpdf(x)),
        (LaplaceLikelihood(), lambda x, m, s: stats.laplace(m, s / np.sqrt(2)).logpdf(x)),
        (StudentTLikelihood(dof=5.0), lambda x, m, s: stats.t(5.0, m, s).logpdf(x)),
    ],
)
def test_likelihood_log_densities_match_scipy(likelihood, reference):
    x = np.array([-3.0, 0.0, 1.5, 40.0])
    mean = np.array([0.5, 0.0, 2.0, 1.0])
    sigma = np.array([1.0, 0.2, 3.0, 2.0])
    got = likelihood.log_prob(tf.constant(x), tf.constant(mean), tf.constant(sigma)).numpy()
    np.testing.assert_allclose(got, reference(x, mean, sigma), rtol=1e-6)


def _reflections(centric, variance_scale=1.0):
    from skmerge.merger import Reflections

    n = len(centric)
    import gemmi

    r = Reflections(
        hkl=np.zeros((n, 3), np.int32), centric=np.asarray(centric), epsilon=np.ones(n, np.float32),
        dhkl=np.full(n, 3.0, np.float32), spacegroup=gemmi.SpaceGroup("P 1"), cell=gemmi.UnitCell(10, 10, 10, 90, 90, 90),
        anomalous=False,
    )
    r.mean_intensity = np.full(n, variance_scale)
    return r


def test_wilson_prior_moments_match_rayleigh_and_half_normal():
    from skmerge.model.priors import WilsonPrior

    prior = WilsonPrior().build(_reflections([False, True], 2.0))
    m = [t.numpy() for t in prior.moments()]
    rayleigh = stats.rayleigh(scale=np.sqrt(2.0 / 2))
    half_normal = stats.halfnorm(scale=np.sqrt(2.0))
    for k in range(4):
        np.testing.assert_allclose(m[k], [rayleigh.moment(k + 1), half_normal.moment(k + 1)], rtol=1e-5)
    samples = prior.sample(20000, tf.constant([5, 6])).numpy()
    assert stats.kstest(samples[:, 0], rayleigh.cdf).pvalue > 1e-3
    assert stats.kstest(samples[:, 1], half_normal.cdf).pvalue > 1e-3


def test_wilson_expected_log_prob_matches_monte_carlo():
    from skmerge.model.priors import WilsonPrior

    prior = WilsonPrior().build(_reflections([False, True], 1.5))
    posterior = TruncatedNormalPosterior(np.array([1.0, 0.7]), np.array([0.3, 0.5]))
    samples = posterior.sample(200000, tf.constant([7, 8]))
    analytic = prior.expected_log_prob(posterior.moments(), samples).numpy()
    s = samples.numpy().astype(np.float64)
    mc = [
        stats.rayleigh(scale=np.sqrt(1.5 / 2)).logpdf(s[:, 0]).mean(),
        stats.halfnorm(scale=np.sqrt(1.5)).logpdf(s[:, 1]).mean(),
    ]
    np.testing.assert_allclose(analytic, mc, atol=5e-3)


class _Quadratic(tf.Module):
    """A loss (x − 3)² that turns NaN beyond ``blow_up``: drives the trainer's recovery."""

    def __init__(self, blow_up):
        super().__init__()
        self.x = tf.Variable(0.0)
        self.blow_up = blow_up

    def loss_terms(self, data, seed):
        loss = tf.square(self.x - 3.0)
        loss = tf.where(self.x > self.blow_up, np.float32(np.nan), loss)
        return tf.stack([loss, loss, 0.0 * loss])


def test_trainer_recovers_from_non_finite_steps():
    model = _Quadratic(blow_up=4.0)
    trainer = Trainer(model, [model.x], {}, learning_rate=2.0, seed=0, jit_compile=False)
    history, _ = trainer.run(1500, tol=0.0, n_iter_no_change=10**6)
    assert np.isfinite(history).all()
    assert history.shape[1] == len(LOSS_TERMS)
    assert trainer.learning_rate.numpy() < 2.0
    assert abs(model.x.numpy() - 3.0) < 0.05


def test_trainer_raises_numerical_error_when_every_step_fails():
    model = _Quadratic(blow_up=-1.0)
    trainer = Trainer(model, [model.x], {}, learning_rate=0.1, seed=0, jit_compile=False)
    with pytest.raises(NumericalError, match="stopped being finite"):
        trainer.run(200, tol=0.0, n_iter_no_change=10**6)


@pytest.mark.parametrize("n_rows", [1, 4096, 10_001])
def test_scale_network_chunked_pass_matches_a_plain_dense_stack(n_rows):
    """The chunked, recomputing scale network gives the values and gradients of the plain
    (rows, features) dense stack, for one partial chunk, exactly one, and several."""
    from skmerge.model.scaling import ScaleNetwork

    rng = np.random.RandomState(1)
    network = ScaleNetwork(5, 4, 10, n_images=0, rng=rng)
    network.out_kernel.assign(rng.normal(0, 0.3, (10, 2)).astype(np.float32))
    features = tf.constant(rng.normal(size=(n_rows, 5)).astype(np.float32))
    weights = tf.constant(rng.normal(size=(n_rows, 2)).astype(np.float32))
    image = tf.fill([n_rows], -1)

    def plain():
        h = tf.nn.leaky_relu(features @ network.kernels[0] + network.biases[0], 0.01)
        for kernel, bias in zip(network.kernels[1:], network.biases[1:]):
            h = h + tf.nn.leaky_relu(h @ kernel + bias, 0.01)
        out = h @ network.out_kernel + network.out_bias
        return out[:, 0], tf.nn.softplus(out[:, 1]) + 1e-3

    variables = network.trainable_variables
    results = []
    for fn in (lambda: network(features, image), plain):
        with tf.GradientTape() as tape:
            mu, spread = fn()
            loss = tf.reduce_sum(weights[:, 0] * mu + weights[:, 1] * spread)
        grads = tape.gradient(loss, variables)
        results.append((mu.numpy(), spread.numpy(), [g.numpy() for g in grads if g is not None]))
    (mu, spread, grads), (mu_ref, spread_ref, grads_ref) = results
    np.testing.assert_allclose(mu, mu_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(spread, spread_ref, rtol=1e-4, atol=1e-5)
    assert len(grads) == len(grads_ref) == 2 * 4 + 2
    for g, g_ref in zip(grads, grads_ref):
        np.testing.assert_allclose(g, g_ref, rtol=1e-3, atol=1e-3 * np.abs(g_ref).max())

