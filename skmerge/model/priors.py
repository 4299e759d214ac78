"""Priors on the structure-factor amplitudes.

A prior is a configuration object (usable as a value in a parameter grid); ``build``
turns it into the TensorFlow-side distribution for one set of reflections, expressed in
the merger's standardised units (⟨F²/ε⟩ = 1).
"""

import math

import numpy as np
import pandas as pd
import reciprocalspaceship as rs
from sklearn.base import BaseEstimator

from .._tf import tf
from ..errors import InputError
from ..symmetry import lookup_hkl, map_to_asu, pack_hkl


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

    def __init__(self, b_factor=None):
        self.b_factor = b_factor

    def build(self, reflections):
        sigma = reflections.mean_intensity
        if self.b_factor is not None:
            falloff = np.exp(-float(self.b_factor) / (2 * reflections.dhkl.astype(np.float64) ** 2))
            sigma = falloff * sigma.mean() / falloff.mean()
        return _WilsonDistribution(reflections.centric, reflections.epsilon * sigma)


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

    def __init__(self, reference, kind="normal", dof=4.0, width=None):
        self.reference = reference
        self.kind = kind
        self.dof = dof
        self.width = width

    def build(self, reflections):
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
        wilson = _WilsonDistribution(reflections.centric, eps * reflections.mean_intensity)
        return _ReferenceDistribution(found, f, s, self.kind, float(self.dof), wilson)


PRIORS = {"wilson": WilsonPrior}


def make_prior(prior):
    """The prior object for an estimator's ``prior`` parameter."""
    return PRIORS[prior]() if isinstance(prior, str) else prior


class _WilsonDistribution:
    """TensorFlow side of the Wilson prior for a fixed set of reflections."""

    def __init__(self, centric, variance):
        self.centric = tf.convert_to_tensor(centric, tf.bool)
        self.variance = tf.convert_to_tensor(np.asarray(variance, np.float32) if isinstance(variance, np.ndarray) else variance, tf.float32)

    def expected_log_prob(self, moments, samples):
        """E_q[log p(F)] per reflection: closed form but for E[log F] of acentrics,
        which is estimated from the posterior samples."""
        _, m2, _, _ = moments
        v = self.variance
        mean_log_f = tf.reduce_mean(tf.math.log(samples + 1e-12), axis=0)
        acentric = math.log(2.0) - tf.math.log(v) + mean_log_f - m2 / v
        centric = 0.5 * tf.math.log(2.0 / (math.pi * v)) - m2 / (2 * v)
        return tf.where(self.centric, centric, acentric)

    def moments(self):
        v = self.variance
        root = tf.sqrt(v)
        acentric = (0.5 * math.sqrt(math.pi) * root, v, 0.75 * math.sqrt(math.pi) * v * root, 2 * v * v)
        centric = (math.sqrt(2 / math.pi) * root, v, 2 * math.sqrt(2 / math.pi) * v * root, 3 * v * v)
        return tuple(tf.where(self.centric, c, a) for c, a in zip(centric, acentric))

    def take(self, rows):
        return _WilsonDistribution(tf.gather(self.centric, rows), tf.gather(self.variance, rows))

    def sample(self, n_samples, seed):
        shape = [n_samples, tf.shape(self.variance)[0]]
        u = tf.random.stateless_uniform(shape, seed=seed, minval=1e-7, maxval=1.0)
        z = tf.random.stateless_normal(shape, seed=seed + 1)
        rayleigh = tf.sqrt(-self.variance * tf.math.log(u))
        half_normal = tf.abs(z) * tf.sqrt(self.variance)
        return tf.where(self.centric, half_normal, rayleigh)


class _ReferenceDistribution:
    """TensorFlow side of a reference prior; reflections outside the reference use
    ``wilson``."""

    def __init__(self, found, loc, scale, kind, dof, wilson):
        self.found = tf.convert_to_tensor(found, tf.bool)
        self.loc = tf.cast(loc, tf.float32)
        self.scale = tf.cast(scale, tf.float32)
        self.kind = kind
        self.dof = dof
        self.wilson = wilson

    def _log_prob(self, f):
        z = (f - self.loc) / self.scale
        if self.kind == "laplace":
            b = self.scale / math.sqrt(2.0)
            return -tf.abs(f - self.loc) / b - tf.math.log(2 * b)
        nu = self.dof
        const = math.lgamma((nu + 1) / 2) - math.lgamma(nu / 2) - 0.5 * math.log(nu * math.pi)
        return const - tf.math.log(self.scale) - (nu + 1) / 2 * tf.math.log1p(tf.square(z) / nu)

    def expected_log_prob(self, moments, samples):
        m1, m2, _, _ = moments
        if self.kind == "normal":
            s2 = tf.square(self.scale)
            reference = (
                -tf.math.log(self.scale)
                - 0.5 * math.log(2 * math.pi)
                - (m2 - 2 * self.loc * m1 + tf.square(self.loc)) / (2 * s2)
            )
        else:
            reference = tf.reduce_mean(self._log_prob(samples), axis=0)
        return tf.where(self.found, reference, self.wilson.expected_log_prob(moments, samples))

    def moments(self):
        mu, s2 = self.loc, tf.square(self.scale)
        reference = (mu, mu * mu + s2, mu**3 + 3 * mu * s2, mu**4 + 6 * mu * mu * s2 + 3 * s2 * s2)
        return tuple(tf.where(self.found, r, w) for r, w in zip(reference, self.wilson.moments()))

    def take(self, rows):
        return _ReferenceDistribution(
            tf.gather(self.found, rows), tf.gather(self.loc, rows), tf.gather(self.scale, rows),
            self.kind, self.dof, self.wilson.take(rows),
        )

    def sample(self, n_samples, seed):
        z = tf.random.stateless_normal([n_samples, tf.shape(self.loc)[0]], seed=seed)
        return tf.where(self.found, tf.abs(self.loc + self.scale * z), self.wilson.sample(n_samples, seed))


def _reference_amplitudes(reference, reflections):
    """(hkl, F, SIGF) of a reference in the merger's ASU convention."""
    if not isinstance(reference, pd.DataFrame):
        try:
            reference = rs.read_mtz(str(reference))
        except (RuntimeError, OSError, ValueError) as exc:
            raise InputError(f"{reference}: cannot read the reference MTZ ({exc}).") from exc
    data = reference.reset_index() if "H" not in reference.columns else reference
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
