"""Surrogate posterior of the structure-factor amplitudes: a normal distribution truncated
to [0, ∞) per reflection (French & Wilson's positive support), with location and scale
kept positive by softplus bijectors.
"""

import math

import numpy as np

from .._tf import tf, tfb, tfd, tfp

MIN_SCALE = 1e-4
_SQRT_2PI_E = math.sqrt(2 * math.pi * math.e)
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def softplus_inverse(x):
    """numpy inverse of softplus, stable for large x."""
    x = np.asarray(x, dtype=np.float64)
    return np.where(x > 20, x, np.log(np.expm1(np.minimum(x, 20)) + 1e-30))


def _standard_normal_pdf(x):
    return tf.exp(-0.5 * tf.square(x)) / math.sqrt(2 * math.pi)


def _standard_normal_cdf(x):
    return 0.5 * tf.math.erfc(-x / math.sqrt(2.0))


def location_scale_properties(cls, dtype, num_classes=None):
    """TFP's parameter properties of a law with ``loc`` and a positive ``scale``. TFP
    wants every distribution class that defines ``__init__`` to declare them itself, so
    each class assigns this as its ``_parameter_properties``."""
    return dict(
        loc=tfp.util.ParameterProperties(),
        scale=tfp.util.ParameterProperties(default_constraining_bijector_fn=lambda: tfb.Softplus()),
    )


class LocationScale(tfd.Distribution):
    """Base of skmerge's scalar laws with a location and a positive scale (the posterior
    here, the double-Wilson prior's Rice and folded-normal laws)."""

    _parameter_properties = classmethod(location_scale_properties)

    def __init__(self, loc, scale, parameters, name, validate_args=False, allow_nan_stats=True):
        with tf.name_scope(name) as name:
            self._loc = tf.convert_to_tensor(loc, dtype_hint=tf.float32, name="loc")
            self._scale = tf.convert_to_tensor(scale, dtype=self._loc.dtype, name="scale")
            super().__init__(
                dtype=self._loc.dtype,
                reparameterization_type=tfd.FULLY_REPARAMETERIZED,
                validate_args=validate_args,
                allow_nan_stats=allow_nan_stats,
                parameters=parameters,
                name=name,
            )

    @property
    def loc(self):
        return self._loc

    @property
    def scale(self):
        return self._scale


class PositiveTruncatedNormal(LocationScale):
    """Normal(loc, scale) truncated to [0, ∞), one per batch member.

    The law of ``tfd.TruncatedNormal(loc, scale, 0, high)`` with high → ∞ (the tests
    hold the two equal), written out for the training step. TFP's needs a finite upper
    bound (with ∞ its entropy, variance and gradients are NaN), samples with a
    rejection kernel whose gradients are implicit, and makes a training step measurably
    slower (see ``bench/RESULTS.md``). Here sampling inverts the CDF, an explicitly
    differentiable function of uniform draws, and the entropy and the first four raw
    moments are closed forms. With loc ≥ 0 the truncation point lies at or below the
    mode, so Φ(−loc/scale) ≤ 1/2 and the inversion is accurate; the posterior keeps loc
    positive.

    Parameters
    ----------
    loc, scale : float tensors
        Location and (positive) scale of the normal before truncation.
    """

    _parameter_properties = classmethod(location_scale_properties)

    def __init__(self, loc, scale, validate_args=False, allow_nan_stats=True, name="PositiveTruncatedNormal"):
        super().__init__(loc, scale, dict(locals()), name, validate_args, allow_nan_stats)

    def _alpha_and_mass(self):
        """α = −loc/scale (the truncation point, standardised) and Z = Φ(−α), the mass
        of the untruncated normal above 0."""
        alpha = -self._loc / self._scale
        return alpha, _standard_normal_cdf(-alpha)

    def _log_prob(self, x):
        alpha, mass = self._alpha_and_mass()
        z = (x - self._loc) / self._scale
        log_density = -0.5 * tf.square(z) - _LOG_SQRT_2PI - tf.math.log(self._scale) - tf.math.log(mass)
        return tf.where(x >= 0, log_density, -np.inf)

    def _quantile(self, p):
        alpha, _ = self._alpha_and_mass()
        lower = _standard_normal_cdf(alpha)
        z = math.sqrt(2.0) * tf.math.erfinv(2.0 * (lower + p * (1.0 - lower)) - 1.0)
        return tf.maximum(self._loc + self._scale * z, 0.0)

    def _sample_n(self, n, seed=None):
        """Inverse-CDF samples; ``seed`` is a stateless seed, shape (2,)."""
        shape = tf.concat([[n], self._batch_shape_tensor(loc=self._loc, scale=self._scale)], 0)
        u = tf.random.stateless_uniform(shape, seed=seed, minval=1e-6, maxval=1 - 1e-6, dtype=self.dtype)
        return self._quantile(u)

    def _entropy(self):
        alpha, mass = self._alpha_and_mass()
        return tf.math.log(_SQRT_2PI_E * self._scale * mass) + alpha * _standard_normal_pdf(alpha) / (2 * mass)

    def _mean(self):
        return self.raw_moments()[0]

    def _variance(self):
        # Written out rather than E[F²] − E[F]², which cancels badly when scale ≪ loc.
        alpha, mass = self._alpha_and_mass()
        hazard = _standard_normal_pdf(alpha) / mass
        return tf.square(self._scale) * (1.0 + alpha * hazard - tf.square(hazard))

    def expected_log_prob_from_moments(self, m1, m2):
        """E[log p(F)] of this law under any law of F ≥ 0 with raw moments m1 = E[F] and
        m2 = E[F²]: on [0, ∞) the log-density is a quadratic in F."""
        _, mass = self._alpha_and_mass()
        return (-tf.math.log(self._scale * mass) - _LOG_SQRT_2PI
                - (m2 - 2 * self._loc * m1 + tf.square(self._loc)) / (2 * tf.square(self._scale)))

    def raw_moments(self):
        """Raw moments E[F], E[F²], E[F³], E[F⁴] of every batch member, in closed form.

        With α = −loc/scale and Z = Φ(−α), the moments follow the recursion
        m₀ = 1, m₁ = loc + scale·φ(α)/Z, mₖ = loc·mₖ₋₁ + (k−1)·scale²·mₖ₋₂ for k ≥ 2
        (the boundary term of the general recursion vanishes at a truncation point of 0).
        """
        alpha, mass = self._alpha_and_mass()
        loc = self._loc
        m1 = loc + self._scale * _standard_normal_pdf(alpha) / mass
        var = tf.square(self._scale)
        m2 = loc * m1 + var
        m3 = loc * m2 + 2 * var * m1
        m4 = loc * m3 + 3 * var * m2
        return m1, m2, m3, m4


@tfd.RegisterKL(PositiveTruncatedNormal, PositiveTruncatedNormal)
def _kl_positive_truncated_normals(q, p, name=None):
    """KL(q‖p) = −H[q] − E_q[log p], both in closed form: what ``tfd.kl_divergence``
    returns for two of these laws."""
    m1, m2, _, _ = q.raw_moments()
    return -q.entropy() - p.expected_log_prob_from_moments(m1, m2)


class TruncatedNormalPosterior(tf.Module):
    """The learnable posterior q(F_h) = :class:`PositiveTruncatedNormal` (loc_h, scale_h)
    of every reflection h.

    The variables hold unconstrained values; ``loc = softplus(loc_raw)`` and
    ``scale = softplus(scale_raw) + min_scale`` (a floor that keeps the entropy finite)
    are the bijectors' forward transforms.

    Parameters
    ----------
    loc, scale : ndarray of shape (n_reflections,)
        Initial location and scale (positive).
    min_scale : float, default=1e-4
        The floor of the scale, in the posterior's (standardised) units.
    """

    def __init__(self, loc, scale, min_scale=MIN_SCALE, name="posterior"):
        super().__init__(name=name)
        self.loc_raw = tf.Variable(softplus_inverse(loc).astype(np.float32), name="loc_raw")
        self.scale_raw = tf.Variable(
            softplus_inverse(np.maximum(scale, 2 * min_scale) - min_scale).astype(np.float32),
            name="scale_raw",
        )
        self.loc = tfp.util.DeferredTensor(self.loc_raw, tfb.Softplus())
        self.scale = tfp.util.DeferredTensor(self.scale_raw, tfb.Chain([tfb.Shift(min_scale), tfb.Softplus()]))

    def distribution(self):
        """The posterior of every reflection: a :class:`PositiveTruncatedNormal` with batch
        shape (n_reflections,), at the variables' current values."""
        return PositiveTruncatedNormal(tf.convert_to_tensor(self.loc), tf.convert_to_tensor(self.scale))

    def get_weights(self):
        """The unconstrained variables as numpy arrays (what a fitted merger persists)."""
        return {"loc_raw": self.loc_raw.numpy(), "scale_raw": self.scale_raw.numpy()}

    def set_weights(self, weights):
        self.loc_raw.assign(weights["loc_raw"])
        self.scale_raw.assign(weights["scale_raw"])
