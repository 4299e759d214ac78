"""The sandwich correction of SIGF: the posterior's width under a likelihood that is not
the data's.

A posterior's variance is the inverse of the information its likelihood claims, the
curvature H = −∂² log p/∂F² summed over a reflection's observations. That is the
variance of the estimate only when the likelihood is the data's own law. skmerge's
likelihood is heavy-tailed (a Student-t whose ν is learned) so that gross outliers lose
their pull; with 1 % of them among Gaussian observations the fitted ν falls near 3 and
the error model narrows the core to keep its width, and such a t claims more than
Gaussian residuals deliver: the variance of its score J = E[(∂ log p/∂F)²] is larger
than H (J/H = 1.24 for the simulated sets' fit on standard normal draws, bench/RESULTS.md,
session 29). The variance of an M-estimate is then J/H² (the "sandwich", Huber 1967;
White 1982), not 1/H: SIGF² must be multiplied by J/H.

J and H are pooled over every reflection with two or more observations, each scored at
its reflection's posterior mean with the scales and the noise model at their fitted
values. The scores are residuals about a mean fitted to them, which shrinks them, and a
reflection's n observations hold n − 1 residuals' worth of spread: each reflection's
Σ score² is multiplied by n/(n − 1) (Bessel's correction; the leverage of each
observation would be exact for a Gaussian likelihood, but on the simulated sets it
overshot, most at low multiplicity, where a pair's curvatures are far from equal). The
scores are not centred on their reflection's mean: where the prior pulls the posterior
mean off the data, that pull is part of the estimate's error too (centring them left the
simulated sets' z SD 0.03 further above 1). Misfit of the scale model widens the
residuals as outliers do, and enters J the same way (a Normal likelihood with honest σ
on simulated data, two shared layers: J/H 1.27, z SD 1.18 → 1.05). The
ratio is one number for the whole fit, because it measures the likelihood's shape
against the residuals', which every reflection shares; a reflection's own few residuals
only add noise to its SIGF (each reflection's own ratio took the simulated time-resolved
set's z SD from 1.40 to 1.86). It widens every fitted reflection alike, also the few whose
posterior is mostly prior (weighting it by the likelihood's share of each reflection's
precision came out 0.01 further from 1 on the simulated sets).
"""

import numpy as np

from .._tf import tf
from .marginals import row_pieces


def sandwich_ratio(model, data_chunks, n_reflections):
    """J/H of a trained model's likelihood on its training data: the factor of the
    posterior variances that makes them the variances of the estimates.

    Parameters
    ----------
    model : MergingModel
        Trained; its scales, noise model and likelihood are held at their fitted values,
        and the amplitudes at their posterior means.
    data_chunks : callable
        Returns an iterator over the training data in pieces (dicts of tensors as the
        model reads them, never splitting a Laue spot); called once.
    n_reflections : int

    Returns
    -------
    float
        The pooled ratio, 1.0 when no reflection has two observations (or none has a
        positive curvature).

    Examples
    --------
    Every fit computes it (``sandwich_ratio_``); on simulated data without outliers the
    defaults' Student-t is nearly the data's law:

    >>> from skmerge import VariationalMerger
    >>> from skmerge.datasets import make_unmerged
    >>> X, _ = make_unmerged(n_images=20, random_state=0)
    >>> merger = VariationalMerger(mlp_layers=2, max_iter=300, random_state=0).fit(X)
    >>> 0.8 < merger.sandwich_ratio_ < 1.25
    True
    """
    f_mean = model.amplitude_moments()[0].numpy().astype(np.float64)
    score_sq, curvature = np.zeros(n_reflections), np.zeros(n_reflections)
    count = np.zeros(n_reflections, np.int64)
    for refl, intensity, sigma, scale, offset in row_pieces(model, data_chunks()):
        scale, offset = tf.constant(scale, tf.float32), tf.constant(offset, tf.float32)
        score, minus_hessian = likelihood_derivatives(model, f_mean[refl], intensity, sigma,
                                                      lambda f: scale * tf.square(f) + offset)
        score_sq += np.bincount(refl, score**2, n_reflections)
        curvature += np.bincount(refl, minus_hessian, n_reflections)
        count += np.bincount(refl, minlength=n_reflections)
    pooled = (count >= 2) & (curvature > 0)
    if not pooled.any():
        return 1.0
    bessel = count[pooled] / (count[pooled] - 1)
    return float(np.sum(bessel * score_sq[pooled]) / np.sum(curvature[pooled]))


def likelihood_derivatives(model, x, intensity, sigma, predicted):
    """∂ log p/∂x and −∂² log p/∂x² of every row's likelihood at ``x`` (one value per
    row), the rows' predicted intensities being ``predicted(x)`` (a function of tensors)."""
    x = tf.constant(x, tf.float32)
    data = {"intensity": tf.constant(intensity, tf.float32), "sigma": tf.constant(sigma, tf.float32)}
    with tf.GradientTape() as outer:
        outer.watch(x)
        with tf.GradientTape() as inner:
            inner.watch(x)
            log_likelihood = model.observation_log_likelihood(data, predicted(x))
        # Each row's log-likelihood depends on its own x alone, so the gradient of the sum
        # is every row's own derivative.
        score = inner.gradient(log_likelihood, x)
    curvature = -outer.gradient(score, x)
    return score.numpy().astype(np.float64), curvature.numpy().astype(np.float64)


def applied_ratio(ratio):
    """The factor the merged table applies to the posterior variances of a fit whose
    sandwich ratio is ``ratio``: the ratio, but never below 1. Residuals narrower than
    the likelihood claims come from the scale model's own freedom absorbing them, not from
    a likelihood wider than the noise: simulated stills, whose per-image layers have much
    freedom, gave J/H 0.95 with a z SD of 1.43.

    Examples
    --------
    >>> applied_ratio(1.2), applied_ratio(0.9)
    (1.2, 1.0)
    """
    return max(float(ratio), 1.0)


def shared_correlation(correlation, variance, mate_variance, ratio, mate_ratio=None):
    """The correlation of Friedel halves whose variances are multiplied by ``ratio`` and
    ``mate_ratio`` (the same by default) that keeps the variance of their difference
    (DANO) as it was.

    The excess spread the ratio measures is shared by the two halves of a pair: on the
    simulated anomalous sets the z of F was 1.12 (robust) while that of DANO, which
    cancels what the halves share (their scales, measured on the same images), was 0.96,
    and widening both halves independently took DANO's to 0.90. The extra variance is
    therefore added to the halves' covariance as well, half of each half's: Var(F₊ − F₋)
    stands, and Var of their mean grows by the mean of the extra variances (while the
    correlation stays within ±1; halves widened very unequally widen DANO a little).

    Examples
    --------
    >>> import numpy as np
    >>> rho = shared_correlation(np.array([0.0]), np.array([1.0]), np.array([1.0]), 1.5)
    >>> float(rho[0]), float(1.5 * (2 - 2 * rho[0]))
    (0.3333333333333333, 2.0)
    """
    mate_ratio = ratio if mate_ratio is None else mate_ratio
    product = np.sqrt(variance * mate_variance)
    shared = (ratio - 1) * variance + (mate_ratio - 1) * mate_variance + 2 * correlation * product
    widened = np.divide(shared, 2 * np.sqrt(ratio * mate_ratio) * product,
                        out=np.asarray(correlation, np.float64).copy(), where=product > 0)
    return np.clip(widened, -1.0, 1.0)
