"""Starting values near the answer: a quick per-image scaling, an inverse-variance merge
and French–Wilson amplitudes, so that the variational fit needs far fewer steps than one
started from the prior.
"""

import warnings

import numpy as np
import pandas as pd
import reciprocalspaceship as rs
from reciprocalspaceship.algorithms.scale_merged_intensities import _french_wilson_posterior_quad

from ..baseline import group_median, inverse_variance_mean, residual_spread
from ..shells import make_shells
from ..symmetry import pack_hkl

SCALING_ROUNDS = 5
# Reflections per French–Wilson quadrature call: 100 grid points each, ~10 arrays of
# float64, so ~16 MB at a time (10,000 made the initialisation of a half-dataset merge
# the peak of a whole hypf run).
_FRENCH_WILSON_CHUNK = 2_000
_HALF_NORMAL_MEAN_OVER_SD = np.sqrt(2 / (np.pi - 2))
# Families of at most this many observations may start the robust merge from their most
# probable observation (:func:`probable_observations`); larger ones from their median,
# which a minority of outliers cannot move.
_CANDIDATE_MEMBERS = 6
# The Student-t that scores those candidates: a tail heavy enough that one gross outlier
# costs the candidates near the others little.
_CANDIDATE_DOF = 4.0
# A family is undecided when none of its observations lies within this many typical
# scatters of its median: twice the robust merge's outlier cutoff, since a still's partial
# and full observations also disagree at the start (its scales know no partiality) and
# the prior would pick the partial one. At 3 scatters 1 % of thermolysin's small
# families were taken (173) and its CC1/2 fell by 0.001-0.002 in each of 3 splits; at 6,
# 27; a zinger of a simulated pair lies 24 scatters from the median.
_UNDECIDED_SCATTERS = 6.0
# Below this fraction of Σ a candidate's prior density is taken at the fraction (the
# centric density diverges at 0, and observations can be negative).
_CANDIDATE_PRIOR_FLOOR = 0.01


def quick_image_scales(refl, image, intensity, sigma, n_reflections, n_images):
    """Per-image scale factors k and the merged intensities of the scaled data.

    Alternates an inverse-variance merge of I/k with a weighted least-squares fit of each
    image's k to the merged intensities (bincount-based: this runs on every observation).
    The merge is deliberately not the robust one of the posterior's start: one k per
    image leaves whatever else varies (a Laue spectrum across each image) in the
    residuals, and robust weights would then discard observations by wavelength — on PYP
    the fit started that way lost its amplitudes (CC with the plain start's merge 0.36).
    The k are normalised to a geometric mean of 1.
    """
    k = np.ones(n_images)
    w = sigma**-2.0
    for _ in range(SCALING_ROUNDS):
        merged, _ = inverse_variance_mean(refl, intensity / k[image], sigma / k[image], n_reflections)
        pred = merged[refl]
        num = np.bincount(image, weights=w * intensity * pred, minlength=n_images)
        den = np.bincount(image, weights=w * pred * pred, minlength=n_images)
        k = image_scale_factors(num, den)
        k = np.maximum(k, scale_floor(k))
        k /= np.exp(np.mean(np.log(k)))
    merged, merged_sigma = inverse_variance_mean(refl, intensity / k[image], sigma / k[image], n_reflections)
    return k, merged, merged_sigma


def probable_observations(group, values, sigma, n_groups, wilson_sigma, centric, weights=None):
    """Where the robust merge of the start (:func:`~skmerge.baseline.robust_mean`) begins
    each group of observations (a family of reflections): its median, unless no
    observation lies within ``_UNDECIDED_SCATTERS`` typical scatters of it; then,
    for a group of at most ``_CANDIDATE_MEMBERS`` observations, the observation most
    probable as the group's intensity — its Wilson prior density (mean ``wilson_sigma`` of
    the group; centric or not) times a Student-t likelihood of every observation of the
    group, residuals in units of σ times the typical scatter about the medians
    (:func:`_pair_scatter`, the residuals' ``weights`` given).

    The median of two observations is their midpoint, and a pair whose one observation is
    a gross outlier would start there, a redescending merge would keep both, and the
    fit's heavy-tailed likelihood would then settle on either: on simulated data with 1 %
    outliers three such pairs (of 8,500 reflections) ended at the outlier, 14 to 75 SIGF
    from the truth, a fifth to two fifths of all squared z-scores. The two observations
    explain each other equally badly, so the prior decides, as it would in the posterior.
    Where some observation lies near the median the merge can tell inliers from outliers
    by itself, and the median stays.

    Examples
    --------
    A pair with an outlier starts at the observation the prior prefers; a large group at
    its median:

    >>> group = np.array([0, 0, 1, 1, 1, 1, 1, 1, 1])
    >>> values = np.array([1.0, 9.0, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 9.0])
    >>> probable_observations(group, values, np.full(9, 0.1), 2, np.ones(2), np.zeros(2, bool)).tolist()
    [1.0, 1.3]
    """
    centres = group_median(group, values, n_groups)
    count = np.bincount(group, minlength=n_groups)
    residual = np.abs(values - centres[group]) / sigma
    spread = _pair_scatter(residual, count[group], weights)
    if not np.isfinite(spread):
        return centres
    undecided = np.bincount(group, weights=residual <= _UNDECIDED_SCATTERS * spread, minlength=n_groups) == 0
    order = np.argsort(group, kind="stable")
    member_group, member_value, member_sigma = group[order], values[order], sigma[order]
    first = np.concatenate([[0], np.cumsum(count)[:-1]])[member_group]
    candidate = np.flatnonzero((count[member_group] <= _CANDIDATE_MEMBERS) & undecided[member_group])
    if not len(candidate):
        return centres
    g, value = member_group[candidate], member_value[candidate]
    score = np.zeros(len(candidate))
    for offset in range(_CANDIDATE_MEMBERS):
        present = offset < count[g]
        partner = np.where(present, first[candidate] + offset, candidate)
        r = (member_value[partner] - value) / (member_sigma[partner] * spread)
        score -= np.where(present, (_CANDIDATE_DOF + 1) / 2 * np.log1p(r * r / _CANDIDATE_DOF), 0.0)
    prior_sigma = wilson_sigma[g]
    intensity = np.maximum(value, _CANDIDATE_PRIOR_FLOOR * prior_sigma)
    score += np.where(centric[g], -intensity / (2 * prior_sigma) - 0.5 * np.log(intensity / prior_sigma),
                      -intensity / prior_sigma)
    score = np.where(np.isfinite(score), score, -np.inf)
    best = np.lexsort((score, g))
    last = best[np.r_[g[best][1:] != g[best][:-1], True]]
    centres[g[last]] = value[last]
    return centres


def _pair_scatter(residual, count, weights=None):
    """The typical scatter (:func:`~skmerge.baseline.residual_spread`) of the absolute
    normalised residuals about their groups' medians, of the observations of groups of
    ``count`` ≥ 2 only, each divided by √((n − 1)/n) (∞ when no group has two).

    A residual about its own group's centre is smaller than one about the truth: 0 for a
    group of one, and for a pair half its difference. With many such groups (stills, a
    short sweep) the scatter would look small and sound pairs undecided; the correction
    is exact for a mean, close for a median.

    Examples
    --------
    >>> round(_pair_scatter(np.array([0.0, 2.0, 2.0]), np.array([1, 2, 2])), 4)
    4.1934
    """
    shared = np.isfinite(residual) & (count > 1)
    if not shared.any():
        return np.inf
    shrinkage = np.sqrt((count[shared] - 1) / count[shared])
    return residual_spread(residual[shared] / shrinkage, None if weights is None else weights[shared])


def image_scale_factors(num, den):
    """Each image's least-squares scale k = Σ wIp / Σ wp² from those two sums (1 where
    the second is 0)."""
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 1.0)


def scale_floor(k):
    """The smallest scale factor kept: 10⁻³ of the median positive k (k can come out
    zero or negative for an image of noise)."""
    return 1e-3 * np.median(k[k > 0]) if (k > 0).any() else 1e-3


def wilson_curve(dhkl, intensity_over_epsilon, n_bins=20):
    """Mean intensity (I/ε) against resolution: equal-count shells of 1/d² over the
    reflections given (:func:`skmerge.shells.make_shells`), at most one shell per 50
    reflections.

    Returns ``(centres, means)``, the mean 1/d² and mean I/ε of each shell; means are kept
    positive (weak high-resolution shells can average below zero).
    """
    s = 1 / np.asarray(dhkl, dtype=np.float64) ** 2
    n_bins = max(1, min(n_bins, len(s) // 50))
    which = make_shells(dhkl, n_bins).assign(dhkl)
    count = np.maximum(np.bincount(which, minlength=n_bins), 1)
    centres = np.bincount(which, weights=s, minlength=n_bins) / count
    means = np.bincount(which, weights=intensity_over_epsilon, minlength=n_bins) / count
    floor = 1e-3 * max(float(np.mean(intensity_over_epsilon)), 1e-12)
    return centres, np.maximum(means, floor)


def evaluate_curve(curve, dhkl):
    """A :func:`wilson_curve` interpolated at resolutions ``dhkl`` (constant beyond its
    ends)."""
    centres, means = curve
    return np.interp(1 / np.asarray(dhkl, dtype=np.float64) ** 2, centres, means)


def french_wilson(reflections, intensity, sigma):
    """French–Wilson amplitude estimates (mean, sd) of merged intensities under a Wilson
    prior whose mean intensity Σ(d) comes from the data themselves (:func:`wilson_curve`);
    NaN where the intensity is.

    The posterior moments are reciprocalspaceship's Chebyshev–Gauss quadrature. Its public
    wrapper (``rs.algorithms.scale_merged_intensities``) estimates Σ with a kernel smoother
    that holds an (n_reflections × 20·bins) matrix — gigabytes at a million reflections —
    so Σ is taken from the shell means here and the quadrature runs in bounded chunks.
    """
    f = np.full(len(intensity), np.nan)
    sigf = np.full(len(intensity), np.nan)
    ok = np.flatnonzero(np.isfinite(intensity) & np.isfinite(sigma) & (sigma > 0))
    if len(ok) < 2:
        return f, sigf
    epsilon = reflections.epsilon.astype(np.float64)
    curve = wilson_curve(reflections.dhkl[ok], intensity[ok] / epsilon[ok])
    wilson_sigma = evaluate_curve(curve, reflections.dhkl) * epsilon
    for chunk in np.array_split(ok, -(-len(ok) // _FRENCH_WILSON_CHUNK)):
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            _, _, f[chunk], sigf[chunk] = _french_wilson_posterior_quad(
                intensity[chunk], sigma[chunk], wilson_sigma[chunk], reflections.centric[chunk]
            )
    return f, sigf


def wilson_moments(reflections):
    """Mean and standard deviation of every reflection's amplitude under Wilson's prior
    (Rayleigh for acentric, half-normal for centric reflections) of mean intensity
    ε·``mean_intensity``."""
    sigma = reflections.epsilon.astype(np.float64) * reflections.mean_intensity
    centric = reflections.centric
    mean = np.where(centric, np.sqrt(2 * sigma / np.pi), np.sqrt(np.pi * sigma) / 2)
    sd = np.sqrt(sigma * np.where(centric, 1 - 2 / np.pi, 1 - np.pi / 4))
    return mean, sd


def table_start(table, reflections, loc, scale):
    """The posterior's start (``loc``, ``scale``, in standardised units, from the data)
    with the reflections of a merged ``table`` (a DataFrame, or the path of an MTZ file)
    started at its amplitudes instead.

    The table's amplitudes (with Friedel mates apart when it has ``F(+)``/``F(-)`` and
    the reflections are anomalous; else one value serves both mates) are brought to the
    units of the data's start by one factor, matching their mean squares over the shared
    reflections, and every one is turned into the truncated normal of that mean and
    standard deviation (:func:`truncated_normal_parameters`). Raises InputError when the
    table shares no reflection with the data.
    """
    from ..errors import InputError
    from ..symmetry import lookup_hkl
    from .priors import _reference_amplitudes

    if not isinstance(table, pd.DataFrame):
        try:
            table = rs.read_mtz(str(table))
        except (RuntimeError, OSError, ValueError) as exc:
            raise InputError(f"{table}: cannot read the MTZ of posterior_init ({exc}).") from exc
    hkl, f, sigf = _anomalous_amplitudes(table) if reflections.anomalous else (None, None, None)
    if hkl is None:
        hkl, f, sigf = _reference_amplitudes(table, reflections)
    row = lookup_hkl(hkl, reflections.hkl)
    found = row >= 0
    if not found.any():
        raise InputError("the posterior_init table shares no reflection with the data.")
    start_mean_square = np.mean(loc[found] ** 2 + scale[found] ** 2)
    norm = np.sqrt(np.mean(f[row[found]] ** 2) / start_mean_square)
    loc, scale = loc.copy(), scale.copy()
    loc[found], scale[found] = truncated_normal_parameters(f[row[found]] / norm, sigf[row[found]] / norm)
    return loc, scale


def _anomalous_amplitudes(table):
    """(hkl, F, SIGF) of a merged table's Friedel halves, Friedel-minus indices negated
    (reciprocalspaceship's ``stack_anomalous`` convention); None when it has no
    ``F(+)``/``F(-)`` columns (skmerge's ``SIGF(±)`` or careless's ``SigF(±)``)."""
    columns = set(table.columns)
    sigma = next((s for s in ("SIGF", "SigF") if {f"{s}(+)", f"{s}(-)"} <= columns), None)
    if not {"F(+)", "F(-)"} <= columns or sigma is None:
        return None, None, None
    halves = []
    for sign, suffix in ((1, "(+)"), (-1, "(-)")):
        half = table[[f"F{suffix}", f"{sigma}{suffix}"]].reset_index()
        half.columns = ["H", "K", "L", "F", "SIGF"]
        half[["H", "K", "L"]] = sign * half[["H", "K", "L"]].to_numpy(np.int32)
        halves.append(half)
    stacked = pd.concat(halves, ignore_index=True)
    f, sigf = (stacked[c].to_numpy(np.float64, na_value=np.nan) for c in ("F", "SIGF"))
    ok = np.isfinite(f) & np.isfinite(sigf) & (sigf > 0)
    hkl = stacked[["H", "K", "L"]].to_numpy(np.int32)[ok]
    _, first = np.unique(pack_hkl(hkl), return_index=True)
    return hkl[first], f[ok][first], sigf[ok][first]


def truncated_normal_parameters(mean, sd, n_iter=50):
    """(loc, scale) of normals truncated to [0, ∞) with the given means and standard
    deviations, by fixed-point iteration; where no such law exists (a mean less than
    a half-normal's 1.32 standard deviations) the half-normal of that mean.

    Examples
    --------
    >>> loc, scale = truncated_normal_parameters(np.array([10.0, 1.0]), np.array([1.0, 0.7]))
    >>> bool(abs(loc[0] - 10.0) < 1e-6), bool(loc[1] < 1.0)
    (True, True)
    """
    from scipy.special import log_ndtr

    mean, sd = np.asarray(mean, np.float64), np.asarray(sd, np.float64)
    loc, scale = mean.copy(), sd.copy()
    for _ in range(n_iter):
        alpha = -loc / scale
        hazard = np.exp(-0.5 * alpha**2 - 0.5 * np.log(2 * np.pi) - log_ndtr(-alpha))
        current_mean = loc + scale * hazard
        current_sd = scale * np.sqrt(np.maximum(1 + alpha * hazard - hazard**2, 1e-12))
        loc = np.maximum(loc + mean - current_mean, 1e-3 * mean)
        scale = np.maximum(scale * sd / current_sd, 1e-6)
    half_normal = mean < _HALF_NORMAL_MEAN_OVER_SD * sd
    loc[half_normal] = 1e-3 * mean[half_normal]
    scale[half_normal] = mean[half_normal] * np.sqrt(np.pi / 2)
    return loc, scale
