"""The inverse-variance merge: the trivial baseline of tests and benchmarks."""

import numpy as np

from .errors import InputError
from .merged import friedel_halves, merged_table
from .symmetry import map_to_asu, unique_hkl


def merge_inverse_variance(X, *, anomalous=False, scale=None, intensity_key="Iobs", sigma_key="SIGIobs"):
    """Merge observations by their inverse-variance weighted mean.

    Each ASU reflection gets I = Σ wᵢIᵢ / Σ wᵢ with wᵢ = 1/σᵢ², SIGI = (Σ wᵢ)^(-1/2) and
    N, the number of observations. No scaling is done: divide known scales out with
    ``scale``.

    Parameters
    ----------
    X : rs.DataSet
        Observation table (:func:`skmerge.read_unmerged`); the ASU mapping is redone from
        Hobs, Kobs, Lobs (or H, K, L) so that either Friedel convention can be asked for.
    anomalous : bool, default=False
        Also merge the Friedel halves apart: I(+), SIGI(+), I(-), SIGI(-), N(+), N(-).
    scale : array-like of shape (n_observations,), optional
        Divide each observation's I and σ by this before merging.
    intensity_key, sigma_key : str
        Columns holding the intensities and their σ.

    Returns
    -------
    rs.DataSet
        Indexed by the ASU H, K, L (Friedel mates together), sorted: I, SIGI, N and, with
        ``anomalous=True``, the Friedel columns. Matches ``rs.algorithms.merge``.

    Examples
    --------
    >>> from skmerge.datasets import make_unmerged
    >>> X, truth = make_unmerged(n_images=20, random_state=0)
    >>> merged = merge_inverse_variance(X, scale=truth.scale)
    >>> list(merged.columns)
    ['I', 'SIGI', 'N']
    """
    if X.spacegroup is None:
        raise InputError("X has no space group; build it with skmerge.read_unmerged.")
    intensity = X[intensity_key].to_numpy(np.float64)
    sigma = X[sigma_key].to_numpy(np.float64)
    if scale is not None:
        scale = np.asarray(scale, dtype=np.float64)
        if scale.shape != intensity.shape or not (scale > 0).all():
            raise InputError("scale must hold one positive number per observation of X.")
        intensity, sigma = intensity / scale, sigma / scale
    keys = ["Hobs", "Kobs", "Lobs"] if "Hobs" in X.columns else ["H", "K", "L"]
    hkl_obs = X[keys].to_numpy(np.int32)

    merged_hkl, columns = _weighted_means(map_to_asu(hkl_obs, X.spacegroup, False)[0], intensity, sigma)
    if anomalous:
        half_hkl, halves = _weighted_means(map_to_asu(hkl_obs, X.spacegroup, True)[0], intensity, sigma)
        _, friedel = friedel_halves(half_hkl, halves, X.spacegroup)
        friedel["N(+)"] = np.nan_to_num(friedel["N(+)"]).astype(np.int32)
        friedel["N(-)"] = np.nan_to_num(friedel["N(-)"]).astype(np.int32)
        columns.update(friedel)
    return merged_table(merged_hkl, columns, X.spacegroup, X.cell)


def _weighted_means(hkl, intensity, sigma):
    unique, row = unique_hkl(hkl)
    mean, error = inverse_variance_mean(row, intensity, sigma, len(unique))
    count = np.bincount(row, minlength=len(unique))
    return unique, {"I": mean, "SIGI": error, "N": count.astype(np.int32)}


def inverse_variance_mean(group, values, sigma, n_groups):
    """Inverse-variance weighted mean of the values in each of ``n_groups`` groups and its
    standard error; NaN for groups without values.

    A bincount over dense group ids is ~50× faster than a pandas group-by on
    reciprocalspaceship's extension dtypes.
    """
    weight = sigma**-2.0
    return means_of_sums(np.bincount(group, weights=weight, minlength=n_groups),
                         np.bincount(group, weights=weight * values, minlength=n_groups))


def means_of_sums(total_weight, weighted_sum):
    """Inverse-variance means and their standard errors from each group's sum of weights
    1/σ² and of weighted values (sums that can be accumulated piece by piece); NaN for
    groups without weight.

    Examples
    --------
    >>> mean, error = means_of_sums(np.array([4.0, 0.0]), np.array([8.0, 0.0]))
    >>> float(mean[0]), float(error[0]), bool(np.isnan(mean[1]))
    (2.0, 0.5, True)
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        return weighted_sum / total_weight, np.where(total_weight > 0, total_weight, np.nan) ** -0.5


def robust_mean(group, values, sigma, n_groups, cutoff=3.0, rounds=3, start=None):
    """:func:`inverse_variance_mean` with robust weights: an observation further from its
    group's mean than ``cutoff`` times the typical scatter has its weight divided by the
    square of how much further (a redescending influence, so that a zinger a hundred σ
    away counts for nothing). The typical scatter is the robust SD (1.4826·MAD) of all normalised
    residuals (v − mean)/σ, at least 1, so that uniformly understated σ do not make
    every observation an outlier.

    The iterations start from each group's median (or from ``start``, a value per group),
    so that a gross outlier cannot drag the first mean (and with it every residual) its
    way. A merge that starts a heavy-tailed fit must not hold the outliers it is meant to
    ignore: a Student-t likelihood keeps a reflection near a contaminated start, taking
    the outlier for the inlier. The first round measures the typical scatter about the
    medians whatever the start: a start at one observation gives it no residual, and with
    many such groups the scatter would shrink until their other observations all looked
    like outliers.

    Examples
    --------
    >>> import numpy as np
    >>> group = np.zeros(6, int)
    >>> values, sigma = np.array([1.0, 1.1, 0.9, 1.0, 1.05, 40.0]), np.full(6, 0.1)
    >>> float(inverse_variance_mean(group, values, sigma, 1)[0][0]) > 7
    True
    >>> round(float(robust_mean(group, values, sigma, 1)[0][0]), 3)
    1.01
    """
    centre = group_median(group, values, n_groups)
    mean, error = centre if start is None else start, None
    for _ in range(rounds):
        about_centre = np.abs(values - centre[group]) / sigma
        finite = np.isfinite(about_centre)
        if not finite.any():
            return inverse_variance_mean(group, values, sigma, n_groups)
        spread = residual_spread(about_centre[finite])
        residual = np.abs(values - mean[group]) / sigma
        mean, error = inverse_variance_mean(group, values, sigma * outlier_excess(residual, spread, cutoff), n_groups)
        centre = mean
    return mean, error


def residual_spread(residual, weights=None):
    """The typical scatter of the absolute normalised residuals (v − mean)/σ for :func:`robust_mean`:
    1.4826 times their median (weighted by ``weights`` when given), at least 1.

    Examples
    --------
    >>> residual_spread(np.array([0.5, 2.0, 4.0])), residual_spread(np.array([2.0, 4.0]), np.array([3.0, 1.0]))
    (2.9652, 2.9652)
    """
    if weights is None:
        median = float(np.median(residual))
    else:
        order = np.argsort(residual)
        cumulative = np.cumsum(weights[order])
        median = float(residual[order][np.searchsorted(cumulative, 0.5 * cumulative[-1])])
    return max(1.0, 1.4826 * median)


def outlier_excess(residual, spread, cutoff):
    """How many times further than ``cutoff`` × ``spread`` each normalised residual lies
    (at least 1; NaN counts as 1): :func:`robust_mean` divides weights by its square.

    Examples
    --------
    >>> outlier_excess(np.array([1.0, 12.0, np.nan]), 2.0, 3.0).tolist()
    [1.0, 2.0, 1.0]
    """
    return np.maximum(np.nan_to_num(residual, nan=0.0) / (cutoff * spread), 1.0)


def group_median(group, values, n_groups):
    """The median of the values of each group (NaN for empty groups), by one sort.

    Examples
    --------
    >>> group_median(np.array([0, 0, 0, 2]), np.array([3.0, 1.0, 2.0, 5.0]), 3).tolist()
    [2.0, nan, 5.0]
    """
    order = np.lexsort((values, group))
    count = np.bincount(group, minlength=n_groups)
    start = np.concatenate([[0], np.cumsum(count)[:-1]])
    sorted_values = np.append(values[order], np.nan)
    low = np.where(count > 0, start + (count - 1) // 2, len(values))
    high = np.where(count > 0, start + count // 2, len(values))
    return 0.5 * (sorted_values[low] + sorted_values[high])
