"""Exact marginal posteriors of the amplitudes given the fitted scales and noise model.

The fit's posterior is mean-field: a truncated normal per reflection. Where a
reflection's few observations disagree several-fold, its posterior has a mode at each;
a truncated normal settles on one of them with a width that excludes the other, and its
SIGF promises what the data do not hold (bench/RESULTS.md: three reflections of 8,531
that were measured twice, once as a gross outlier, lift a simulated set's z SD from 1.13
to 1.25). With the scales, the error model and the likelihood held at their fitted
values, a reflection's posterior is one-dimensional, and a family of reflections tied by
the double-Wilson prior (a Friedel pair, a reflection across a time series) is a tree.
Both are integrated here on grids: each reflection's likelihood on a grid of F, and
sum-product messages along the prior's parent–child edges (each a grid × grid table of
the conditional law), which give every reflection's marginal moments to the grid's
resolution and the covariance of every child with its parent (a Friedel pair's, which
SIGDANO needs).

Each reflection's grid comes from three passes over its observations. A coarse uniform
grid from 0 past its largest observation, on which every observation's likelihood is
widened to at least the grid's spacing so that no mode falls between two points, finds
where the posterior has mass; the next grid puts its points at the quantiles of that
(and around the fit's own posterior, and evenly across the quantiles so that a valley
between two modes keeps points), and the last at the quantiles of the marginals the
second found. Points follow the mass, so a narrow peak beside a long tail (one weak
observation under a heavy-tailed likelihood) or a member of a tightly tied family is
resolved with a fixed number of points; the integrals are trapezoid sums over the
non-uniform points, and the double-Wilson prior's table is averaged over their cells.

The scales are taken at their posterior means: their fitted spread is of order 10⁻³ in
log Σ, far inside the amplitudes' widths. In Laue data the other harmonics of a spot
are held at their predicted intensities.
"""

from dataclasses import dataclass

import numpy as np
from scipy import special

from .._tf import tf

# Points per reflection of the coarse grid, and of the fine grid: at quantiles of the
# posterior as the last pass saw it, around the fit's posterior, and evenly across the
# quantiles' span. Quantiles leave a valley between two modes empty, and the trapezoid
# rule would bridge it at the height of its banks: with the fit's posterior on a narrow
# lower mode, a doctored pair's mean came out 6.07 for 5.46 (5.51 with 16 even points,
# 5.48 with 32).
_COARSE_POINTS = 64
_QUANTILE_POINTS = 48
_FIT_POINTS = 16
_EVEN_POINTS = 32
# The quantiles are those of a normal at this many SDs either side: the fine grid leaves
# about 10⁻⁷ of the mass outside on either side.
_QUANTILE_SPAN = 5.3
# The fit's posterior mean ± this many of its SDs.
_FIT_SPAN = 4.0
# The coarse grid reaches this far past the largest amplitude an observation implies, past
# the prior's root mean square times _PRIOR_SPAN, and past the fit's mean + 12 SDs.
_OBSERVED_SPAN = 1.25
_PRIOR_SPAN = 5.0
# Rows (observations' contributions) and edges evaluated at once.
_ROW_CHUNK = 50_000
_EDGE_CHUNK = 256


@dataclass
class GridMarginals:
    """The marginal posterior moments of every reflection of a fit.

    Attributes
    ----------
    values : ndarray of shape (4, n_reflections)
        E[F], E[F²], E[F⁴] and Cov(F, F_parent) of every reflection (0 for a reflection
        without a prior parent).
    parent : int ndarray of shape (n_reflections,)
        Row of every reflection's prior parent, −1 for roots.

    Examples
    --------
    >>> import numpy as np
    >>> from skmerge.model.marginals import GridMarginals
    >>> marginals = GridMarginals(np.array([[2.0, 3.0], [5.0, 10.0], [0, 0], [0.0, 0.5]]), np.array([-1, 0]))
    >>> marginals.variance.tolist(), marginals.covariance(np.array([0]), np.array([1])).tolist()
    ([1.0, 1.0], [0.5])
    """

    values: np.ndarray
    parent: np.ndarray

    @classmethod
    def under(cls, prior, values):
        """The marginals ``values`` of the reflections of ``prior``, whose parent forest
        (a double-Wilson prior's; none for others) they follow."""
        values = np.asarray(values, np.float64)
        return cls(values, _parents(prior, values.shape[1]))

    def raw_moments(self):
        """E[F], E[F²], E[F³] (not kept: NaN) and E[F⁴] of every reflection, in the
        order of a distribution's ``raw_moments``."""
        m1, m2, m4, _ = self.values
        return m1, m2, np.full_like(m1, np.nan), m4

    @property
    def variance(self):
        m1, m2 = self.values[:2]
        return np.maximum(m2 - m1**2, 0.0)

    def covariance(self, a, b):
        """Cov(F_a, F_b) of the pairs of rows ``a``, ``b`` that are parent and child (0
        for other pairs)."""
        a, b = np.asarray(a), np.asarray(b)
        cov = self.values[3]
        return np.where(self.parent[a] == b, cov[a], np.where(self.parent[b] == a, cov[b], 0.0))


def grid_marginals(model, data_chunks, n_reflections):
    """The marginal posterior of every reflection of a trained model, on grids.

    Parameters
    ----------
    model : MergingModel
        Trained; its scales, error model and likelihood are held at their fitted values.
    data_chunks : callable
        Returns an iterator over the training data in pieces (dicts of tensors as the
        model reads them, never splitting a Laue spot); called once.
    n_reflections : int

    Returns
    -------
    GridMarginals

    Examples
    --------
    A merger computes them after training with ``marginals="grid"``:

    >>> from skmerge import VariationalMerger
    >>> from skmerge.datasets import make_unmerged
    >>> X, _ = make_unmerged(n_images=6, random_state=0)
    >>> merger = VariationalMerger(marginals="grid", mlp_layers=2, max_iter=20, random_state=0).fit(X)
    >>> merger.marginal_moments_.shape == (4, len(merger.reflections_))
    True
    """
    rows = _row_terms(model, data_chunks(), n_reflections)
    prior = model.prior
    parent = _parents(prior, n_reflections)
    q_mean, q_var = (m.numpy().astype(np.float64) for m in model.posterior.distribution().raw_moments()[:2])
    q_sd = np.sqrt(np.maximum(q_var - q_mean**2, 0.0))
    marginal_law = getattr(prior, "wilson", prior)
    root_law = getattr(prior, "root_law", prior)
    prior_rms = np.sqrt(marginal_law.raw_moments()[1].numpy().astype(np.float64))

    top = np.maximum.reduce([_OBSERVED_SPAN * rows.implied_max, q_mean + 12 * q_sd, _PRIOR_SPAN * prior_rms])
    coarse = top[:, None] * np.linspace(0.0, 1.0, _COARSE_POINTS)
    own_law = _own_law_on(marginal_law, root_law, parent)
    potential = _log_likelihood_on(model, rows, coarse, widen=top / (_COARSE_POINTS - 1)) + own_law(coarse)
    # Twice: points at the quantiles of the widened coarse posterior, then at those of
    # the first fine pass's marginals (where a narrow peak, or a family's tie, puts them).
    grid, log_density = coarse, potential + _log_trapezoid(coarse)
    for _ in range(2):
        grid = _fine_grid(grid, log_density, q_mean, q_sd)
        likelihood = _log_likelihood_on(model, rows, grid)
        log_density, covariance = _beliefs(prior, grid, likelihood, own_law, parent)
    weight = np.exp(log_density - log_density.max(axis=1, keepdims=True))
    weight /= weight.sum(axis=1, keepdims=True)
    values = np.stack([(weight * grid**k).sum(axis=1) for k in (1, 2, 4)] + [covariance])
    return GridMarginals(values, parent)


def _beliefs(prior, grid, likelihood, own_law, parent):
    """Every reflection's log-marginal mass at the points of its grid (up to a constant)
    and its covariance with its prior parent, from its log-likelihood there."""
    roots = parent < 0
    own = likelihood + _log_trapezoid(grid) + np.where(roots[:, None], own_law(grid), 0.0)
    if roots.all():
        return own, np.zeros(len(parent))
    return _tree_beliefs(prior, grid, own, parent)


def _log_trapezoid(grid):
    """log of the trapezoid rule's weight of every point of sorted grids (−∞ for a point
    that repeats its neighbours)."""
    with np.errstate(divide="ignore"):
        return np.log(_cells(grid))


def _cells(grid):
    """The width every point of sorted grids stands for (the trapezoid rule's weight)."""
    padded = np.concatenate([grid[:, :1], grid, grid[:, -1:]], axis=1)
    return (padded[:, 2:] - padded[:, :-2]) / 2


def _parents(prior, n_reflections):
    """Row of every reflection's parent in the prior's forest (a double-Wilson prior's;
    −1 for every reflection of a prior that ties none)."""
    return np.asarray(getattr(prior, "parent", np.full(n_reflections, -1)), np.int64)


def _fine_grid(grid, log_mass, q_mean, q_sd):
    """Sorted grids of points at the quantiles of the mass ``log_mass`` on ``grid`` (the
    cumulative mass interpolated linearly), around the fit's posterior, and evenly
    spaced across the quantiles."""
    mass = np.exp(log_mass - log_mass.max(axis=1, keepdims=True))
    cumulative = np.cumsum(mass, axis=1)
    cumulative /= cumulative[:, -1:]
    levels = special.ndtr(np.linspace(-_QUANTILE_SPAN, _QUANTILE_SPAN, _QUANTILE_POINTS))
    # The first point at or past each level, every row searched at once: shifted by 2
    # per row, the rows' cumulative masses (each within [0, 1]) form one sorted array.
    n, points = grid.shape
    shift = 2.0 * np.arange(n)[:, None]
    above = np.searchsorted((cumulative + shift).ravel(), (levels + shift).ravel()).reshape(n, -1)
    right = np.minimum(above - points * np.arange(n)[:, None], points - 1)
    left = np.maximum(right - 1, 0)
    rows = np.arange(n)[:, None]
    low, high = cumulative[rows, left], cumulative[rows, right]
    fraction = np.clip(np.divide(levels - low, high - low, out=np.zeros_like(low), where=high > low), 0, 1)
    quantiles = grid[rows, left] + fraction * (grid[rows, right] - grid[rows, left])
    around_fit = q_mean[:, None] + q_sd[:, None] * np.linspace(-_FIT_SPAN, _FIT_SPAN, _FIT_POINTS)
    even = quantiles[:, :1] + (quantiles[:, -1:] - quantiles[:, :1]) * np.linspace(0.0, 1.0, _EVEN_POINTS)
    return np.sort(np.maximum(np.concatenate([quantiles, around_fit, even], axis=1), 0.0), axis=1)


def _own_law_on(marginal_law, root_law, parent):
    """A function of grids over every reflection giving each reflection's prior
    log-density on its own: a root's law, a child's marginal (Wilson's) law."""
    child = parent >= 0

    def log_prob(grid):
        values = _log_prob_on(root_law, grid)
        if child.any():
            values[child] = _log_prob_on(marginal_law, grid)[child]
        return values

    return log_prob


@dataclass
class _Rows:
    """Per row of the data: its reflection, the observed intensity and σ of its
    observation, its expected scale, and what the other harmonics of its spot are
    predicted to add (0 without harmonics); per reflection, the largest amplitude one of
    its observations implies."""

    refl: np.ndarray
    intensity: np.ndarray
    sigma: np.ndarray
    scale: np.ndarray
    offset: np.ndarray
    implied_max: np.ndarray


def row_pieces(model, chunks):
    """Per piece of ``chunks`` (evaluation data): every row's reflection, observed
    intensity and σ, expected scale, and what the other harmonics of its spot are
    predicted to add (0 without harmonics) — a Laue spot's intensity and σ on each of its
    harmonics' rows.

    Examples
    --------
    >>> refl, intensity, sigma, scale, offset = next(row_pieces(model, chunks))  # doctest: +SKIP
    """
    for chunk in chunks:
        mean, _, scale, _ = (v.numpy().astype(np.float64) for v in model.predict(chunk))
        intensity, sigma = chunk["intensity"].numpy(), chunk["sigma"].numpy()
        offset = np.zeros_like(mean)
        if "spot" in chunk:
            spot = chunk["spot"].numpy()
            offset = np.bincount(spot, mean, len(intensity))[spot] - mean
            intensity, sigma = intensity[spot], sigma[spot]
        yield chunk["refl"].numpy(), intensity, sigma, scale, offset


def _row_terms(model, chunks, n_reflections):
    # Single precision: a streamed fit keeps these for every observation of its store.
    pieces = [(refl, *(v.astype(np.float32) for v in values)) for refl, *values in row_pieces(model, chunks)]
    refl, intensity, sigma, scale, offset = (np.concatenate(p) for p in zip(*pieces))
    implied_max = np.zeros(n_reflections)
    np.maximum.at(implied_max, refl, np.sqrt(np.maximum(intensity - offset, 0.0) / scale.astype(np.float64)))
    return _Rows(refl, intensity, sigma, scale, offset, implied_max)


def _log_likelihood_on(model, rows, grid, widen=None):
    """Σ over each reflection's rows of log p(I | Σ·F² + offset, σ) at every point F of
    the reflection's grid (shape (n_reflections, points)); with ``widen`` (per
    reflection) every row's σ widened so that its likelihood in F is at least that wide."""
    n, points = grid.shape
    total = np.zeros((n, points))
    for start in range(0, len(rows.refl), _ROW_CHUNK):
        piece = slice(start, start + _ROW_CHUNK)
        refl, scale = rows.refl[piece], rows.scale[piece, None].astype(np.float64)
        f = grid[refl]
        sigma = np.broadcast_to(rows.sigma[piece, None], f.shape)
        if widen is not None:
            # A row's likelihood in F is σ/(2ΣF) wide.
            sigma = np.sqrt(sigma**2 + (2 * scale * f * widen[refl, None]) ** 2)
        data = {"intensity": tf.constant(rows.intensity[piece, None], tf.float32),
                "sigma": tf.constant(sigma, tf.float32)}
        log_lik = model.observation_log_likelihood(data, tf.constant(scale * f**2 + rows.offset[piece, None],
                                                                     tf.float32))
        total += tf.math.unsorted_segment_sum(tf.cast(log_lik, tf.float64), refl, n).numpy()
    return total


def _log_prob_on(law, grid):
    """log p(F) of the prior ``law`` (a distribution over all reflections) at every
    point of each reflection's grid."""
    return law.log_prob(tf.constant(grid.T, tf.float32)).numpy().T.astype(np.float64)


def _tree_beliefs(prior, grid, own, parent):
    """Sum-product on the prior's forest: every reflection's log-marginal on its grid,
    and the covariance of every child with its parent.

    ``own`` is each reflection's log-likelihood (with a root's prior and the quadrature
    weights). Upwards, each child sends its parent log Σⱼ p(F_c = g_j | F_p)·(its own
    potential and its children's messages); downwards, each child receives its parent's
    belief without its own message, passed through the same table."""
    depth = prior.depth
    # Children ordered by kind (acentric, centric), so that most pieces hold one kind.
    centric = prior.centric.numpy()
    upward = own.copy()
    sent = np.zeros_like(own)
    for d in range(depth.max(), 0, -1):
        for children in _edge_chunks(np.flatnonzero(depth == d), centric):
            kernel = _edge_log_kernel(prior, grid, parent, children)
            sent[children] = _logsumexp(kernel + upward[children, :, None], axis=1)
            np.add.at(upward, parent[children], sent[children])
    belief = upward.copy()
    covariance = np.zeros(len(parent))
    for d in range(1, depth.max() + 1):
        for children in _edge_chunks(np.flatnonzero(depth == d), centric):
            kernel = _edge_log_kernel(prior, grid, parent, children)
            # The parent's belief without this child's message (−∞ where the message is:
            # no joint mass lies there whatever the rest says).
            message = sent[children]
            cavity = np.where(np.isfinite(message), belief[parent[children]] - message, -np.inf)
            joint = upward[children, :, None] + kernel + cavity[:, None, :]
            belief[children] = _logsumexp(joint, axis=2)
            joint = np.exp(joint - joint.max(axis=(1, 2), keepdims=True))
            joint /= joint.sum(axis=(1, 2), keepdims=True)
            child_f, parent_f = grid[children], grid[parent[children]]
            mean_child = np.einsum("eji,ej->e", joint, child_f)
            mean_parent = np.einsum("eji,ei->e", joint, parent_f)
            covariance[children] = np.einsum("eji,ej,ei->e", joint, child_f, parent_f) - mean_child * mean_parent
    return belief, covariance


def _edge_chunks(rows, centric):
    rows = rows[np.argsort(centric[rows], kind="stable")]
    for start in range(0, len(rows), _EDGE_CHUNK):
        yield rows[start:start + _EDGE_CHUNK]


def _edge_log_kernel(prior, grid, parent, children):
    """log p(F_child = g_j | F_parent = g_i) of the prior for every child of
    ``children``, averaged over the grids' cells (a tightly tied pair's law may be
    narrower than their spacing): shape (children, child points j, parent points i)."""
    cells = _cells(grid)
    values = (grid[children][:, :, None], grid[parent[children]][:, None, :], cells[children][:, :, None],
              cells[parent[children]][:, None, :])
    # Single precision: the log-densities are summed in double precision afterwards.
    return prior.conditional_log_prob(children, *(tf.constant(v, tf.float32) for v in values)).numpy()


def _logsumexp(values, axis):
    top = np.max(values, axis=axis, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return np.log(np.exp(values - top).sum(axis=axis)) + np.squeeze(top, axis=axis)
