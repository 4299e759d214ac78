"""The amplitudes' fall-off with resolution, held where the data leave it free.

Multiplying every amplitude of resolution d by g(d) and every scale of its observations
by 1/g(d)² leaves each observation's predicted intensity, and so the likelihood, as it
was: no observation says how the fall-off is shared between F and the scales. Only the
prior weighs it, and weakly (one KL term per reflection against thousands of
observations' likelihood noise), so over a long fit the scale network's common
resolution dependence drifts wherever its fitting of other things takes it: on a
simulated 180-image sweep the scales' mean error in the lowest-resolution twentieth
(after one overall scale and B) went from +0.5 % after five steps to −1.2 % after 300
and −1.7 % after 1,300, bending F against the truth in a way one overall B cannot take.

A fit to a rotation series (:func:`~skmerge.model.fitting.falloff_held` says which fits)
therefore holds each resolution shell's mean log amplitude at its start, where the
fall-off is the data's own (French–Wilson amplitudes of the starting merge; Wilson's
Σ is the same mean). The mean weighs every reflection by its starting precision on
log F, (E[F]/sd F)², up to a cap, so that it follows the well-measured amplitudes and
not the weak ones, which the error model and the prior move freely.
The term is a penalty on the squared drift of those shell means, strong enough to act
as a constraint on that one direction; it is what the optimiser minimises besides
−ELBO, not part of the ELBO. It is held on the amplitudes, not on the scales: a scale
model learns large identifiable structure (partiality, decay) that moves any mean of
the scales, and the scales of barely recorded spots are hardly determined at all.
"""

import numpy as np

from .._tf import tf
from ..shells import make_shells

# Shells of equal numbers of reflections in 1/d²: enough to follow a bend, each with
# hundreds of reflections in a small data set so that its mean is steady.
N_SHELLS = 20
# The penalty per unit squared log drift (averaged over the shells) against the loss per
# observation: a drift of 0.1 % costs 10⁻⁴, far more than the prior's pull on it.
STRENGTH = 100.0
# Reflections measured better than F/sd F = 10 weigh the same: the fit moves a strong
# amplitude by more than its error bar as the scales learn what the start lacked (the
# decay of the images that saw it), so no few of them may set a shell's mean.
MAX_WEIGHT = 100.0


class FalloffGauge:
    """The penalty that holds each resolution shell's mean log amplitude at its start.

    Parameters
    ----------
    dhkl : ndarray of shape (n_reflections,)
        Resolution of every reflection of the posterior.
    start : distribution
        The starting posterior (with ``raw_moments``): its E[F] and sd F.
    """

    def __init__(self, dhkl, start):
        dhkl = np.asarray(dhkl, np.float64)
        n_shells = max(1, min(N_SHELLS, len(dhkl) // 100))
        self.shell = tf.constant(make_shells(dhkl, n_shells).assign(dhkl), tf.int32)
        self.n_shells = n_shells
        mean, variance = start.mean().numpy().astype(np.float64), start.variance().numpy().astype(np.float64)
        self.log_start = tf.constant(np.log(mean), tf.float32)
        weight = np.minimum(mean**2 / np.maximum(variance, 1e-30), MAX_WEIGHT)
        total = np.bincount(self.shell.numpy(), weights=weight, minlength=n_shells)
        self.weight = tf.constant(weight / np.maximum(total, 1e-30)[self.shell.numpy()], tf.float32)

    def penalty(self, posterior):
        """``STRENGTH`` × the mean over shells of the squared drift of their weighted
        mean log E[F] under ``posterior`` (a distribution with ``raw_moments``)."""
        drift = self.weight * (tf.math.log(posterior.raw_moments()[0]) - self.log_start)
        return STRENGTH * tf.reduce_mean(tf.square(tf.math.unsorted_segment_sum(drift, self.shell, self.n_shells)))
