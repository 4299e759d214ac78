"""The model's distributions against scipy.stats and TFP's own: the truncated-normal
posterior, the Wilson and reference priors, the likelihoods, the KL estimate of the ELBO,
and the configuration objects (error model, priors, likelihoods) as scikit-learn values."""

from types import SimpleNamespace

import gemmi
import numpy as np
import pandas as pd
import pytest
from scipy import integrate, stats
from sklearn.base import clone

from skmerge._tf import tf, tfd
from skmerge.model.error_model import ErrorModel, make_error_model
from skmerge.model.likelihoods import LaplaceLikelihood, NormalLikelihood, StudentTLikelihood, make_likelihood
from skmerge.model.posterior import PositiveTruncatedNormal, TruncatedNormalPosterior
from skmerge.model.priors import ReferenceDistribution, ReferencePrior, WilsonDistribution, WilsonPrior

LOC = np.array([0.05, 0.5, 1.0, 3.0, 10.0])
SCALE = np.array([1.0, 0.3, 2.0, 0.5, 0.1])
SEED = tf.constant([3, 4])
N_SAMPLES = 20_000


def _truncnorm(loc, scale):
    # An upper bound 40σ above loc holds all the mass in float64 and, unlike ∞, gives
    # scipy a finite entropy.
    return stats.truncnorm(-loc / scale, 40.0, loc=loc, scale=scale)


def _numpy(values):
    return np.stack([np.asarray(v) for v in values])


def _assert_samples_follow(samples, cdfs):
    """Kolmogorov–Smirnov test of every column of ``samples`` against its scipy CDF."""
    for column, cdf in zip(samples.T, cdfs):
        assert stats.kstest(column, cdf).pvalue > 1e-3


# ------------------------------------------------------------------ posterior
def test_positive_truncated_normal_matches_scipy_and_tfp():
    """The hand-written law equals scipy's truncnorm and TFP's TruncatedNormal (whose upper
    bound must be finite: with ∞ its entropy and variance are NaN)."""
    loc, scale = tf.constant(LOC), tf.constant(SCALE)
    ours = PositiveTruncatedNormal(loc, scale)
    theirs = tfd.TruncatedNormal(loc, scale, 0.0, 1e6)
    reference = [_truncnorm(l, s) for l, s in zip(LOC, SCALE)]
    x = tf.constant([0.1, 0.4, 1.5, 2.5, 10.05])
    x64 = tf.cast(x, tf.float64)
    expected = {
        "log_prob": ([d.logpdf(v) for d, v in zip(reference, x.numpy())], ours.log_prob(x64), theirs.log_prob(x64)),
        "mean": ([d.mean() for d in reference], ours.mean(), theirs.mean()),
        "variance": ([d.var() for d in reference], ours.variance(), theirs.variance()),
        "entropy": ([d.entropy() for d in reference], ours.entropy(), theirs.entropy()),
    }
    for name, (scipy_value, ours_value, tfp_value) in expected.items():
        np.testing.assert_allclose(ours_value.numpy(), scipy_value, rtol=1e-6, atol=1e-9, err_msg=name)
        np.testing.assert_allclose(ours_value.numpy(), tfp_value.numpy(), rtol=1e-5, atol=1e-8, err_msg=name)
    moments = _numpy(ours.raw_moments())
    for k in range(4):
        np.testing.assert_allclose(moments[k], [d.moment(k + 1) for d in reference], rtol=1e-6)
    assert ours.log_prob(tf.constant(-0.1, tf.float64)).numpy().tolist() == [-np.inf] * len(LOC)


def test_positive_truncated_normal_samples_follow_scipy():
    law = PositiveTruncatedNormal(LOC.astype(np.float32), SCALE.astype(np.float32))
    samples = law.sample(N_SAMPLES, seed=SEED).numpy()
    assert samples.shape == (N_SAMPLES, len(LOC))
    assert (samples >= 0).all()
    _assert_samples_follow(samples, [_truncnorm(l, s).cdf for l, s in zip(LOC, SCALE)])


def test_posterior_module_holds_bijected_variables_and_round_trips_weights():
    posterior = TruncatedNormalPosterior(LOC, SCALE)
    q = posterior.distribution()
    assert isinstance(q, tfd.Distribution)
    assert q.batch_shape == (len(LOC),)
    assert q.reparameterization_type == tfd.FULLY_REPARAMETERIZED
    np.testing.assert_allclose(q.loc.numpy(), LOC, rtol=1e-5)
    np.testing.assert_allclose(q.scale.numpy(), SCALE, rtol=1e-4)
    assert {v.name for v in posterior.trainable_variables} == {"loc_raw:0", "scale_raw:0"}

    weights = posterior.get_weights()
    assert set(weights) == {"loc_raw", "scale_raw"}
    other = TruncatedNormalPosterior(np.ones(len(LOC)), np.ones(len(LOC)))
    other.set_weights(weights)
    np.testing.assert_array_equal(other.distribution().mean().numpy(), q.mean().numpy())


def test_posterior_samples_are_differentiable():
    posterior = TruncatedNormalPosterior(LOC, SCALE)
    with tf.GradientTape() as tape:
        total = tf.reduce_sum(posterior.distribution().sample(8, seed=tf.constant([1, 2])))
    grads = tape.gradient(total, [posterior.loc_raw, posterior.scale_raw])
    assert all(g is not None and np.isfinite(g.numpy()).all() for g in grads)


# --------------------------------------------------------------------- priors
VARIANCE = np.array([2.0, 2.0, 0.5, 0.5])
CENTRIC = np.array([False, True, False, True])


def _wilson_scipy(centric, variance):
    """Rayleigh (= Weibull with c=2) for acentric, half-normal for centric, E[F²] = v."""
    if centric:
        return stats.halfnorm(scale=np.sqrt(variance))
    return stats.rayleigh(scale=np.sqrt(variance / 2))


def test_wilson_distribution_matches_scipy():
    prior = WilsonDistribution(CENTRIC, VARIANCE)
    reference = [_wilson_scipy(c, v) for c, v in zip(CENTRIC, VARIANCE)]
    assert prior.batch_shape == (4,)
    for c, v, d in zip(CENTRIC, VARIANCE, reference):
        if not c:  # scipy's Weibull with the parameters handed to tfd.Weibull
            np.testing.assert_allclose(d.pdf([0.3, 1.7]), stats.weibull_min(2, scale=np.sqrt(v)).pdf([0.3, 1.7]))
    x = np.array([0.3, 1.2, 0.05, 2.0], np.float32)
    np.testing.assert_allclose(prior.log_prob(x).numpy(), [d.logpdf(v) for d, v in zip(reference, x)], rtol=1e-5)
    np.testing.assert_allclose(prior.mean().numpy(), [d.mean() for d in reference], rtol=1e-5)
    np.testing.assert_allclose(prior.variance().numpy(), [d.var() for d in reference], rtol=1e-5)
    moments = _numpy(prior.raw_moments())
    for k in range(4):
        np.testing.assert_allclose(moments[k], [d.moment(k + 1) for d in reference], rtol=1e-5)
    samples = prior.sample(N_SAMPLES, seed=SEED).numpy()
    _assert_samples_follow(samples, [d.cdf for d in reference])


def _kl_estimate(prior, posterior, n_samples=200_000):
    """The ELBO's KL term: −(H[q] + E_q[log p])."""
    q = posterior.distribution()
    samples = q.sample(n_samples, seed=tf.constant([7, 8]))
    return -(q.entropy() + prior.expected_log_prob(q, samples)).numpy()


def _kl_quadrature(loc, scale, log_p):
    """KL(q‖p) by numerical integration over q's support."""
    q = _truncnorm(loc, scale)

    def integrand(f):
        return q.pdf(f) * (q.logpdf(f) - log_p(f))

    return integrate.quad(integrand, 0, q.ppf(1 - 1e-12), limit=200, points=[loc])[0]


@pytest.mark.parametrize(
    "loc, scale, centric",
    [(1.0, 0.3, False), (0.05, 1.0, False), (2.5, 0.1, False), (1.0, 0.3, True), (0.2, 0.8, True)],
)
def test_wilson_kl_estimate_matches_numerical_integral(loc, scale, centric):
    variance = 1.5
    prior = WilsonDistribution([centric], [variance])
    estimate = _kl_estimate(prior, TruncatedNormalPosterior(np.array([loc]), np.array([scale])))
    expected = _kl_quadrature(loc, scale, _wilson_scipy(centric, variance).logpdf)
    np.testing.assert_allclose(estimate, [expected], rtol=5e-3, atol=5e-3)


def test_wilson_take_selects_reflections():
    prior = WilsonDistribution(CENTRIC, VARIANCE).take([3, 0])
    assert prior.batch_shape == (2,)
    expected = [_wilson_scipy(c, v).mean() for c, v in zip(CENTRIC[[3, 0]], VARIANCE[[3, 0]])]
    np.testing.assert_allclose(prior.mean().numpy(), expected, rtol=1e-5)


REF_FOUND = np.array([True, True, False])
REF_LOC = np.array([1.5, 0.8, 0.0])
REF_SCALE = np.array([0.2, 0.3, 1.0])
SCIPY_SHAPES = {
    "normal": (NormalLikelihood(), lambda m, s: stats.norm(m, s)),
    "laplace": (LaplaceLikelihood(), lambda m, s: stats.laplace(m, s / np.sqrt(2))),
    "studentt": (StudentTLikelihood(dof=4.0), lambda m, s: stats.t(4.0, m, s)),
}


def _reference_prior(kind):
    wilson = WilsonDistribution([False, True, False], [1.0, 1.0, 1.0])
    return ReferenceDistribution(REF_FOUND, REF_LOC, REF_SCALE, SCIPY_SHAPES[kind][0], wilson)


@pytest.mark.parametrize("kind", sorted(SCIPY_SHAPES))
def test_reference_distribution_matches_scipy(kind):
    prior = _reference_prior(kind)
    law = SCIPY_SHAPES[kind][1]
    reference = [law(m, s) for m, s in zip(REF_LOC[:2], REF_SCALE[:2])] + [_wilson_scipy(False, 1.0)]
    x = np.array([1.3, 0.9, 0.7], np.float32)
    np.testing.assert_allclose(prior.log_prob(x).numpy(), [d.logpdf(v) for d, v in zip(reference, x)], rtol=1e-5)
    samples = prior.sample(N_SAMPLES, seed=SEED).numpy()
    folded = [lambda f, d=d: d.cdf(f) - d.cdf(-f) for d in reference[:2]]
    _assert_samples_follow(samples, folded + [reference[2].cdf])
    # Raw moments: the reference's F and σ as a normal's, Wilson's elsewhere.
    moments = _numpy(prior.raw_moments())
    normal = [stats.norm(m, s) for m, s in zip(REF_LOC[:2], REF_SCALE[:2])] + [reference[2]]
    for k in range(4):
        np.testing.assert_allclose(moments[k], [d.moment(k + 1) for d in normal], rtol=1e-5)
    np.testing.assert_allclose(prior.mean().numpy(), moments[0], rtol=1e-6)
    variance = [s**2 for s in REF_SCALE[:2]] + [reference[2].var()]
    np.testing.assert_allclose(prior.variance().numpy(), variance, rtol=1e-5)
    taken = prior.take([2, 0])
    np.testing.assert_allclose(taken.log_prob(x[[2, 0]]).numpy(), prior.log_prob(x).numpy()[[2, 0]], rtol=1e-6)


@pytest.mark.parametrize("kind", sorted(SCIPY_SHAPES))
def test_reference_kl_estimate_matches_numerical_integral(kind):
    """Closed form for the normal shape, Monte Carlo for Laplace and Student-t."""
    prior = _reference_prior(kind)
    loc, scale = np.array([1.4, 0.5, 1.0]), np.array([0.15, 0.4, 0.3])
    estimate = _kl_estimate(prior, TruncatedNormalPosterior(loc, scale))
    law = SCIPY_SHAPES[kind][1]
    log_p = [law(m, s).logpdf for m, s in zip(REF_LOC[:2], REF_SCALE[:2])] + [_wilson_scipy(False, 1.0).logpdf]
    expected = [_kl_quadrature(l, s, lp) for l, s, lp in zip(loc, scale, log_p)]
    np.testing.assert_allclose(estimate, expected, rtol=5e-3, atol=5e-3)


def _reflections(n, centric):
    return SimpleNamespace(
        hkl=np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]][:n], np.int32),
        centric=np.asarray(centric),
        epsilon=np.ones(n, np.float32),
        dhkl=np.array([4.0, 3.0, 2.0][:n], np.float32),
        mean_intensity=np.full(n, 2.0),
        spacegroup=gemmi.SpaceGroup("P 1"),
        anomalous=False,
    )


def test_priors_build_distributions_over_the_reflections():
    reflections = _reflections(3, [False, True, False])
    wilson = WilsonPrior().build(reflections)
    assert isinstance(wilson, tfd.Distribution) and wilson.batch_shape == (3,)
    np.testing.assert_allclose(wilson.raw_moments()[1].numpy(), 2.0, rtol=1e-6)

    reference = pd.DataFrame({"H": [1, 0], "K": [0, 1], "L": [0, 0], "F": [3.0, 1.0], "SIGF": [0.3, 0.1]})
    for kind, law in [("normal", tfd.Normal), ("laplace", tfd.Laplace), ("studentt", tfd.StudentT)]:
        prior = ReferencePrior(reference, kind=kind, dof=3.0).build(reflections)
        assert isinstance(prior, tfd.Distribution) and prior.batch_shape == (3,)
        assert isinstance(prior._reference, law)
        np.testing.assert_array_equal(prior.found.numpy(), [True, True, False])
    assert prior.kind.dof == 3.0
    # F_ref² matched to the data's mean intensity (2.0) over the shared reflections.
    np.testing.assert_allclose(np.mean(prior.loc.numpy()[:2] ** 2), 2.0, rtol=1e-5)


# ---------------------------------------------------------------- likelihoods
@pytest.mark.parametrize(
    "likelihood, law, reference",
    [
        (NormalLikelihood(), tfd.Normal, lambda x, m, s: stats.norm(m, s).logpdf(x)),
        (LaplaceLikelihood(), tfd.Laplace, lambda x, m, s: stats.laplace(m, s / np.sqrt(2)).logpdf(x)),
        (StudentTLikelihood(dof=5.0), tfd.StudentT, lambda x, m, s: stats.t(5.0, m, s).logpdf(x)),
    ],
)
def test_likelihood_log_densities_match_scipy(likelihood, law, reference):
    x = np.array([-3.0, 0.0, 1.5, 40.0])
    mean = np.array([0.5, 0.0, 2.0, 1.0])
    sigma = np.array([1.0, 0.2, 3.0, 2.0])
    assert isinstance(likelihood.distribution(tf.constant(mean), tf.constant(sigma)), law)
    got = likelihood.log_prob(tf.constant(x), tf.constant(mean), tf.constant(sigma)).numpy()
    np.testing.assert_allclose(got, reference(x, mean, sigma), rtol=1e-6)
    # σ is the standard deviation for the normal and Laplace laws, the scale for Student-t.
    spread = likelihood.distribution(tf.constant(mean), tf.constant(sigma)).stddev().numpy()
    expected_spread = sigma * (np.sqrt(5.0 / 3.0) if law is tfd.StudentT else 1.0)
    np.testing.assert_allclose(spread, expected_spread, rtol=1e-6)


def test_make_likelihood_maps_names_and_passes_objects():
    assert isinstance(make_likelihood("normal"), NormalLikelihood)
    assert isinstance(make_likelihood("laplace"), LaplaceLikelihood)
    studentt = make_likelihood("studentt")
    assert isinstance(studentt, StudentTLikelihood) and studentt.dof == 16.0 and studentt.learn_dof
    mine = StudentTLikelihood(dof=3.0)
    assert make_likelihood(mine) is mine


# ---------------------------------------------------------------- error model
def test_error_model_builds_a_module_at_its_or_the_fitted_values():
    config = ErrorModel(sdfac=2.0, sdadd=0.05)
    module = config.build()
    np.testing.assert_allclose(module.get_weights(), [2.0, 0.05], rtol=1e-6)
    assert module.get_weights().dtype == np.float64
    assert len(module.trainable_variables) == 2
    np.testing.assert_allclose(config.build(sdfac=1.5, sdadd=0.2).get_weights(), [1.5, 0.2], rtol=1e-6)
    np.testing.assert_allclose(config.build(sdadd=0.2).get_weights(), [2.0, 0.2], rtol=1e-6)
    sigma, predicted = np.array([1.0, 0.5], np.float32), np.array([10.0, 100.0], np.float32)
    expected = 2.0 * np.sqrt(sigma**2 + (0.05 * predicted) ** 2)
    np.testing.assert_allclose(module(sigma, predicted).numpy(), expected, rtol=1e-6)
    with tf.GradientTape() as tape:
        total = tf.reduce_sum(module(sigma, predicted))
    assert all(g is not None for g in tape.gradient(total, module.trainable_variables))


def test_make_error_model():
    assert make_error_model(None) is None
    assert make_error_model(False) is None
    assert make_error_model(True).get_params() == ErrorModel().get_params()
    mine = ErrorModel(sdfac=3.0)
    assert make_error_model(mine) is mine


# --------------------------------------------------------- configuration objects
@pytest.mark.parametrize(
    "config",
    [
        WilsonPrior(b_factor=20.0),
        ReferencePrior("reference.mtz", kind="studentt", dof=3.0, width=0.1),
        NormalLikelihood(),
        LaplaceLikelihood(),
        StudentTLikelihood(dof=4.0),
        ErrorModel(sdfac=1.5, sdadd=0.02),
    ],
    ids=lambda config: type(config).__name__,
)
def test_configuration_objects_clone_with_their_parameters(config):
    params = config.get_params()
    copy = clone(config)
    assert copy is not config and type(copy) is type(config)
    assert copy.get_params() == params
    assert repr(copy) == repr(config)


def test_mixture_likelihood_is_a_normal_core_plus_a_broad_component():
    from skmerge.model.likelihoods import MixtureLikelihood

    intensity = np.array([1.0, 1.5, 9.0, -4.0], np.float32)
    predicted = np.array([1.1, 1.0, 1.0, 0.5], np.float32)
    sigma = np.array([0.2, 0.4, 0.5, 1.0], np.float32)
    fixed = MixtureLikelihood(outlier_fraction=0.05, outlier_scale=8.0, learn=False)
    expected = np.log(0.95 * stats.norm(predicted, sigma).pdf(intensity)
                      + 0.05 * stats.norm(predicted, 8 * sigma).pdf(intensity))
    np.testing.assert_allclose(fixed.log_prob(intensity, predicted, sigma).numpy(), expected, rtol=1e-5)
    assert fixed.build() is fixed
    learned = MixtureLikelihood(outlier_fraction=0.05, outlier_scale=8.0).build()
    np.testing.assert_allclose(learned.get_weights(), [0.05, 8.0], rtol=1e-5)
    np.testing.assert_allclose(learned.log_prob(intensity, predicted, sigma).numpy(), expected, rtol=1e-5)
    assert len(learned.trainable_variables) == 2
    restored = MixtureLikelihood().build(fitted=learned.get_weights())
    np.testing.assert_allclose(restored.get_weights(), [0.05, 8.0], rtol=1e-5)


def test_mixture_likelihood_with_a_student_t_core():
    from skmerge.calibration import normal_score
    from skmerge.model.likelihoods import MixtureLikelihood, make_likelihood

    intensity = np.array([1.0, 1.5, 9.0, -4.0], np.float32)
    predicted = np.array([1.1, 1.0, 1.0, 0.5], np.float32)
    sigma = np.array([0.2, 0.4, 0.5, 1.0], np.float32)
    expected = np.log(0.95 * stats.t(5.0, predicted, sigma).pdf(intensity)
                      + 0.05 * stats.t(5.0, predicted, 8 * sigma).pdf(intensity))
    fixed = MixtureLikelihood(outlier_fraction=0.05, outlier_scale=8.0, core_dof=5.0, learn=False)
    np.testing.assert_allclose(fixed.log_prob(intensity, predicted, sigma).numpy(), expected, rtol=1e-5)
    learned = MixtureLikelihood(outlier_fraction=0.05, outlier_scale=8.0, core_dof=5.0).build()
    np.testing.assert_allclose(learned.get_weights(), [0.05, 8.0, 5.0], rtol=1e-5)
    np.testing.assert_allclose(learned.log_prob(intensity, predicted, sigma).numpy(), expected, rtol=1e-5)
    assert len(learned.trainable_variables) == 3
    restored = MixtureLikelihood(core_dof=16.0).build(fitted=learned.get_weights())
    np.testing.assert_allclose(restored.get_weights(), [0.05, 8.0, 5.0], rtol=1e-5)
    assert make_likelihood("t-mixture").get_params() == MixtureLikelihood(core_dof=16.0).get_params()
    # The normal score of a residual is the normal quantile of the mixture's own tail.
    law = {"outlier_fraction": 0.05, "outlier_scale": 8.0, "dof": 5.0}
    tail = 0.95 * stats.t(5.0).sf(3.0) + 0.05 * stats.t(5.0).sf(3.0 / 8.0)
    np.testing.assert_allclose(normal_score([3.0, -3.0], law), [stats.norm.isf(tail), -stats.norm.isf(tail)])


def _two_piece_scipy(x, predicted, sigma, below, above):
    """log-density of the two-piece Student-t: each side the half of its own t, the
    scales set so that the density is continuous at the prediction."""
    peak = [stats.t(dof).pdf(0.0) for dof in (below, above)]
    scales = sigma * np.array(peak)[:, None] / np.sqrt(peak[0] * peak[1])
    return np.where(x < predicted, stats.t(below, predicted, scales[0]).logpdf(x),
                    stats.t(above, predicted, scales[1]).logpdf(x))


def test_two_piece_student_t_has_its_own_tail_on_each_side():
    from skmerge.model.likelihoods import TwoPieceStudentTLikelihood

    intensity = np.array([1.0, 1.5, 9.0, -4.0, 0.5], np.float32)
    predicted = np.array([1.1, 1.0, 1.0, 0.5, 0.5], np.float32)
    sigma = np.array([0.2, 0.4, 0.5, 1.0, 0.3], np.float32)
    law = TwoPieceStudentTLikelihood(dof_below=2.5, dof_above=40.0, learn_dof=False)
    expected = _two_piece_scipy(intensity, predicted, sigma, 2.5, 40.0)
    # The one-Student-t-per-observation kernel the model evaluates equals TFP's mixture
    # of the two half-laws, and scipy's halves.
    np.testing.assert_allclose(law.log_prob(intensity, predicted, sigma).numpy(), expected, rtol=1e-5)
    off_peak = intensity != predicted  # where both half-laws include their common edge
    np.testing.assert_allclose(law.distribution(predicted, sigma).log_prob(intensity).numpy()[off_peak],
                               expected[off_peak], rtol=1e-5)
    # A proper density, half of it on each side, continuous at the prediction.
    density = law.distribution(np.float32([0.5]), np.float32([0.3]))
    prob = lambda x: float(density.prob(np.float32([x])).numpy()[0])  # noqa: E731
    below, above = (integrate.quad(prob, *limits, limit=200)[0] for limits in ((-np.inf, 0.5), (0.5, np.inf)))
    assert below == pytest.approx(0.5, abs=1e-4) and above == pytest.approx(0.5, abs=1e-4)
    assert prob(0.5 - 1e-4) == pytest.approx(prob(0.5 + 1e-4), rel=1e-3)
    # A gross outlier below costs far less than one as far above.
    assert prob(-2.5) > 50 * prob(3.5)
    # With one ν on both sides it is the Student-t.
    same = TwoPieceStudentTLikelihood(dof_below=5.0, dof_above=5.0, learn_dof=False)
    np.testing.assert_allclose(same.log_prob(intensity, predicted, sigma).numpy(),
                               stats.t(5.0, predicted, sigma).logpdf(intensity), rtol=1e-5)
    assert law.build() is law and isinstance(make_likelihood("two-piece"), TwoPieceStudentTLikelihood)


def test_a_learned_two_piece_student_t_learns_both_tails():
    from skmerge.calibration import normal_score
    from skmerge.errors import ParameterError
    from skmerge.model.likelihoods import TwoPieceStudentTLikelihood

    learned = TwoPieceStudentTLikelihood(dof_below=3.0, dof_above=30.0).build()
    np.testing.assert_allclose(learned.get_weights(), [3.0, 30.0], rtol=1e-5)
    assert learned.names == ("dof_below", "dof_above") and len(learned.trainable_variables) == 2
    x = np.array([-2.0, 0.1, 3.0], np.float32)
    zeros, ones = np.zeros(3, np.float32), np.ones(3, np.float32)
    np.testing.assert_allclose(learned.log_prob(x, zeros, ones).numpy(), _two_piece_scipy(x, zeros, ones, 3.0, 30.0),
                               rtol=1e-5)
    with tf.GradientTape() as tape:
        total = tf.reduce_sum(learned.log_prob(x, zeros, ones))
    assert all(g is not None and np.isfinite(g.numpy()) for g in tape.gradient(total, learned.trainable_variables))
    restored = TwoPieceStudentTLikelihood().build(fitted=learned.get_weights())
    np.testing.assert_allclose(restored.get_weights(), [3.0, 30.0], rtol=1e-5)
    with pytest.raises(ParameterError, match="min_dof"):
        TwoPieceStudentTLikelihood(dof_below=3.0, min_dof=4.0).build()
    # Normal scores: each side's tail at its own width; one ν on both sides is the Student-t's.
    law = {"dof_below": 3.0, "dof_above": 30.0}
    peak = np.array([stats.t(3.0).pdf(0.0), stats.t(30.0).pdf(0.0)])
    scales = peak / np.sqrt(peak.prod())
    tails = [stats.t(3.0, 0.0, scales[0]).sf(2.0), stats.t(30.0, 0.0, scales[1]).sf(2.0)]
    np.testing.assert_allclose(normal_score([-2.0, 2.0], law), [-stats.norm.isf(tails[0]), stats.norm.isf(tails[1])])
    np.testing.assert_allclose(normal_score([-2.0, 2.0], {"dof_below": 5.0, "dof_above": 5.0}),
                               normal_score([-2.0, 2.0], {"dof": 5.0}))


def test_learned_student_t_starts_at_its_dof_and_is_trainable():
    learned = StudentTLikelihood(dof=6.0, learn_dof=True).build()
    np.testing.assert_allclose(learned.get_weights(), [6.0], rtol=1e-6)
    x = np.array([0.3, 2.0], np.float32)
    np.testing.assert_allclose(learned.log_prob(x, np.zeros(2, np.float32), np.ones(2, np.float32)).numpy(),
                               stats.t(6.0).logpdf(x), rtol=1e-5)
    assert len(learned.trainable_variables) == 1
    assert StudentTLikelihood(dof=6.0).build().dof == 6.0  # fixed: the object itself


def test_a_learned_student_t_stays_above_its_floor():
    from skmerge.errors import ParameterError

    learned = StudentTLikelihood(dof=6.0, learn_dof=True, min_dof=4.0).build()
    learned.log_dof.assign(-30.0)  # as far down as an optimiser could push it
    assert float(np.asarray(learned.dof)) == pytest.approx(4.0, abs=1e-6)
    x = np.array([0.3, 2.0], np.float32)
    np.testing.assert_allclose(learned.log_prob(x, np.zeros(2, np.float32), np.ones(2, np.float32)).numpy(),
                               stats.t(4.0).logpdf(x), rtol=1e-5)
    unbounded = StudentTLikelihood(dof=6.0, learn_dof=True).build()  # no floor by default
    unbounded.log_dof.assign(np.log(2.5))
    np.testing.assert_allclose(unbounded.get_weights(), [2.5], rtol=1e-6)
    restored = StudentTLikelihood(learn_dof=True, min_dof=4.0).build(fitted=[7.25])
    np.testing.assert_allclose(restored.get_weights(), [7.25], rtol=1e-6)
    with pytest.raises(ParameterError, match="min_dof"):
        StudentTLikelihood(dof=3.0, learn_dof=True, min_dof=4.0).build()
