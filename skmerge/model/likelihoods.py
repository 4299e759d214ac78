"""Likelihoods of an observed intensity given its prediction Σ·F² and its σ.

Each likelihood is a small configuration object (usable as a value in a parameter grid).
Its ``distribution(predicted, sigma)`` is the TFP law of the observed intensity, whose σ
is always its standard deviation (for the Student-t, its scale); the error model
(:mod:`skmerge.model.error_model`) refines σ before it gets there.
"""

import math
from numbers import Real

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.utils._param_validation import Interval

from .._tf import tf, tfb, tfd, tfp
from ..errors import ParameterError


class _Law:
    """What every likelihood, configured or learned, offers the model: the log-density
    of its ``distribution``."""

    def log_prob(self, intensity, predicted, sigma):
        """log p(intensity | predicted, sigma), elementwise."""
        return self.distribution(predicted, sigma).log_prob(intensity)


class _Likelihood(_Law, BaseEstimator):
    def build(self, fitted=None):
        """The likelihood a model uses: this object itself, which learns nothing."""
        return self


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

    How heavy the tails should be depends on the data: gross outliers (zingers, ice
    rings, overlaps) want few degrees of freedom, clean data many. With ``learn_dof``
    the model learns ν with the rest of the ELBO, starting from ``dof`` and kept above
    ``min_dof``; the fitted value is the merger's ``likelihood_dof_``.

    A floor such as ``min_dof=4`` (below it a Student-t has no finite fourth moment)
    keeps a few gross outliers from pulling ν, and with it the core's width, down to
    where strong reflections claim more precision than they have; measured, it lifts
    Laue data but not every simulated set (bench/RESULTS.md), so it is off by default.

    Parameters
    ----------
    dof : float, default=16.0
        Degrees of freedom ν (the starting value when learned); large ν approaches the
        normal likelihood.
    learn_dof : bool, default=False
        Learn ν.
    min_dof : float, default=0.0
        The lowest ν a learned ν can reach; ``dof`` must lie above it.
    """

    _parameter_constraints = {"dof": [Interval(Real, 0, None, closed="neither")], "learn_dof": ["boolean"],
                              "min_dof": [Interval(Real, 0, None, closed="left")]}

    def __init__(self, dof=16.0, learn_dof=False, min_dof=0.0):
        self.dof = dof
        self.learn_dof = learn_dof
        self.min_dof = min_dof

    def distribution(self, predicted, sigma):
        """``tfd.StudentT(dof, predicted, sigma)``."""
        return tfd.StudentT(float(self.dof), predicted, sigma)

    def build(self, fitted=None):
        """The likelihood a model uses: this object, or with ``learn_dof`` a
        :class:`LearnedStudentT` started at ``dof`` (or at a ``fitted`` ν)."""
        if not self.learn_dof:
            return self
        start = float(self.dof) if fitted is None else float(np.ravel(fitted)[0])
        if not start > self.min_dof:
            raise ParameterError(f"StudentTLikelihood: dof={start:g} must lie above min_dof={self.min_dof:g} "
                                 "when ν is learned; raise dof or lower min_dof")
        return LearnedStudentT(start, float(self.min_dof))


class LearnedStudentT(_Law, tf.Module):
    """The TensorFlow side of ``StudentTLikelihood(learn_dof=True)``: ν − ν_min a
    variable's exponential (a step of Adam then changes ν − ν_min by a constant factor,
    so ν moves from 16 to 5 or to 64 in a few hundred steps)."""

    names = ("dof",)

    def __init__(self, dof, min_dof=0.0, name="student_t"):
        super().__init__(name=name)
        self.min_dof = min_dof
        self.log_dof, self.dof = _learned_dof(dof, min_dof)

    def distribution(self, predicted, sigma):
        """``tfd.StudentT(ν, predicted, sigma)`` at the current ν."""
        return tfd.StudentT(tf.convert_to_tensor(self.dof), predicted, sigma)

    def get_weights(self):
        """np.array([ν]), computed in double precision (an exact round trip)."""
        return np.array([_dof_value(self.log_dof, self.min_dof)], np.float64)


def _learned_dof(dof, min_dof=0.0):
    """A learned ν started at ``dof``: the variable log(ν − ν_min), and ν as a tensor
    that follows it."""
    log_dof = tf.Variable(np.log(dof - min_dof), dtype=tf.float32, name="log_dof")
    return log_dof, tfp.util.DeferredTensor(log_dof, tfb.Chain([tfb.Shift(min_dof), tfb.Exp()]))


def _dof_value(log_dof, min_dof=0.0):
    """ν of a :func:`_learned_dof` variable, in double precision."""
    return min_dof + np.exp(float(log_dof.numpy()))


class TwoPieceStudentTLikelihood(_Likelihood):
    """A Student-t with its own tail below and above the prediction: ν₋ for observations
    weaker than Ipred, ν₊ for stronger ones.

    The usual gross outliers are one-sided, and which side depends on the kind of data: a
    zinger, an overlap or an ice ring adds intensity; a spot missed by integration, a
    harmonic or wavelength mis-assigned in a Laue pattern, or a shadowed spot observes a
    strong reflection near zero. A symmetric heavy tail cannot tell them apart, so with two
    observations of one reflection, one strong and one near zero, it finds "the strong
    one is the outlier" nearly as likely as the reverse, and the Wilson prior tips the
    balance to the small amplitude. Learned separately, the two tails say which side the
    outliers of these data lie on (measured: the simulated sets' zingers give ν₋ ≈ 5, ν₊ ≈
    2.2, thermolysin's stills 29 and 1.7, hypf 6.2 and 4.3, PYP nearly one ν, 3.1 and 2.9;
    bench/RESULTS.md).

    Each half is the half of a Student-t: for x < Ipred, t(ν₋, Ipred, σ₋); above, t(ν₊,
    Ipred, σ₊), with σ± = σ·c(ν±)/√(c(ν₋)c(ν₊)), c(ν) the density of a standard t(ν) at
    0. Each half then holds probability ½ and the density is continuous at Ipred, so the
    prediction is both the median and the mode of the observation; with ν₋ = ν₊ the law
    is ``tfd.StudentT(ν, Ipred, σ)``. The fitted values are the merger's
    ``likelihood_dof_below_`` and ``likelihood_dof_above_``.

    Parameters
    ----------
    dof_below, dof_above : float, default=16.0
        ν₋ and ν₊ (the starting values when learned).
    learn_dof : bool, default=True
        Learn both.
    min_dof : float, default=0.0
        The lowest ν a learned ν can reach; both starting values must lie above it.

    Examples
    --------
    >>> from skmerge import TwoPieceStudentTLikelihood
    >>> law = TwoPieceStudentTLikelihood(dof_below=2.0, dof_above=64.0, learn_dof=False)
    >>> [round(float(p), 4) for p in law.distribution([0.0], [1.0]).prob([[-4.0], [4.0]])[:, 0]]
    [0.0119, 0.0005]
    """

    _parameter_constraints = {"dof_below": [Interval(Real, 0, None, closed="neither")],
                              "dof_above": [Interval(Real, 0, None, closed="neither")],
                              "learn_dof": ["boolean"], "min_dof": [Interval(Real, 0, None, closed="left")]}

    def __init__(self, dof_below=16.0, dof_above=16.0, learn_dof=True, min_dof=0.0):
        self.dof_below = dof_below
        self.dof_above = dof_above
        self.learn_dof = learn_dof
        self.min_dof = min_dof

    def distribution(self, predicted, sigma):
        """The law as TFP composes it: an even ``tfd.Mixture`` of the lower half (a
        reflected ``tfd.HalfStudentT``) and the upper half."""
        return _two_piece(predicted, sigma, float(self.dof_below), float(self.dof_above))

    def log_prob(self, intensity, predicted, sigma):
        return _two_piece_log_prob(intensity, predicted, sigma, float(self.dof_below), float(self.dof_above))

    def build(self, fitted=None):
        """This object, or with ``learn_dof`` a :class:`LearnedTwoPieceStudentT` started
        at its values (or at ``fitted`` [ν₋, ν₊])."""
        if not self.learn_dof:
            return self
        start = [self.dof_below, self.dof_above] if fitted is None else np.ravel(fitted)
        start = [float(v) for v in start]
        if not min(start) > self.min_dof:
            raise ParameterError(f"TwoPieceStudentTLikelihood: dof_below and dof_above ({start[0]:g}, "
                                 f"{start[1]:g}) must lie above min_dof={self.min_dof:g} when they are learned")
        return LearnedTwoPieceStudentT(*start, float(self.min_dof))


def _half_scales(sigma, dof_below, dof_above):
    """σ₋, σ₊ of a two-piece Student-t: σ·c(ν±)/√(c(ν₋)c(ν₊)), c(ν) a standard t's density at 0."""
    half_gap = 0.5 * (tfd.StudentT(dof_below, 0.0, 1.0).log_prob(0.0) - tfd.StudentT(dof_above, 0.0, 1.0).log_prob(0.0))
    return sigma * tf.exp(half_gap), sigma * tf.exp(-half_gap)


def _two_piece(predicted, sigma, dof_below, dof_above):
    predicted, sigma = (tf.convert_to_tensor(v, tf.float32) for v in (predicted, sigma))
    dof_below, dof_above = (tf.convert_to_tensor(v, tf.float32) for v in (dof_below, dof_above))
    below, above = _half_scales(sigma, dof_below, dof_above)
    lower = tfd.TransformedDistribution(tfd.HalfStudentT(dof_below, -predicted, below), tfb.Scale(-1.0))
    upper = tfd.HalfStudentT(dof_above, predicted, above)
    even = tfd.Categorical(probs=tf.fill(tf.concat([tf.shape(predicted), [2]], 0), 0.5))
    return tfd.Mixture(even, [lower, upper])


def _two_piece_log_prob(intensity, predicted, sigma, dof_below, dof_above):
    """The two-piece law's log-density, as the Student-t of each observation's side
    (tested equal to :func:`_two_piece`, whose mixture evaluates both half-laws and their
    log-sum-exp). One Student-t with a ν per observation needs a log-gamma per observation:
    2.5× slower on 200,000 observations with their gradients."""
    dof_below, dof_above = (tf.convert_to_tensor(v, tf.float32) for v in (dof_below, dof_above))
    below, above = _half_scales(sigma, dof_below, dof_above)
    return tf.where(intensity < predicted, tfd.StudentT(dof_below, predicted, below).log_prob(intensity),
                    tfd.StudentT(dof_above, predicted, above).log_prob(intensity))


class LearnedTwoPieceStudentT(_Law, tf.Module):
    """The TensorFlow side of ``TwoPieceStudentTLikelihood(learn_dof=True)``: each ν as
    :class:`LearnedStudentT` learns its one."""

    names = ("dof_below", "dof_above")

    def __init__(self, dof_below, dof_above, min_dof=0.0, name="two_piece_student_t"):
        super().__init__(name=name)
        self.min_dof = min_dof
        self.log_dof_below, self.dof_below = _learned_dof(dof_below, min_dof)
        self.log_dof_above, self.dof_above = _learned_dof(dof_above, min_dof)

    def distribution(self, predicted, sigma):
        return _two_piece(predicted, sigma, tf.convert_to_tensor(self.dof_below), tf.convert_to_tensor(self.dof_above))

    def log_prob(self, intensity, predicted, sigma):
        return _two_piece_log_prob(intensity, predicted, sigma, tf.convert_to_tensor(self.dof_below),
                                   tf.convert_to_tensor(self.dof_above))

    def get_weights(self):
        """np.array([ν₋, ν₊]), in double precision."""
        return np.array([_dof_value(v, self.min_dof) for v in (self.log_dof_below, self.log_dof_above)], np.float64)


class MixtureLikelihood(_Likelihood):
    """I ~ (1 − π)·core(Ipred, σ) + π·core(Ipred, κσ): most observations as their σ say,
    a fraction π of gross outliers (zingers, overlaps, ice) κ times as wide.

    Unlike a Student-t alone, whose tails and core share one shape parameter, the mixture
    keeps the core of width σ however many gross outliers the data hold, so the precision
    the bulk of the observations lends the amplitudes (and so SIGF) stays what their σ
    say. The core is normal (``core_dof=None``) or a Student-t with ν degrees of freedom,
    for data whose bulk errors are themselves heavier-tailed than normal (partiality,
    overlaps); both components then share ν. π, κ and ν are learned with the rest of the
    model unless ``learn`` is False; the fitted values are the merger's
    ``likelihood_outlier_fraction_``, ``likelihood_outlier_scale_`` and (with a
    Student-t core) ``likelihood_dof_``.

    Parameters
    ----------
    outlier_fraction : float, default=0.02
        π (the starting value when learned).
    outlier_scale : float, default=10.0
        κ > 1 (the starting value when learned).
    core_dof : float or None, default=None
        ν of a Student-t core (the starting value when learned); None: a normal core.
    learn : bool, default=True

    Examples
    --------
    >>> from skmerge import MixtureLikelihood
    >>> law = MixtureLikelihood(core_dof=8.0).distribution([0.0], [1.0])
    >>> round(float(law.prob([0.0])[0]), 4)  # 0.98 × t₈(0) + 0.02 × t₈(0)/10
    0.3797
    """

    _parameter_constraints = {
        "outlier_fraction": [Interval(Real, 0, 1, closed="neither")],
        "outlier_scale": [Interval(Real, 1, None, closed="neither")],
        "core_dof": [Interval(Real, 0, None, closed="neither"), None],
        "learn": ["boolean"],
    }

    def __init__(self, outlier_fraction=0.02, outlier_scale=10.0, core_dof=None, learn=True):
        self.outlier_fraction = outlier_fraction
        self.outlier_scale = outlier_scale
        self.core_dof = core_dof
        self.learn = learn

    def distribution(self, predicted, sigma):
        """The two-component mixture (``tfd.MixtureSameFamily`` of normals or Student-t's)."""
        dof = None if self.core_dof is None else float(self.core_dof)
        return _mixture(predicted, sigma, float(self.outlier_fraction), float(self.outlier_scale), dof)

    def build(self, fitted=None):
        """This object, or with ``learn`` a :class:`LearnedMixture` started at its values
        (or at ``fitted`` [π, κ] or [π, κ, ν])."""
        if not self.learn:
            return self
        if fitted is None:
            start = [self.outlier_fraction, self.outlier_scale] + ([] if self.core_dof is None else [self.core_dof])
        else:
            start = np.ravel(fitted)
        return LearnedMixture(*(float(v) for v in start))


def _mixture(predicted, sigma, fraction, scale, dof=None):
    fraction = tf.convert_to_tensor(fraction, tf.float32)
    weights = tf.stack([1.0 - fraction, fraction])
    predicted, sigma = (tf.convert_to_tensor(v, tf.float32) for v in (predicted, sigma))
    widths = tf.stack([sigma, sigma * scale], axis=-1)
    components = (tfd.Normal(predicted[..., None], widths) if dof is None
                  else tfd.StudentT(dof, predicted[..., None], widths))
    return tfd.MixtureSameFamily(tfd.Categorical(probs=weights), components)


class LearnedMixture(_Law, tf.Module):
    """The TensorFlow side of ``MixtureLikelihood(learn=True)``: π through a sigmoid, κ
    as 1 + exp(·), a Student-t core's ν through an exponential (as :class:`LearnedStudentT`)."""

    def __init__(self, fraction, scale, dof=None, name="mixture"):
        super().__init__(name=name)
        self.fraction_raw = tf.Variable(np.log(fraction / (1 - fraction)), dtype=tf.float32, name="fraction_raw")
        self.scale_raw = tf.Variable(np.log(scale - 1.0), dtype=tf.float32, name="scale_raw")
        self.fraction = tfp.util.DeferredTensor(self.fraction_raw, tfb.Sigmoid())
        self.scale = tfp.util.DeferredTensor(self.scale_raw, tfb.Chain([tfb.Shift(1.0), tfb.Exp()]))
        self.log_dof, self.dof = (None, None) if dof is None else _learned_dof(dof)
        self.names = ("outlier_fraction", "outlier_scale") + (() if dof is None else ("dof",))

    def distribution(self, predicted, sigma):
        dof = None if self.dof is None else tf.convert_to_tensor(self.dof)
        return _mixture(predicted, sigma, tf.convert_to_tensor(self.fraction), tf.convert_to_tensor(self.scale), dof)

    def get_weights(self):
        """np.array([π, κ]) or [π, κ, ν], computed in double precision from the variables
        (so that rebuilding from them restores the variables exactly)."""
        fraction_raw, scale_raw = (float(v.numpy()) for v in (self.fraction_raw, self.scale_raw))
        weights = [1 / (1 + np.exp(-fraction_raw)), 1 + np.exp(scale_raw)]
        if self.log_dof is not None:
            weights.append(_dof_value(self.log_dof))
        return np.array(weights, np.float64)


LIKELIHOODS = {
    "normal": NormalLikelihood,
    "laplace": LaplaceLikelihood,
    "studentt": lambda: StudentTLikelihood(learn_dof=True),
    "mixture": MixtureLikelihood,
    "t-mixture": lambda: MixtureLikelihood(core_dof=16.0),
    "two-piece": TwoPieceStudentTLikelihood,
}


def make_likelihood(likelihood):
    """The likelihood object for an estimator's ``likelihood`` parameter: one of
    "normal", "laplace", "studentt" (ν learned, from 16), "mixture" (a normal core and
    a broad component) and "t-mixture" (the same with a Student-t core, ν learned from
    16), or a likelihood object, returned as is."""
    if isinstance(likelihood, str):
        return LIKELIHOODS[likelihood]()
    return likelihood
