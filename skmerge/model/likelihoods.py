"""Likelihoods of an observed intensity given its prediction Σ·F² and its σ.

Each likelihood is a small configuration object (usable as a value in a parameter grid).
Its ``distribution(predicted, sigma)`` is the TFP law of the observed intensity, whose σ
is always its standard deviation (for the Student-t, its scale); the error model
(:mod:`skmerge.model.error_model`) refines σ before it gets there.
"""

import math
from numbers import Real

from sklearn.base import BaseEstimator
from sklearn.utils._param_validation import Interval

from .._tf import tfd


class _Likelihood(BaseEstimator):
    def log_prob(self, intensity, predicted, sigma):
        """log p(intensity | predicted, sigma), elementwise."""
        return self.distribution(predicted, sigma).log_prob(intensity)


class NormalLikelihood(_Likelihood):
    """I ~ Normal(Ipred, σ)."""

    def distribution(self, predicted, sigma):
        """``tfd.Normal(predicted, sigma)``."""
        return tfd.Normal(predicted, sigma)


class LaplaceLikelihood(_Likelihood):
    """I ~ Laplace(Ipred, b) with b = σ/√2, so that its standard deviation is σ."""

    def distribution(self, predicted, sigma):
        """``tfd.Laplace(predicted, sigma / √2)``."""
        return tfd.Laplace(predicted, sigma / math.sqrt(2.0))


class StudentTLikelihood(_Likelihood):
    """I ~ StudentT(dof, Ipred, σ): heavy tails make the fit robust to outliers.

    Parameters
    ----------
    dof : float, default=16.0
        Degrees of freedom ν; large ν approaches the normal likelihood.
    """

    _parameter_constraints = {"dof": [Interval(Real, 0, None, closed="neither")]}

    def __init__(self, dof=16.0):
        self.dof = dof

    def distribution(self, predicted, sigma):
        """``tfd.StudentT(dof, predicted, sigma)``."""
        return tfd.StudentT(float(self.dof), predicted, sigma)


LIKELIHOODS = {
    "normal": NormalLikelihood,
    "laplace": LaplaceLikelihood,
    "studentt": StudentTLikelihood,
}


def make_likelihood(likelihood):
    """The likelihood object for an estimator's ``likelihood`` parameter: one of
    "normal", "laplace" and "studentt" (ν = 16), or a likelihood object, returned as is."""
    if isinstance(likelihood, str):
        return LIKELIHOODS[likelihood]()
    return likelihood
