"""The scales' share of SIGF: the uncertainty of each image's own scale weights, carried
into the amplitudes it measured.

A reflection's posterior treats the scales as known. But each image's own weights — its
offset, and for serial stills its image layers (3 × 110 weights per still by default) —
are fitted to the same observations, and they follow part of the noise: on simulated
stills the strongest fifth of the observations scatter about the fit only 0.83 as widely
as their noise (bench/RESULTS.md, session 32), and the amplitudes' z against the truth had
SD 1.43 where the same merge with the true scales gave 1.05. Residuals cannot show what
the scales absorbed, so neither the error model nor the sandwich J/H
(:mod:`skmerge.model.sandwich`) can widen SIGF for it.

The information about an amplitude that is lost to its images' weights is the Schur
complement of the Gauss–Newton information over those weights. With cᵢ = −∂² log p/∂I²
of observation i at the fit, gᵢ = ∂Iᵢ/∂F and Gᵢ = ∂Iᵢ/∂φ (φ its image's weights), image
j's information about its weights is Aⱼ = Σᵢ cᵢ GᵢGᵢᵀ, and reflection h loses

    Sₕ = Σⱼ bₕⱼᵀ Aⱼ⁺ bₕⱼ,   bₕⱼ = Σ_{i ∈ h, j} cᵢ gᵢ Gᵢ,

of its precision: its posterior variance is multiplied by P/(P − S) (P the posterior
precision). Each image is taken on its own, with the other amplitudes and the shared
network held at their fitted values (the images' weights are coupled only through
amplitudes that many images measure, which this leaves out). Directions of Aⱼ that the
data do not determine (dead units, weights that cancel) are left out of its
pseudo-inverse.

The same uncertainty moves the predictions of observations the fit did not see (a test
set's, ``predict``'s): for an observation of image j, Var(log Σ) from its image's weights is
gᵀAⱼ⁺g, g = ∂ log Σ/∂φ at its features. Storing Aⱼ⁺ would cost (weights per image)² numbers
per image, so each image keeps one number, the mean of gᵀAⱼ⁺g over its training
observations, which ``predict`` adds to every one of its observations' Var(log Σ). On
thermolysin's stills (six shared and three image layers) held-out observations scattered
about Ipred with SD(z) 1.24 and a 95 % interval held 88.7 % of them; with the images' scale
variance 0.94 and 95.8 % (bench/RESULTS.md, session 34; on the held-out observations of
reflections the fit saw, the per-image mean gave 0.98 and 95.2 %, each observation's own
gᵀAⱼ⁺g 0.92 and 96.0 %: the mean loses little).
"""

from typing import NamedTuple

import numpy as np
from threadpoolctl import threadpool_limits

from .marginals import row_pieces
from .sandwich import likelihood_derivatives

# Eigenvalues of an image's information below this fraction of its largest are taken as
# directions its data do not determine and left out of the pseudo-inverse: they would
# otherwise widen SIGF without bound through weights that change no scale.
_RELATIVE_CUTOFF = 1e-7
# The largest factor of a reflection's posterior variance. A reflection measured on one
# image almost alone can lose nearly all its information to that image's weights; its
# SIGF then says "unmeasured" well before the factor grows past this.
_MAX_RATIO = 25.0
# Entries of the images' information matrices held at once (float64: 512 MB); images
# beyond it are taken in further passes over the data.
_MAX_ENTRIES = 1 << 26


class ImageWeightUncertainty(NamedTuple):
    """What the uncertainty of the images' own scale weights adds to a fit's variances."""

    ratio: np.ndarray
    """Per reflection, the factor (≥ 1) of its posterior variance."""
    scale_variance: np.ndarray
    """Per image, the mean over its observations of the variance of their log Σ."""


def image_weight_uncertainty(model, data_chunks, n_reflections):
    """The factor of each reflection's posterior variance that carries the uncertainty of
    its images' own scale weights (offsets and image layers), and the variance those
    weights give each image's log scale; None when the scale model has no weights of
    each image's own.

    Parameters
    ----------
    model : MergingModel
        Trained; its scales and noise model are held at their fitted values and the
        amplitudes at their posterior means.
    data_chunks : callable
        Returns an iterator over the training data in pieces (dicts of tensors as the
        model reads them, never splitting a Laue spot); called twice for every group of
        images whose information matrices fit in memory together (one group for most
        data), and once when the images' own weights are their offsets alone.
    n_reflections : int

    Returns
    -------
    ImageWeightUncertainty or None
        ``ratio`` of shape (n_reflections,), ``scale_variance`` of shape (n_images,).

    Examples
    --------
    Every fit with per-image weights computes it (``image_weight_ratio_`` and
    ``image_scale_variance_``; here each image's offset):

    >>> from skmerge import VariationalMerger
    >>> from skmerge.datasets import make_unmerged
    >>> X, _ = make_unmerged(n_images=20, random_state=0)
    >>> merger = VariationalMerger(mlp_layers=2, max_iter=100, random_state=0).fit(X)
    >>> bool((merger.image_weight_ratio_ >= 1).all()), merger.image_weight_ratio_.shape == (len(merger.reflections_),)
    (True, True)
    >>> merger.image_scale_variance_.shape, bool((merger.image_scale_variance_ > 0).all())
    ((20,), True)
    """
    # Many small products and eigendecompositions, one image at a time: BLAS's threads
    # beside TensorFlow's took 70 times as long for each (2.7 s against 0.04 s for one
    # 331 × 331 eigendecomposition on this project's 2-core machine).
    with threadpool_limits(1, user_api="blas"):
        return _image_weight_uncertainty(model, data_chunks, n_reflections)


def _image_weight_uncertainty(model, data_chunks, n_reflections):
    n_weights = model.scale_network.image_weight_count
    if n_weights == 0:
        return None
    f_mean, f_square = (m.numpy().astype(np.float64) for m in model.amplitude_moments()[:2])
    precision = 1 / np.maximum(f_square - f_mean**2, 1e-30)
    n_images = _n_images(model.scale_network)
    lost = np.zeros(n_reflections)
    scale_variance, n_rows = np.zeros(n_images), np.zeros(n_images)
    group = max(1, _MAX_ENTRIES // n_weights**2)
    for start in range(0, n_images, group):
        images = np.arange(start, min(start + group, n_images))
        # Offsets alone: one number per row (and every image in one group), so the rows
        # are kept for the second sum instead of computed again.
        information_pass, cross_pass = _two_passes(lambda: _rows_of(model, data_chunks, f_mean, images),
                                                   keep=n_weights == 1)
        information = np.zeros((len(images), n_weights, n_weights))
        for rows in information_pass:
            for k, of_image in _by_image(rows.image - start):
                weights = rows.intensity_gradient(of_image).astype(np.float64)
                information[k] += (weights * rows.curvature[of_image, None]).T @ weights
        inverse_roots = [_inverse_root(a) for a in information]
        for rows in cross_pass:
            for k, of_image in _by_image(rows.image - start):
                # Each reflection's cross information with the image's weights (the rows of
                # an image come together, so a reflection is rarely split between pieces).
                of_image = of_image[np.argsort(rows.refl[of_image], kind="stable")]
                refl = rows.refl[of_image]
                first = np.flatnonzero(np.r_[True, refl[1:] != refl[:-1]])
                cross = np.add.reduceat(
                    rows.intensity_gradient(of_image) * (rows.curvature * rows.amplitude_gradient)[of_image, None],
                    first)
                lost += np.bincount(refl[first], np.sum((cross @ inverse_roots[k]) ** 2, 1), n_reflections)
                # Var(log Σ) = gᵀA⁺g, g = ∂ log Σ/∂φ.
                scale_variance[start + k] += np.sum((rows.log_scale_gradient[of_image] @ inverse_roots[k]) ** 2)
                n_rows[start + k] += len(of_image)
    remaining = np.maximum(precision - lost, precision / _MAX_RATIO)
    return ImageWeightUncertainty((precision / remaining).astype(np.float32),
                                  (scale_variance / np.maximum(n_rows, 1)).astype(np.float32))


def _two_passes(pieces, keep):
    """Two iterables over the pieces that ``pieces()`` yields: the same list twice when
    ``keep``, else two generators (each computes the pieces as it is read)."""
    if keep:
        kept = list(pieces())
        return kept, kept
    return pieces(), pieces()


def _by_image(image):
    """(image, the positions of its rows) for every image among ``image``."""
    order = np.argsort(image, kind="stable")
    bounds = np.flatnonzero(np.r_[True, image[order][1:] != image[order][:-1], True])
    for start, end in zip(bounds[:-1], bounds[1:]):
        yield image[order[start]], order[start:end]


class _Rows(NamedTuple):
    """One piece's rows of some images: reflection, image, the likelihood's curvature in
    the predicted intensity, ∂I/∂F, ∂ log Σ/∂φ of the image's weights, and Σ·F² (the part
    of I that the scale multiplies)."""

    refl: np.ndarray
    image: np.ndarray
    curvature: np.ndarray
    amplitude_gradient: np.ndarray
    log_scale_gradient: np.ndarray
    scaled_intensity: np.ndarray

    def intensity_gradient(self, rows):
        """∂I/∂φ = Σ·F²·∂ log Σ/∂φ of the given rows."""
        return self.log_scale_gradient[rows] * self.scaled_intensity[rows, None].astype(np.float32)


def _rows_of(model, data_chunks, f_mean, images):
    """The rows of ``images`` (a range of image numbers) of every piece of the data."""
    for chunk in data_chunks():
        image = chunk["image"].numpy()
        mine = (image >= images[0]) & (image <= images[-1])
        if not mine.any():
            continue
        refl, intensity, sigma, scale, offset = next(row_pieces(model, [chunk]))
        gradients = model.scale_network.image_parameter_gradients(chunk)[mine]
        f, scale, offset = f_mean[refl[mine]], scale[mine], offset[mine]
        predicted = scale * f**2 + offset
        # Gauss–Newton: a likelihood's curvature can be negative far in its tail (a
        # Student-t's outliers), where it holds no information.
        _, curvature = likelihood_derivatives(model, predicted, intensity[mine], sigma[mine], lambda i: i)
        yield _Rows(refl[mine], image[mine], np.maximum(curvature, 0.0), 2 * scale * f, gradients, scale * f**2)


def _inverse_root(information):
    """W with W·Wᵀ the pseudo-inverse of a symmetric positive semi-definite matrix, over
    its well-determined directions."""
    values, vectors = np.linalg.eigh(information)
    kept = values > max(values.max(), 0.0) * _RELATIVE_CUTOFF
    return vectors[:, kept] / np.sqrt(values[kept])


def _n_images(network):
    """The number of images with weights of their own."""
    layers = int(network.image_kernels[0].shape[0]) if network.image_kernels else 0
    return max(layers, int(network.image_offsets.shape[0]))
