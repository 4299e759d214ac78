"""Starting values near the answer: a quick per-image scaling, an inverse-variance merge
and French–Wilson amplitudes, so that the variational fit needs far fewer steps than one
started from the prior.
"""

import warnings

import numpy as np
from reciprocalspaceship.algorithms.scale_merged_intensities import _french_wilson_posterior_quad

from ..baseline import inverse_variance_mean
from ..shells import make_shells

_SCALING_ROUNDS = 5
# Reflections per French–Wilson quadrature call: 100 grid points each, ~10 arrays of
# float64, so ~16 MB at a time (10,000 made the initialisation of a half-dataset merge
# the peak of a whole hypf run).
_FRENCH_WILSON_CHUNK = 2_000


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
    for _ in range(_SCALING_ROUNDS):
        merged, _ = inverse_variance_mean(refl, intensity / k[image], sigma / k[image], n_reflections)
        pred = merged[refl]
        num = np.bincount(image, weights=w * intensity * pred, minlength=n_images)
        den = np.bincount(image, weights=w * pred * pred, minlength=n_images)
        k = np.where(den > 0, num / np.where(den > 0, den, 1.0), 1.0)
        k = np.clip(k, 1e-3 * np.median(k[k > 0]) if (k > 0).any() else 1e-3, None)
        k /= np.exp(np.mean(np.log(k)))
    merged, merged_sigma = inverse_variance_mean(refl, intensity / k[image], sigma / k[image], n_reflections)
    return k, merged, merged_sigma


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
