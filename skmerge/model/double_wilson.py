"""The bivariate (double-Wilson) prior: amplitudes of related reflections drawn together.

Two structures that differ a little — the two Friedel halves of an anomalous scatterer's
data, a crystal before and after a light flash, a native and a derivative — have
amplitudes that are close but not equal. Wilson's prior treats every amplitude as
independent, so it pulls each half of a pair towards its shell's mean on its own and the
small difference between them is the first thing a noisy fit gives up. The double-Wilson
prior instead draws the child's structure factor around r times its parent's: with
normalised amplitudes E = F/√(εΣ),

- acentric: p(E_child | E_parent) = Rice(ν = r·E_parent, σ² = (1 − r²)/2),
- centric: p(E_child | E_parent) = |Normal(r·E_parent, 1 − r²)| (a folded normal),

so that every child keeps Wilson's marginal law, r = 0 is Wilson's prior and r → 1 ties
the pair. Roots (reflections without a parent) keep Wilson's prior.

:class:`DoubleWilsonPrior` is the configuration object (usable as a grid value);
``build`` makes a :class:`DoubleWilsonDistribution` whose correlations r — one per file
and resolution shell — are learned with the rest of the model unless fixed.
"""

import math
from numbers import Integral, Real

import gemmi
import numpy as np
from sklearn.base import BaseEstimator
from sklearn.utils._param_validation import Interval

from .._tf import tf, tfb, tfd, tfp
from ..errors import InputError
from ..symmetry import lookup_keys, map_to_asu, pack_hkl
from .posterior import LocationScale, location_scale_properties
from .priors import WilsonDistribution, wilson_mean_square

# r is kept in (0, R_MAX): at r = 1 the conditional law is a point mass.
R_MAX = 0.999
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def _log_i0e(z):
    """log(I₀(z)·e^{−z}) for z ≥ 0.

    TensorFlow's ``bessel_i0e`` (Cephes' Chebyshev expansions, an op XLA compiles) is
    used rather than ``tfp.math.bessel_ive(0, z)``, which evaluates a general order by
    series and continued fractions: on 200,000 values with its gradient the TFP
    function took 76 ms against 1.2 ms (bench/RESULTS.md), 5 times a whole training
    step of hypf. tests/test_double_wilson.py holds the two equal.
    """
    return tf.math.log(tf.math.special.bessel_i0e(z))


class _Scalar(LocationScale):
    """Base of the two conditional laws: moments and normal draws."""

    def _mean(self):
        return tf.cast(self._moments()[0], self.dtype)

    def _variance(self):
        return tf.cast(self._moments()[1], self.dtype)

    def _normals(self, n, seed, count):
        shape = tf.concat([[n], self._batch_shape_tensor(loc=self._loc, scale=self._scale)], 0)
        seeds = tfp.random.split_seed(seed, n=count)
        return [tf.random.stateless_normal(shape, seed=s, dtype=self.dtype) for s in seeds]


class Rice(_Scalar):
    """Rice's law: the length of a 2-D vector whose components are Normal(ν, σ) and
    Normal(0, σ) — the amplitude of a structure factor ν plus a random-atom part.

    log p(x) = log x − 2 log σ − (x − ν)²/(2σ²) + log I₀e(xν/σ²), with the exponentially
    scaled Bessel function keeping it finite for any xν/σ².

    Parameters
    ----------
    loc : float tensor
        ν ≥ 0.
    scale : float tensor
        σ > 0.
    """

    _parameter_properties = classmethod(location_scale_properties)

    def __init__(self, loc, scale, name="Rice"):
        super().__init__(loc, scale, dict(locals()), name)

    def _log_prob(self, x):
        s2 = tf.square(self._scale)
        log_density = (tf.math.log(x) - tf.math.log(s2) - tf.square(x - self._loc) / (2 * s2)
                       + _log_i0e(x * self._loc / s2))
        return tf.where(x >= 0, log_density, -np.inf)

    def _sample_n(self, n, seed=None):
        along, across = self._normals(n, seed, 2)
        return tf.math.sqrt(tf.square(self._loc + self._scale * along) + tf.square(self._scale * across))

    def _moments(self):
        """Mean and variance, in double precision: E[x²] − E[x]² cancels when ν ≫ σ."""
        loc, scale = (tf.cast(v, tf.float64) for v in (self._loc, self._scale))
        # σ√(π/2)·L½(−ν²/2σ²), the Laguerre function in exponentially scaled Bessel terms.
        t = tf.square(loc / scale) / 4
        laguerre = (1 + 2 * t) * tf.math.special.bessel_i0e(t) + 2 * t * tf.math.special.bessel_i1e(t)
        mean = scale * math.sqrt(math.pi / 2) * laguerre
        return mean, 2 * tf.square(scale) + tf.square(loc) - tf.square(mean)


class FoldedNormal(_Scalar):
    """|X| for X ~ Normal(loc, scale).

    Parameters
    ----------
    loc : float tensor
    scale : float tensor
        > 0.
    """

    _parameter_properties = classmethod(location_scale_properties)

    def __init__(self, loc, scale, name="FoldedNormal"):
        super().__init__(loc, scale, dict(locals()), name)

    def _log_prob(self, x):
        z = (x - self._loc) / self._scale
        # log[φ(z) + φ(z + 2loc/scale)]: the two branches of the fold, added stably.
        log_density = (-0.5 * tf.square(z) - _LOG_SQRT_2PI - tf.math.log(self._scale)
                       + tf.math.softplus(-2 * x * self._loc / tf.square(self._scale)))
        return tf.where(x >= 0, log_density, -np.inf)

    def _sample_n(self, n, seed=None):
        (z,) = self._normals(n, seed, 1)
        return tf.abs(self._loc + self._scale * z)

    def _moments(self):
        """Mean and variance, in double precision: E[x²] − E[x]² cancels when |μ| ≫ σ."""
        loc, scale = (tf.cast(v, tf.float64) for v in (self._loc, self._scale))
        a = loc / scale
        mean = scale * math.sqrt(2 / math.pi) * tf.exp(-tf.square(a) / 2) + loc * tf.math.erf(a / math.sqrt(2.0))
        return mean, tf.square(loc) + tf.square(scale) - tf.square(mean)


class DoubleWilsonDistribution(tfd.Distribution):
    """Amplitudes of all reflections under the double-Wilson prior.

    Batch member i is reflection i. Its ``log_prob`` is log p(F_i | F_parent(i)) — the
    Rice or folded-normal law around r·F_parent·√(vᵢ/v_parent) of a child, Wilson's law of
    a root — so the sum over reflections is the joint log-density. Marginally every
    reflection follows Wilson's law with mean square v = εΣ, which is what ``raw_moments``,
    ``mean``, ``variance`` and ``take`` give.

    Parameters
    ----------
    centric : bool array of shape (n_reflections,)
    mean_square : float array of shape (n_reflections,)
        v = εΣ of every reflection.
    parent : int array of shape (n_reflections,)
        Row of each reflection's parent, −1 for roots. Parents form a forest.
    r_index : int array of shape (n_reflections,)
        Row of each child's correlation in ``r`` (ignored for roots).
    r : Correlation
        The correlations, learnable or fixed.
    root_law : distribution, optional
        The law of the roots (a distribution over all reflections with
        ``expected_log_prob``); Wilson's by default.
    """

    def __init__(self, centric, mean_square, parent, r_index, r, root_law=None, name="DoubleWilsonDistribution"):
        parameters = dict(locals())
        parent = np.asarray(parent, np.int64)
        self.parent = parent  # row of every reflection's parent, −1 for roots
        with tf.name_scope(name) as name:
            self.wilson = WilsonDistribution(centric, mean_square)
            self.root_law = self.wilson if root_law is None else root_law
            self.centric = self.wilson.centric
            self._root = tf.constant(parent < 0)
            self._parent = tf.constant(np.maximum(parent, 0))
            self._r_index = tf.constant(np.asarray(r_index, np.int64))
            self.r = r
            self.depth = _depths(parent)  # of every reflection in the parent forest (0: roots)
            self._levels = [tf.constant(self.depth == d) for d in range(1, self.depth.max() + 1)]
            super().__init__(dtype=tf.float32, reparameterization_type=tfd.FULLY_REPARAMETERIZED,
                             validate_args=False, allow_nan_stats=True, parameters=parameters, name=name)

    def _batch_shape(self):
        return self.wilson.batch_shape

    def _batch_shape_tensor(self):
        return self.wilson.batch_shape_tensor()

    def _event_shape(self):
        return tf.TensorShape([])

    def _event_shape_tensor(self):
        return tf.constant([], tf.int32)

    def _pair_terms(self):
        """Per reflection: k with ν = k·F_parent, and the conditional variance w (σ² of
        the Rice law's components for acentrics, the normal's variance for centrics)."""
        v = self.wilson.mean_square
        r = tf.gather(self.r.flat(), self._r_index)
        k = r * tf.sqrt(v / tf.gather(v, self._parent))
        w = v * (1 - tf.square(r)) * tf.where(self.centric, 1.0, 0.5)
        return k, w

    def _conditional(self, parent_f):
        k, w = self._pair_terms()
        loc, scale = k * parent_f, tf.sqrt(w)
        return FoldedNormal(loc, scale), Rice(loc, scale)

    def conditional_log_prob(self, children, child_f, parent_f, child_cell=None, parent_cell=None):
        """log p(F_child | F_parent) of the child reflections ``children`` (rows), for
        amplitudes ``child_f`` and ``parent_f`` of shapes that broadcast against
        (len(children), ...) — e.g. every pair of two grids.

        With ``child_cell`` and ``parent_cell`` (the widths of the grid cells of
        ``child_f`` and ``parent_f``, of the same shapes), the density averaged over the
        cells instead, approximately: the cells' variances (Δ²/12, the parent's times
        k²) added to the conditional variance, so that a law narrower than the grids'
        spacing is not missed between their points."""
        k, w = (tf.gather(tf.cast(t, child_f.dtype), children) for t in self._pair_terms())
        trailing = [1] * (len(child_f.shape) - 1)
        k, w = (tf.reshape(t, [-1] + trailing) for t in (k, w))
        if child_cell is not None:
            w = w + (tf.square(child_cell) + tf.square(k * parent_cell)) / 12
        scale = tf.sqrt(w)
        centric = tf.gather(self.centric, children)
        loc = k * parent_f
        # Only the law the children need where they are all of one kind (the cost is
        # in the Rice law's Bessel function).
        if not bool(tf.reduce_any(centric)):
            return Rice(loc, scale).log_prob(child_f)
        if bool(tf.reduce_all(centric)):
            return FoldedNormal(loc, scale).log_prob(child_f)
        return tf.where(tf.reshape(centric, [-1] + trailing), FoldedNormal(loc, scale).log_prob(child_f),
                        Rice(loc, scale).log_prob(child_f))

    def _log_prob(self, f):
        centric_law, acentric_law = self._conditional(tf.gather(f, self._parent, axis=-1))
        child = tf.where(self.centric, centric_law.log_prob(f), acentric_law.log_prob(f))
        return tf.where(self._root, self.root_law.log_prob(f), child)

    def _sample_n(self, n, seed=None):
        """Ancestral samples: roots from their law, then each generation given its
        parents' samples."""
        seeds = tfp.random.split_seed(seed, n=len(self._levels) + 1)
        samples = self.root_law.sample(n, seed=seeds[0])
        for level, level_seed in zip(self._levels, seeds[1:]):
            centric_law, acentric_law = self._conditional(tf.gather(samples, self._parent, axis=-1))
            draw_seeds = tfp.random.split_seed(level_seed, n=2)
            drawn = tf.where(self.centric, centric_law.sample(seed=draw_seeds[0]),
                             acentric_law.sample(seed=draw_seeds[1]))
            samples = tf.where(level, drawn, samples)
        return samples

    def coupling(self, samples):
        """E_q[∂² log p(F_i | F_parent(i)) / ∂F_i ∂F_parent(i)] per reflection, 0 for roots:
        how strongly the prior ties each child to its parent, averaged over posterior
        ``samples`` of shape (n_samples, n_reflections). About k/w (the quadratic's
        weight) for strong reflections; what the linear-response covariance of a family
        (:mod:`skmerge.model.linear_response`) adds to the mean-field posterior."""
        parent_f = tf.gather(samples, self._parent, axis=-1)
        with tf.GradientTape() as outer:
            outer.watch(parent_f)
            with tf.GradientTape() as inner:
                inner.watch(samples)
                centric_law, acentric_law = self._conditional(parent_f)
                log_p = tf.where(self.centric, centric_law.log_prob(samples), acentric_law.log_prob(samples))
            # log p_i depends on F_i and F_parent(i) only, so both gradients are elementwise.
            slope = inner.gradient(log_p, samples)
        cross = outer.gradient(slope, parent_f)
        cross = tf.reduce_mean(tf.where(tf.math.is_finite(cross), cross, 0.0), axis=0)
        return tf.where(self._root, 0.0, cross)

    def get_weights(self):
        """The correlations r, shape (n_files, n_shells), NaN where no child uses them."""
        return self.r.get_weights()

    def set_weights(self, r):
        self.r.set_weights(r)

    def _mean(self):
        return self.wilson.mean()

    def _variance(self):
        return self.wilson.variance()

    def raw_moments(self):
        """E[F], E[F²], E[F³], E[F⁴] of every reflection's marginal (Wilson's) law."""
        return self.wilson.raw_moments()

    def take(self, rows):
        """The marginal (Wilson) law of the reflections ``rows``: used for reflections a
        fit never saw, whose parents' posteriors it cannot condition on."""
        return self.wilson.take(rows)

    def expected_log_prob(self, posterior, samples):
        """E_q[log p(F_i | F_parent(i))] per reflection under a mean-field posterior q.

        Both laws are a quadratic in (F − k·F_parent) plus a smooth remainder. The
        quadratic's expectation, Var F + k²·Var F_parent + (E F − k·E F_parent)², is
        taken in closed form from q; only log F and the Bessel (acentric) or fold
        (centric) terms are averaged over the posterior ``samples`` (shape
        (n_samples, n_reflections)). That keeps the gradient noise low when r is near 1,
        where the quadratic's weight 1/w is large.
        """
        mean, variance = posterior.mean(), posterior.variance()
        k, w = self._pair_terms()
        parent_mean, parent_variance = tf.gather(mean, self._parent), tf.gather(variance, self._parent)
        square = variance + tf.square(k) * parent_variance + tf.square(mean - k * parent_mean)
        cross = samples * k * tf.gather(samples, self._parent, axis=-1) / w
        acentric = (tf.reduce_mean(tf.math.log(samples + 1e-12) + _log_i0e(cross), axis=0)
                    - tf.math.log(w) - square / (2 * w))
        centric = (tf.reduce_mean(tf.math.softplus(-2 * cross), axis=0)
                   - _LOG_SQRT_2PI - 0.5 * tf.math.log(w) - square / (2 * w))
        child = tf.where(self.centric, centric, acentric)
        return tf.where(self._root, self.root_law.expected_log_prob(posterior, samples), child)

    def rerooted(self, roots, root_law):
        """This prior with the reflections ``roots`` (a bool array) made roots, and
        ``root_law`` the law of every root (the correlations r are shared)."""
        return DoubleWilsonDistribution(self.wilson.centric, self.wilson.mean_square, np.where(roots, -1, self.parent),
                                        self._r_index, self.r, root_law)


def _depths(parent):
    """The depth of every reflection in the parent forest (0 for roots). InputError if
    the parents form a cycle."""
    depth = np.where(parent < 0, 0, -1)
    for d in range(1, len(parent) + 1):
        todo = depth < 0
        if not todo.any():
            break
        ready = todo & (depth[np.maximum(parent, 0)] == d - 1)
        if not ready.any():
            raise InputError("the double-Wilson parents form a cycle; every chain of parents must end at a root.")
        depth[ready] = d
    return depth


class DoubleWilsonPrior(BaseEstimator):
    """The double-Wilson prior: each child amplitude drawn around r times its parent's.

    Parents are, per reflection, in this order:

    - with ``separate_files`` and ``parents[k]`` set, the same reflection (the same
      Friedel half) in file ``parents[k]``, its indices first mapped by
      ``reindexing_ops[k]`` (time-resolved series, derivative and native, MAD
      wavelengths);
    - else, with ``anomalous`` and ``friedel``, the Friedel-minus half of an acentric
      reflection has the Friedel-plus half of the same reflection and file;
    - else none: the reflection is a root and keeps Wilson's prior. So is a child whose
      parent was not observed.

    Each file k has its own correlation r (per resolution shell with ``n_shells``), the
    correlation of its reflections with their parents. It is learned by maximising the
    ELBO with the rest of the model (``learn_r``, through a sigmoid onto (0, 0.999)),
    starting from ``r``, or fixed at ``r``. The fitted values are the merger's
    ``prior_r_``.

    Parameters
    ----------
    parents : list of int or None, optional
        Per file_id, the file it is the child of (None for roots): careless's
        ``--double-wilson-parents``. Needs ``separate_files=True``.
    r : float or list of float, default=0.9
        Correlation with the parent (starting value when learned), one value for all
        files or one per file_id (values of files without children are unused).
    learn_r : bool, default=True
        Learn r with the ELBO (careless's ``--optimize-double-wilson-r``).
    n_shells : int, default=1
        Resolution shells (of equal reflection counts) with an r of their own.
    friedel : bool, default=True
        With ``anomalous=True``, tie every Friedel-minus amplitude to its Friedel-plus
        mate.
    reindexing_ops : list of str, optional
        Per file_id, the operator (gemmi triplet such as ``"-x,-y,z"``) that maps the
        file's indices to its parent's setting (careless's
        ``--double-wilson-reindexing-ops``). None: the identity.
    b_factor : float, optional
        Wilson B of a parametric fall-off of Σ, as in :class:`~skmerge.WilsonPrior`.

    Examples
    --------
    >>> from skmerge import DoubleWilsonPrior, VariationalMerger
    >>> merger = VariationalMerger(prior=DoubleWilsonPrior(), anomalous=True)
    >>> time_series = VariationalMerger(prior=DoubleWilsonPrior(parents=[None, 0, 0]), separate_files=True)
    """

    _parameter_constraints = {
        "parents": [None, list, tuple],
        "r": [Interval(Real, 0, R_MAX, closed="both"), list, tuple],
        "learn_r": ["boolean"],
        "n_shells": [Interval(Integral, 1, None, closed="left")],
        "friedel": ["boolean"],
        "reindexing_ops": [None, list, tuple],
        "b_factor": [None, Real],
    }

    def __init__(self, parents=None, r=0.9, learn_r=True, n_shells=1, friedel=True, reindexing_ops=None,
                 b_factor=None):
        self.parents = parents
        self.r = r
        self.learn_r = learn_r
        self.n_shells = n_shells
        self.friedel = friedel
        self.reindexing_ops = reindexing_ops
        self.b_factor = b_factor

    def build(self, reflections):
        """The prior of ``reflections`` (a ``Reflections``, with ``mean_intensity`` set).

        Returns
        -------
        DoubleWilsonDistribution
            With a trainable ``r`` (``get_weights``/``set_weights`` give and take the
            correlations as an array of shape (n_files, n_shells)).
        """
        n_files = 1 if reflections.group is None else int(reflections.group.max()) + 1
        parent = self._parents(reflections, n_files)
        file_id = np.zeros(len(reflections), np.int64) if reflections.group is None else reflections.group
        shell = _shells(reflections.dhkl, parent >= 0, int(self.n_shells))
        start = np.repeat(self._start(n_files)[:, None], self.n_shells, axis=1)
        used = np.zeros(start.shape, bool)
        used[file_id[parent >= 0], shell[parent >= 0]] = True
        correlation = Correlation(start, used, trainable=self.learn_r)
        return DoubleWilsonDistribution(reflections.centric, wilson_mean_square(reflections, self.b_factor), parent,
                                        file_id * int(self.n_shells) + shell, correlation)

    def families(self, reflections):
        """The row of every reflection's root ancestor (its own row for roots): the
        reflections whose posteriors start from one shared estimate."""
        n_files = 1 if reflections.group is None else int(reflections.group.max()) + 1
        parent = self._parents(reflections, n_files)
        root, depth = np.arange(len(parent)), _depths(parent)
        for d in range(1, depth.max() + 1):  # each generation after its parents'
            rows = np.flatnonzero(depth == d)
            root[rows] = root[parent[rows]]
        return root

    def _start(self, n_files):
        r = np.atleast_1d(np.asarray(self.r, np.float64))
        if len(r) == 1:
            r = np.repeat(r, n_files)
        if len(r) < n_files:
            raise InputError(f"DoubleWilsonPrior r has {len(r)} values for {n_files} files; give one per file_id "
                             "(on the command line --double-wilson-r).")
        if not ((r >= 0) & (r <= R_MAX)).all():
            raise InputError(f"DoubleWilsonPrior r={list(r)} must lie in [0, {R_MAX}] "
                             "(on the command line --double-wilson-r).")
        return r[:n_files]

    def _parents(self, reflections, n_files):
        """Row of every reflection's parent among ``reflections``, −1 for roots."""
        parent = np.full(len(reflections), -1, np.int64)
        keys = reflections.keys
        if reflections.anomalous and self.friedel:
            _, minus = map_to_asu(reflections.hkl, reflections.spacegroup, anomalous=False)
            mate = lookup_keys(keys, pack_hkl(-reflections.hkl, reflections.group))
            parent = np.where(minus, mate, parent)
        if self.parents is None:
            return parent
        if reflections.group is None:
            raise InputError("DoubleWilsonPrior parents tie files together; merge them with separate_files=True "
                             "(on the command line --separate-files).")
        file_parent = _file_parents(self.parents, n_files)
        ops = _reindexing_ops(self.reindexing_ops, n_files)
        group = reflections.group
        for k in np.flatnonzero(file_parent >= 0):
            rows = np.flatnonzero(group == k)
            hkl = reflections.hkl[rows]
            if ops[k] is not None:
                hkl = np.array([ops[k].apply_to_hkl(h) for h in hkl.tolist()], np.int32).reshape(-1, 3)
                hkl, _ = map_to_asu(hkl, reflections.spacegroup, anomalous=reflections.anomalous)
            parent[rows] = lookup_keys(keys, pack_hkl(hkl, np.full(len(rows), file_parent[k])))
        return parent


class Correlation(tf.Module):
    """The correlations r of a double-Wilson prior, shape (n_files, n_shells), as a
    flat tensor; learnable through a sigmoid onto (0, R_MAX) when ``trainable``.

    ``used`` marks the correlations some child reflection depends on; the others are
    reported as NaN by ``get_weights`` (no data speak to them). The conversions between
    r and the variable run in double precision in numpy, so that a merger rebuilt from
    its saved r has bit for bit the variable it was trained with."""

    def __init__(self, start, used, trainable=True, name="correlation"):
        super().__init__(name=name)
        self.shape = start.shape
        self.start = np.asarray(start, np.float64)
        self.used = np.asarray(used, bool)
        self.raw = tf.Variable(_logit(self.start.ravel()), trainable=trainable, name="r_raw")
        self.value = tfp.util.DeferredTensor(self.raw, tfb.Sigmoid(low=0.0, high=R_MAX))

    def flat(self):
        """The correlations as a flat tensor (row file·n_shells + shell)."""
        return tf.convert_to_tensor(self.value)

    def get_weights(self):
        """The correlations, NaN where unused."""
        raw = self.raw.numpy().astype(np.float64).reshape(self.shape)
        return np.where(self.used, R_MAX / (1 + np.exp(-raw)), np.nan)

    def set_weights(self, r):
        """Set the correlations from ``get_weights``'s array (NaN: the starting value); an
        array of another shape (a warm start on other files) is ignored."""
        r = np.asarray(r, np.float64)
        if r.shape != self.shape:
            return
        self.raw.assign(_logit(np.where(np.isnan(r), self.start, r).ravel()))


def _logit(r):
    """The variable of correlations r: the inverse of R_MAX·sigmoid, in double precision."""
    r = np.clip(np.asarray(r, np.float64), 1e-4, R_MAX - 1e-4) / R_MAX
    return np.log(r / (1 - r)).astype(np.float32)


def _shells(dhkl, children, n_shells):
    """Shell of every reflection, in ``n_shells`` shells of equal numbers of children
    in 1/d²."""
    if n_shells == 1 or not children.any():
        return np.zeros(len(dhkl), np.int64)
    s = 1.0 / np.square(dhkl.astype(np.float64))
    edges = np.quantile(s[children], np.linspace(0, 1, n_shells + 1)[1:-1])
    return np.searchsorted(edges, s, side="right").astype(np.int64)


def _file_parents(parents, n_files):
    """The parent file of every file (−1 for roots), checked."""
    if len(parents) < n_files:
        raise InputError(f"DoubleWilsonPrior parents has {len(parents)} entries for {n_files} files; give one per "
                         "file_id, None for roots (on the command line --double-wilson-parents).")
    file_parent = np.array([-1 if p is None else p for p in parents[:n_files]], np.int64)
    bad = [(k, p) for k, p in enumerate(file_parent) if p >= n_files or p == k or p < -1]
    if bad:
        k, p = bad[0]
        raise InputError(f"DoubleWilsonPrior parents: file {k} cannot have parent {p}; a parent is another "
                         f"file_id in 0…{n_files - 1} or None (on the command line --double-wilson-parents).")
    return file_parent


def _reindexing_ops(ops, n_files):
    """gemmi operators per file (None for the identity)."""
    if ops is None:
        return [None] * n_files
    if len(ops) < n_files:
        raise InputError(f"DoubleWilsonPrior reindexing_ops has {len(ops)} entries for {n_files} files "
                         "(on the command line --double-wilson-reindexing-ops).")
    parsed = []
    for op in ops[:n_files]:
        try:
            parsed.append(None if op is None else gemmi.Op(str(op)))
        except (RuntimeError, ValueError) as exc:
            raise InputError(f"DoubleWilsonPrior reindexing operator {op!r} is not a symmetry operator such as "
                             f"'-x,-y,z' ({exc}).") from None
    return [None if op is not None and op.triplet() == "x,y,z" else op for op in parsed]
