"""Priors on the structure-factor amplitudes.

A prior is a configuration object (usable as a value in a parameter grid); ``build``
turns it into the TensorFlow-side distribution for one set of reflections, expressed in
the merger's standardised units (⟨F²/ε⟩ = 1).
"""

import math
from numbers import Real

import numpy as np
import pandas as pd
import reciprocalspaceship as rs
from sklearn.base import BaseEstimator
from sklearn.utils._param_validation import Interval, StrOptions

from .._tf import tf, tfd, tfp
from ..errors import InputError
from ..symmetry import lookup_hkl, map_to_asu, pack_hkl
from .likelihoods import StudentTLikelihood, make_likelihood
from .posterior import PositiveTruncatedNormal


class WilsonPrior(BaseEstimator):
    """Wilson's random-atom prior: Rayleigh for acentric, half-normal for centric F.

    Acentric p(F) = 2F/(εΣ) exp(−F²/(εΣ)); centric p(F) = √(2/(πεΣ)) exp(−F²/(2εΣ)).
    Σ is the mean intensity at the reflection's resolution. By default it is the data's
    own mean I/ε in shells of resolution (estimated once, from a quick scaled merge, as
    French & Wilson do), so the amplitudes keep the data's fall-off and the scale model
    only has to learn what varies between observations. With ``b_factor``, Σ instead
    falls off as exp(−B/(2d²)) (the convention ⟨I⟩ ∝ exp(−2B sin²θ/λ²)), normalised to the
    data's mean; ``b_factor=0`` gives a flat prior (careless's), leaving the whole
    fall-off to the scale model, which then needs dHKL among its metadata.

    Parameters
    ----------
    b_factor : float, optional
        Wilson B in Å² of a parametric fall-off.
    """

    _parameter_constraints = {"b_factor": [None, Real]}

    def __init__(self, b_factor=None):
        self.b_factor = b_factor

    def build(self, reflections):
        """The prior of ``reflections`` (a ``Reflections``, with ``mean_intensity`` set).

        Returns
        -------
        WilsonDistribution
        """
        return WilsonDistribution(reflections.centric, wilson_mean_square(reflections, self.b_factor))


def wilson_mean_square(reflections, b_factor=None):
    """εΣ of every reflection: Σ the data's mean I/ε at its resolution, or with
    ``b_factor`` a fall-off exp(−B/(2d²)) normalised to the data's mean."""
    sigma = reflections.mean_intensity
    if b_factor is not None:
        falloff = np.exp(-float(b_factor) / (2 * reflections.dhkl.astype(np.float64) ** 2))
        sigma = falloff * sigma.mean() / falloff.mean()
    return reflections.epsilon * sigma


class ReferencePrior(BaseEstimator):
    """Amplitudes centred on a reference data set; Wilson where the reference has none.

    The reference's amplitudes are brought to the data's units by one factor (matching
    the mean of F_ref²/ε to the data's mean intensity over the shared reflections);
    reflections it lacks get the Wilson prior.

    Parameters
    ----------
    reference : rs.DataSet or path
        Merged data with amplitudes (the first SFAmplitude column, or ``F``) and their σ
        (its Stddev partner, or ``SIGF``); intensities are used (F = √max(I, 0)) when
        there are no amplitudes. An MTZ path is read with reciprocalspaceship.
    kind : {"normal", "laplace", "studentt"}, default="normal"
        Shape of the prior around F_ref.
    dof : float, default=4.0
        Degrees of freedom of the Student-t prior.
    width : float, optional
        Width of the prior. None (default) uses the reference's σ; a number sets a
        constant width as a fraction of the reference's root-mean-square amplitude.
    """

    _parameter_constraints = {
        # A DataFrame or the path of an MTZ file; build() reports what it cannot read.
        "reference": "no_validation",
        "kind": [StrOptions({"normal", "laplace", "studentt"})],
        "dof": [Interval(Real, 0, None, closed="neither")],
        "width": [None, Interval(Real, 0, None, closed="neither")],
    }

    def __init__(self, reference, kind="normal", dof=4.0, width=None):
        self.reference = reference
        self.kind = kind
        self.dof = dof
        self.width = width

    def build(self, reflections):
        """The prior of ``reflections`` (a ``Reflections``, with ``mean_intensity`` set).

        Returns
        -------
        ReferenceDistribution
        """
        if self.kind not in ("normal", "laplace", "studentt"):
            raise InputError(f"ReferencePrior kind={self.kind!r}: use 'normal', 'laplace' or 'studentt'.")
        hkl, f_ref, sig_ref = _reference_amplitudes(self.reference, reflections)
        row = lookup_hkl(hkl, reflections.hkl)
        found = row >= 0
        if found.sum() == 0:
            raise InputError("the reference data set shares no reflection with the data.")
        f = np.zeros(len(row))
        s = np.ones(len(row))
        f[found] = f_ref[row[found]]
        s[found] = sig_ref[row[found]]
        eps = reflections.epsilon
        norm = math.sqrt(np.mean(f[found] ** 2 / eps[found]) / np.mean(reflections.mean_intensity[found]))
        f, s = f / norm, s / norm
        if self.width is not None:
            s = np.full_like(s, float(self.width) * math.sqrt(np.mean(f[found] ** 2)))
        s = np.maximum(s, 1e-3 * math.sqrt(np.mean(f[found] ** 2)))
        wilson = WilsonDistribution(reflections.centric, eps * reflections.mean_intensity)
        kind = StudentTLikelihood(float(self.dof)) if self.kind == "studentt" else make_likelihood(self.kind)
        return ReferenceDistribution(found, f, s, kind, wilson)


def make_prior(prior):
    """The prior object for an estimator's ``prior`` parameter: "wilson",
    "double-wilson" (``DoubleWilsonPrior()``), or a prior object, returned as is."""
    if prior == "double-wilson":
        from .double_wilson import DoubleWilsonPrior

        return DoubleWilsonPrior()
    return WilsonPrior() if prior == "wilson" else prior


class _PerReflection(tfd.Distribution):
    """Scalar amplitudes with one batch member per reflection, each following ``chosen``
    where ``mask`` is true and ``other`` elsewhere (two distributions over all
    reflections); samples of ``chosen`` pass through ``_fold``."""

    def __init__(self, mask, chosen, other, parameters, name):
        self._mask, self._chosen, self._other = mask, chosen, other
        super().__init__(
            dtype=tf.float32,
            reparameterization_type=tfd.FULLY_REPARAMETERIZED,
            validate_args=False,
            allow_nan_stats=True,
            parameters=parameters,
            name=name,
        )

    def _select(self, chosen, other):
        return tf.where(self._mask, chosen, other)

    def _fold(self, samples):
        return samples

    def _log_prob(self, f):
        return self._select(self._chosen.log_prob(f), self._other.log_prob(f))

    def _sample_n(self, n, seed=None):
        chosen_seed, other_seed = tfp.random.split_seed(seed, n=2)
        chosen = self._fold(self._chosen.sample(n, seed=chosen_seed))
        return self._select(chosen, self._other.sample(n, seed=other_seed))

    def _batch_shape(self):
        return self._mask.shape[:1]

    def _batch_shape_tensor(self):
        return tf.shape(self._mask)[:1]

    def _event_shape(self):
        return tf.TensorShape([])

    def _event_shape_tensor(self):
        return tf.constant([], tf.int32)


class _AroundValues(_PerReflection):
    """Amplitudes following ``law(loc, scale)`` (a location-scale law of per-reflection
    values) where ``mask`` is true and ``other`` elsewhere."""

    def __init__(self, mask, loc, scale, law, other, parameters, name):
        with tf.name_scope(name) as name:
            self.loc = tf.cast(loc, tf.float32)
            self.scale = tf.cast(scale, tf.float32)
            super().__init__(tf.convert_to_tensor(mask, tf.bool), law(self.loc, self.scale), other, parameters, name)


# E[Fᵏ] / scaleᵏ for k = 1…4: Rayleigh (Weibull with concentration 2) and half-normal.
_ACENTRIC_MOMENTS = (0.5 * math.sqrt(math.pi), 1.0, 0.75 * math.sqrt(math.pi), 2.0)
_CENTRIC_MOMENTS = (math.sqrt(2 / math.pi), 1.0, 2 * math.sqrt(2 / math.pi), 3.0)


class WilsonDistribution(_PerReflection):
    """Wilson's distribution of amplitudes with mean square v = E[F²] = εΣ per reflection:
    acentric ``tfd.Weibull(concentration=2, scale=√v)`` (Rayleigh), centric
    ``tfd.HalfNormal(scale=√v)``, chosen per reflection by ``centric``.

    Parameters
    ----------
    centric : bool array of shape (n_reflections,)
    mean_square : float array of shape (n_reflections,)
        εΣ, the mean of F² of every reflection.
    """

    def __init__(self, centric, mean_square, name="WilsonDistribution"):
        parameters = dict(locals())
        with tf.name_scope(name) as name:
            self.centric = tf.convert_to_tensor(centric, tf.bool)
            self.mean_square = tf.cast(mean_square, tf.float32)
            root = tf.sqrt(self.mean_square)
            super().__init__(self.centric, tfd.HalfNormal(scale=root), tfd.Weibull(concentration=2.0, scale=root),
                             parameters, name)

    def _mean(self):
        return self._select(self._chosen.mean(), self._other.mean())

    def _variance(self):
        return self._select(self._chosen.variance(), self._other.variance())

    def raw_moments(self):
        """E[F], E[F²], E[F³], E[F⁴] of every reflection."""
        root = tf.sqrt(self.mean_square)
        return tuple(
            self._select(c, a) * root**k
            for k, (c, a) in enumerate(zip(_CENTRIC_MOMENTS, _ACENTRIC_MOMENTS), start=1)
        )

    def expected_log_prob(self, posterior, samples):
        """E_q[log p(F)] per reflection under the posterior q.

        log p is linear in F² (and, for acentrics, in log F), so E_q[log p] follows from
        q's E[F²] in closed form, except E[log F], which is estimated from the posterior
        ``samples`` (shape (n_samples, n_reflections)).
        """
        m2 = posterior.raw_moments()[1]
        v = self.mean_square
        mean_log_f = tf.reduce_mean(tf.math.log(samples + 1e-12), axis=0)
        acentric = math.log(2.0) - tf.math.log(v) + mean_log_f - m2 / v
        centric = 0.5 * tf.math.log(2.0 / (math.pi * v)) - m2 / (2 * v)
        return self._select(centric, acentric)

    def take(self, rows):
        """The distribution of the reflections ``rows``."""
        return WilsonDistribution(tf.gather(self.centric, rows), tf.gather(self.mean_square, rows))


class ReferenceDistribution(_AroundValues):
    """Amplitudes around a reference F_ref with width σ where ``found``, Wilson elsewhere.

    The law around F_ref is ``kind.distribution(F_ref, σ)`` of a likelihood object
    (``tfd.Normal``, ``tfd.Laplace`` or ``tfd.StudentT``: the same laws, with the same
    meaning of σ, as the likelihoods). Samples of it are folded to |F|. The raw moments
    are those of Normal(F_ref, σ), the reference's value and uncertainty, whatever the
    shape: a Student-t with few degrees of freedom has no fourth moment.

    Parameters
    ----------
    found : bool array of shape (n_reflections,)
        Reflections the reference has.
    loc, scale : float arrays of shape (n_reflections,)
        F_ref and σ (ignored where not ``found``).
    kind : likelihood object
        :class:`~skmerge.model.likelihoods.NormalLikelihood`, ``LaplaceLikelihood`` or
        ``StudentTLikelihood``.
    wilson : WilsonDistribution
        The prior of the reflections the reference lacks.
    """

    def __init__(self, found, loc, scale, kind, wilson, name="ReferenceDistribution"):
        parameters = dict(locals())
        self.kind, self.wilson = kind, wilson
        super().__init__(found, loc, scale, kind.distribution, wilson, parameters, name)

    @property
    def found(self):
        return self._mask

    @property
    def _reference(self):
        """The law around F_ref."""
        return self._chosen

    def _fold(self, samples):
        return tf.abs(samples)  # amplitudes are positive

    def raw_moments(self):
        """E[F], E[F²], E[F³], E[F⁴] of every reflection."""
        mu, s2 = self.loc, tf.square(self.scale)
        reference = (mu, mu * mu + s2, mu**3 + 3 * mu * s2, mu**4 + 6 * mu * mu * s2 + 3 * s2 * s2)
        return tuple(self._select(r, w) for r, w in zip(reference, self.wilson.raw_moments()))

    def _mean(self):
        return self.raw_moments()[0]

    def _variance(self):
        return self._select(tf.square(self.scale), self.wilson.variance())

    def expected_log_prob(self, posterior, samples):
        """E_q[log p(F)] per reflection: in closed form from q's first two raw moments
        for a normal reference and for the Wilson part, else the mean of log p over the
        posterior ``samples``."""
        if isinstance(self._reference, tfd.Normal):
            m1, m2, _, _ = posterior.raw_moments()
            s2 = tf.square(self.scale)
            reference = (
                -tf.math.log(self.scale)
                - 0.5 * math.log(2 * math.pi)
                - (m2 - 2 * self.loc * m1 + tf.square(self.loc)) / (2 * s2)
            )
        else:
            reference = tf.reduce_mean(self._reference.log_prob(samples), axis=0)
        return self._select(reference, self.wilson.expected_log_prob(posterior, samples))

    def take(self, rows):
        """The distribution of the reflections ``rows``."""
        return ReferenceDistribution(
            tf.gather(self.found, rows), tf.gather(self.loc, rows), tf.gather(self.scale, rows),
            self.kind, self.wilson.take(rows),
        )


class PreviousPosteriorDistribution(_AroundValues):
    """The prior of an online update (assumed density filtering): where ``seen``, the
    posterior of an earlier fit, ``PositiveTruncatedNormal(loc, scale)``; elsewhere
    ``other`` (the merger's own prior, a distribution over the same reflections).

    Conditioning on the images of a new chunk with the earlier posterior as the prior
    is Bayes' rule applied one chunk at a time: the earlier images' evidence enters
    through that posterior, so they need not be kept.

    Parameters
    ----------
    seen : bool array of shape (n_reflections,)
        Reflections the earlier fit has a posterior of.
    loc, scale : float arrays of shape (n_reflections,)
        That posterior's location and scale before truncation (ignored where not
        ``seen``).
    other : distribution
        The prior of the other reflections, with ``expected_log_prob``,
        ``raw_moments`` and ``take`` (``WilsonDistribution``,
        ``ReferenceDistribution``).
    """

    def __init__(self, seen, loc, scale, other, name="PreviousPosteriorDistribution"):
        parameters = dict(locals())
        self.other = other
        super().__init__(seen, loc, scale, PositiveTruncatedNormal, other, parameters, name)

    @property
    def seen(self):
        return self._mask

    def raw_moments(self):
        """E[F], E[F²], E[F³], E[F⁴] of every reflection."""
        return tuple(self._select(p, o) for p, o in zip(self._chosen.raw_moments(), self.other.raw_moments()))

    def _mean(self):
        return self.raw_moments()[0]

    def _variance(self):
        return self._select(self._chosen.variance(), self.other.variance())

    def expected_log_prob(self, posterior, samples):
        """E_q[log p(F)] per reflection: in closed form from q's first two raw moments
        where the earlier posterior is the prior (its log-density is a quadratic in F
        on F ≥ 0), as ``other`` gives it elsewhere."""
        m1, m2, _, _ = posterior.raw_moments()
        return self._select(self._chosen.expected_log_prob_from_moments(m1, m2),
                            self.other.expected_log_prob(posterior, samples))

    def take(self, rows):
        """The distribution of the reflections ``rows``."""
        return PreviousPosteriorDistribution(tf.gather(self.seen, rows), tf.gather(self.loc, rows),
                                             tf.gather(self.scale, rows), self.other.take(rows))


def _reference_amplitudes(reference, reflections):
    """(hkl, F, SIGF) of a reference in the merger's ASU convention."""
    if not isinstance(reference, pd.DataFrame):
        try:
            reference = rs.read_mtz(str(reference))
        except (RuntimeError, OSError, ValueError) as exc:
            raise InputError(f"{reference}: cannot read the reference MTZ ({exc}).") from exc
    data = reference.reset_index() if "H" not in reference.columns else reference
    if getattr(reference, "merged", None) is False:
        raise InputError("the reference holds unmerged observations; give merged amplitudes or intensities "
                         "(e.g. a merged MTZ of a related structure).")
    types = {c: getattr(data[c].dtype, "name", "") for c in data.columns}
    f_key = next((c for c, t in types.items() if t == "SFAmplitude"), "F" if "F" in data else None)
    i_key = next((c for c, t in types.items() if t == "Intensity"), "I" if "I" in data else None)
    key = f_key or i_key
    if key is None:
        raise InputError("the reference has no amplitude (F) or intensity (I) column.")
    columns = list(data.columns)
    following = columns[columns.index(key) + 1] if columns.index(key) + 1 < len(columns) else None
    s_key = following if following and types.get(following) == "Stddev" else "SIG" + key
    if s_key not in data:
        raise InputError(f"the reference has no σ column for {key!r} (expected {s_key!r}).")
    values = data[key].to_numpy(np.float64, na_value=np.nan)
    sigmas = data[s_key].to_numpy(np.float64, na_value=np.nan)
    if f_key is None:
        sigmas = sigmas / (2 * np.sqrt(np.maximum(values, sigmas)))
        values = np.sqrt(np.maximum(values, 0.0))
    ok = np.isfinite(values) & np.isfinite(sigmas) & (sigmas > 0)
    hkl = data[["H", "K", "L"]].to_numpy(np.int32)[ok]
    hkl, _ = map_to_asu(hkl, reflections.spacegroup, anomalous=False)
    values, sigmas = values[ok], sigmas[ok]
    if reflections.anomalous:
        # A non-anomalous reference serves both Friedel halves.
        hkl = np.concatenate([hkl, -hkl])
        values, sigmas = np.concatenate([values, values]), np.concatenate([sigmas, sigmas])
    order = np.argsort(pack_hkl(hkl), kind="stable")
    hkl, values, sigmas = hkl[order], values[order], sigmas[order]
    _, first = np.unique(pack_hkl(hkl), return_index=True)
    return hkl[first], values[first], sigmas[first]
