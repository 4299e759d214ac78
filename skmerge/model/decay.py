"""The frame of a rotation series' merged amplitudes: its least-decayed images.

A merge identifies the images' fall-off with resolution only relative to one another: a
B factor common to every image's scale moves into the amplitudes and back without
changing one prediction. The fit leaves the amplitudes with the fall-off the Wilson curve
of its quick merge gives them, the images' mean decay, which is no crystal's own. Like
a conventional scaler, which reports B relative to a reference batch, skmerge reports a
rotation series' amplitudes as its least-decayed images record them: on the simulated
anomalous series (B rising from 0 to 8 Å² over 180 images) CC(F, truth) goes from 0.9922
to 0.9969, where a merge handed the true scales reaches 0.9974 (bench/RESULTS.md).

Each image's B is minus the slope of the least-squares line of its fitted log scale on
1/(2d²), over its own observations; the reference is a low quantile of them
(``REFERENCE_QUANTILE``), which on a smooth decay is the first images' B and is not
moved by one image whose scale the network extrapolates. Stills stay in the merge's
frame: each is a crystal of its own, and its B, bent by its own weights, is too noisy
for an extreme; so do Laue data, whose scale also follows the wavelength.

Examples
--------
>>> import numpy as np
>>> from skmerge.model.decay import image_b_factors
>>> d = np.tile(np.linspace(1.5, 20.0, 50), 2)
>>> image = np.repeat([0, 1], 50)
>>> log_scale = -np.where(image == 0, 1.0, 4.0) / (2 * d**2)
>>> image_b_factors(log_scale, d, image).round(6).tolist()
[1.0, 4.0]
"""

import numpy as np

# The quantile of the images' B taken as the reference: 2 % lets the few most extreme
# images (an edge of the series the network extrapolates to) pass.
REFERENCE_QUANTILE = 0.02

# An image needs this many observations for its B (a line through a handful of
# resolutions says little).
_MIN_OBSERVATIONS = 10


def image_b_factors(log_scale, d, image):
    """Per image (in the order of ``np.unique(image)``), the B in Å² by which its scale
    falls off: minus the slope of the least-squares line of ``log_scale`` on 1/(2d²)
    over its observations; NaN for an image with fewer than ``_MIN_OBSERVATIONS`` or
    a single resolution."""
    _, image = np.unique(image, return_inverse=True)
    image = image.ravel()
    return _b_factors(_line_sums(log_scale, d, image, int(image.max()) + 1 if len(image) else 0))


def _line_sums(log_scale, d, image, n_images):
    """Per image (``image`` numbers them from 0), n, Σx, Σy, Σx², Σxy of its
    observations' x = 1/(2d²) and y = ``log_scale``: what its line needs, added up over
    pieces of a store."""
    # bincounts, not a loop over images: a series may hold thousands of images.
    x, y = 1.0 / (2.0 * np.asarray(d, np.float64) ** 2), np.asarray(log_scale, np.float64)
    return np.stack([np.bincount(image, weights=w, minlength=n_images) for w in (np.ones_like(x), x, y, x * x, x * y)])


def _b_factors(sums):
    """Minus the slope of each image's least-squares line from its :func:`_line_sums`."""
    n, sx, sy, sxx, sxy = sums
    spread = n * sxx - sx * sx
    fitted = (n >= _MIN_OBSERVATIONS) & (spread > 1e-9 * n * sxx)
    return np.where(fitted, -(n * sxy - sx * sy) / np.where(fitted, spread, 1.0), np.nan)


def reference_b(b_factors):
    """The B (Å²) of the least-decayed images among per-image ``b_factors``: their
    ``REFERENCE_QUANTILE`` quantile (NaN ignored); 0 when no image has one."""
    b_factors = np.asarray(b_factors, np.float64)
    finite = b_factors[np.isfinite(b_factors)]
    return float(np.quantile(finite, REFERENCE_QUANTILE)) if len(finite) else 0.0


def fall_off(b, d):
    """The factor exp(−B/(2d²)) that takes intensities at resolutions ``d`` (Å) into the
    frame of images whose scales fall off with ``b`` (Å²) against the model's."""
    return np.exp(-b / (2.0 * np.asarray(d, np.float64) ** 2))


def rotation_reference_b(params, model, state, tables):
    """The ``reference_b`` of a fit (:class:`~skmerge.model.fitted.FitState`) of the
    observations of ``tables()`` (an iterator of tables: the table of an in-memory fit,
    the pieces of a store): the least-decayed images' B of a rotation series from the
    fitted scales of its observations, 0 for Laue data and stills
    (:func:`skmerge.geometry.recorded_as_stills`, of the first table)."""
    from ..geometry import recorded_as_stills

    if params.laue:
        return 0.0
    sums = np.zeros((5, len(state.image_ids)))
    for i, X in enumerate(tables()):
        if i == 0 and recorded_as_stills(X):
            return 0.0
        # The predictions' scales are in the state's frame, B = state.reference_b from the model's.
        scale = state.predict(params, model, X)[2]
        image = np.searchsorted(state.image_ids, X["image_id"].to_numpy(np.int64))
        sums += _line_sums(np.log(scale), state.observation_resolution(X), image, len(state.image_ids))
    return state.reference_b + reference_b(_b_factors(sums))
