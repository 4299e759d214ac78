"""Linear-response covariances of prior-coupled amplitudes.

The posterior is mean-field: q(F) = Πᵢ q(Fᵢ). Where the prior ties amplitudes together
(the double-Wilson prior: a Friedel pair, a time series), the true posterior of a family
is correlated, and a mean-field fit is known to understate its marginal variances: each
member's variance is that of Fᵢ *given* its relatives at their means. For a tightly tied
Friedel pair, the variance of the pair's mean comes out near half the truth — a SIGF
that promises more than the data hold.

The linear-response correction (Giordano, Broderick & Jordan, JMLR 2018) rebuilds the
family's covariance from what the fit knows: the precision of each member (the inverse
of its mean-field variance) on the diagonal, and the expected cross-curvature of the log
prior between child and parent, E_q[∂² log p / ∂F_child ∂F_parent], off it. The inverse
of that matrix is the family's covariance: larger marginal variances, and the
covariance between a Friedel pair's halves that the mean and the anomalous difference
need.
"""

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

# A coupling is kept below this fraction of √(λ_child·λ_parent), so that each pair's
# 2 × 2 precision stays positive definite where the mean-field variances (from a
# non-Gaussian posterior) and the curvature (from samples) disagree.
_MAX_CORRELATION = 0.99


class FamilyCovariance:
    """Covariances of the amplitudes of prior-coupled families.

    Parameters
    ----------
    variance : ndarray of shape (n,)
        Mean-field posterior variance of every amplitude.
    parent : int ndarray of shape (n,)
        Row of every amplitude's prior parent, −1 for roots (a forest).
    coupling : ndarray of shape (n,)
        E_q[∂² log p(F_i | F_parent(i)) / ∂F_i ∂F_parent(i)] of every child (ignored for
        roots).

    Attributes
    ----------
    variance : ndarray of shape (n,)
        The linear-response marginal variances (the mean-field ones for families whose
        precision is not positive definite, and for roots without children).

    Examples
    --------
    >>> import numpy as np
    >>> from skmerge.model.linear_response import FamilyCovariance
    >>> cov = FamilyCovariance(np.array([1.0, 1.0, 4.0]), np.array([-1, 0, -1]), np.array([0.0, 0.5, 0.0]))
    >>> np.round(cov.variance, 3).tolist(), round(float(cov.covariance([0], [1])[0]), 3)
    ([1.333, 1.333, 4.0], 0.667)
    """

    def __init__(self, variance, parent, coupling):
        variance = np.asarray(variance, np.float64)
        parent = np.asarray(parent, np.int64)
        n = len(variance)
        child = np.flatnonzero(parent >= 0)
        precision = 1.0 / np.maximum(variance, np.finfo(np.float64).tiny)
        limit = _MAX_CORRELATION * np.sqrt(precision[child] * precision[parent[child]])
        off = -np.clip(np.nan_to_num(np.asarray(coupling, np.float64)[child]), -limit, limit)
        graph = coo_matrix((np.ones(len(child)), (child, parent[child])), shape=(n, n))
        _, self._family = connected_components(graph, directed=False)
        self.variance = variance.copy()
        # Rows are grouped by family and families by size, so that every family of one
        # size is inverted in one batched call (families are small: a Friedel pair, a
        # reflection across a time series).
        order = np.argsort(self._family, kind="stable")
        starts = np.flatnonzero(np.r_[True, np.diff(self._family[order]) != 0])
        sizes = np.diff(np.r_[starts, n])
        self._position = np.empty(n, np.int64)
        self._position[order] = np.arange(n) - np.repeat(starts, sizes)
        self._slot = np.empty(n, np.int64)
        self._size = np.empty(n, np.int64)
        self._size[order] = np.repeat(sizes, sizes)
        self._blocks = {}
        for size in np.unique(sizes[sizes > 1]):
            first = starts[sizes == size]
            rows = order[first[:, None] + np.arange(size)]
            self._slot[rows] = np.arange(len(first))[:, None]
            lam = np.zeros((len(first), size, size))
            lam[:, np.arange(size), np.arange(size)] = precision[rows]
            in_size = self._size[child] == size
            c, p, value = child[in_size], parent[child][in_size], off[in_size]
            lam[self._slot[c], self._position[c], self._position[p]] = value
            lam[self._slot[c], self._position[p], self._position[c]] = value
            definite = np.linalg.eigvalsh(lam)[:, 0] > 0
            sigma = np.zeros_like(lam)
            sigma[definite] = np.linalg.inv(lam[definite])
            fallback = np.flatnonzero(~definite)
            diagonal = np.arange(size)
            sigma[fallback[:, None], diagonal, diagonal] = variance[rows[fallback]]
            self._blocks[int(size)] = sigma
            self.variance[rows] = sigma[:, np.arange(size), np.arange(size)]

    def covariance(self, rows_a, rows_b):
        """Covariance of the amplitudes of ``rows_a`` and ``rows_b`` (pairwise), 0 for
        rows of different families."""
        rows_a, rows_b = np.asarray(rows_a, np.int64), np.asarray(rows_b, np.int64)
        out = np.zeros(len(rows_a))
        same = self._family[rows_a] == self._family[rows_b]
        for size, sigma in self._blocks.items():
            pick = same & (self._size[rows_a] == size)
            a, b = rows_a[pick], rows_b[pick]
            out[pick] = sigma[self._slot[a], self._position[a], self._position[b]]
        alone = same & (self._size[rows_a] == 1)
        out[alone] = self.variance[rows_a[alone]]
        return out
