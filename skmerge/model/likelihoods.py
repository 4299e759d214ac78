"""Likelihoods of an observed intensity given its prediction Σ·F² and its σ.

Each likelihood is a small configuration object (usable as a value in a parameter grid)
whose ``log_prob`` works on TensorFlow tensors.
"""

import math

from sklearn.base import BaseEstimator

from .._tf import tf


class NormalLikelihood(BaseEstimator):
    """I ~ Normal(Ipred, σ)."""

    def log_prob(self, intensity, predicted, sigma):
        z = (intensity - predicted) / sigma
        return -0.5 * tf.square(z) - tf.math.log(sigma) - 0.5 * math.log(2 * math.pi)


class LaplaceLikelihood(BaseEstimator):
    """I ~ Laplace(Ipred, b) with b = σ/√2, so that its standard deviation is σ."""

    def log_prob(self, intensity, predicted, sigma):
        b = sigma / math.sqrt(2.0)
        return -tf.abs(intensity - predicted) / b - tf.math.log(2 * b)


class StudentTLikelihood(BaseEstimator):
    """I ~ StudentT(dof, Ipred, σ): heavy tails make the fit robust to outliers.

    Parameters
    ----------
    dof : float, default=16.0
        Degrees of freedom ν; large ν approaches the normal likelihood.
    """

    def __init__(self, dof=16.0):
        self.dof = dof

    def log_prob(self, intensity, predicted, sigma):
        nu = float(self.dof)
        z = (intensity - predicted) / sigma
        const = math.lgamma((nu + 1) / 2) - math.lgamma(nu / 2) - 0.5 * math.log(nu * math.pi)
        return const - tf.math.log(sigma) - (nu + 1) / 2 * tf.math.log1p(tf.square(z) / nu)


LIKELIHOODS = {
    "normal": NormalLikelihood,
    "laplace": LaplaceLikelihood,
    "studentt": StudentTLikelihood,
}


def make_likelihood(likelihood, dof):
    """The likelihood object for an estimator's ``likelihood`` and ``dof`` parameters."""
    if isinstance(likelihood, str):
        return StudentTLikelihood(dof) if likelihood == "studentt" else LIKELIHOODS[likelihood]()
    return likelihood
