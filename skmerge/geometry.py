"""What the observed Miller indices say about how the images were recorded.

Every spot of a monochromatic image lies on the Ewald sphere, which passes through the
origin of reciprocal space: with s the spot's reciprocal-lattice vector and k the beam's
wave vector, both in the crystal's frame, s + k is as long as k, i.e. 2 s·k = −s·s. The
spots of one image therefore give its beam direction in the crystal's frame by linear
least squares. In a rotation series the crystal turns by the oscillation from one image to the
next, and so does the beam in its frame; serial stills are crystals in orientations of
their own, whose beams point anywhere (a median angle of 90° between two random
directions).
"""

import numpy as np

# An image's beam is read from at least this many spots (fewer may all lie on a plane
# through the origin, which leaves the fit undetermined).
MIN_SPOTS = 10
# Consecutive images whose beams differ by more than this (in the median) are stills:
# rotation series turn by a degree or two per image, random orientations by 90°.
STILLS_ANGLE = 20.0


def beam_directions(hkl, cell, image, n_images):
    """The unit beam direction of each image in the crystal's frame.

    Parameters
    ----------
    hkl : ndarray of shape (n_observations, 3)
        Observed (not ASU) Miller indices.
    cell : gemmi.UnitCell
    image : ndarray of shape (n_observations,)
        Each observation's image, 0 … n_images − 1.
    n_images : int

    Returns
    -------
    ndarray of shape (n_images, 3)
        NaN for images with fewer than ``MIN_SPOTS`` spots.

    Examples
    --------
    >>> import numpy as np
    >>> from skmerge.geometry import beam_directions
    >>> from skmerge.datasets import make_unmerged
    >>> X, _ = make_unmerged(n_images=2, random_state=0)
    >>> beams = beam_directions(X[["Hobs", "Kobs", "Lobs"]].to_numpy(), X.cell, X["image_id"].to_numpy(), 2)
    >>> round(float(np.degrees(np.arccos(beams[0] @ beams[1]))), 1)  # the simulated 1° images
    1.0
    """
    s = np.asarray(hkl, np.float64) @ np.array(cell.frac.mat)
    # The normal equations of every image at once (bincount sums: one pass over the
    # observations, where a least-squares call per image would loop over them).
    outer = (s[:, :, None] * s[:, None, :]).reshape(len(s), 9)
    a = np.stack([np.bincount(image, weights=outer[:, j], minlength=n_images) for j in range(9)], 1)
    b = np.stack([np.bincount(image, weights=-0.5 * np.sum(s * s, 1) * s[:, j], minlength=n_images)
                  for j in range(3)], 1)
    k = np.einsum("nij,nj->ni", np.linalg.pinv(a.reshape(n_images, 3, 3)), b)
    norm = np.linalg.norm(k, axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        beams = k / norm
    beams[(np.bincount(image, minlength=n_images) < MIN_SPOTS) | (norm[:, 0] == 0)] = np.nan
    return beams


def consecutive_beam_angles(X):
    """Angles in degrees between the beams of consecutive images of the same file of an
    observation table (images with too few spots left out).

    Examples
    --------
    >>> from skmerge.geometry import consecutive_beam_angles
    >>> from skmerge.datasets import make_unmerged
    >>> X, _ = make_unmerged(n_images=4, oscillation=0.5, random_state=0)
    >>> consecutive_beam_angles(X).round(1).tolist()
    [0.5, 0.5, 0.5]
    """
    image_ids, image = np.unique(X["image_id"].to_numpy(np.int64), return_inverse=True)
    beams = beam_directions(X[["Hobs", "Kobs", "Lobs"]].to_numpy(), X.cell, image.ravel(), len(image_ids))
    file_of = np.zeros(len(image_ids), np.int64)
    if "file_id" in X.columns:
        file_of[image] = X["file_id"].to_numpy(np.int64)
    same_file = file_of[1:] == file_of[:-1]
    cosine = np.clip(np.sum(beams[1:] * beams[:-1], axis=1), -1.0, 1.0)
    angles = np.degrees(np.arccos(cosine))[same_file]
    return angles[np.isfinite(angles)]


def recorded_as_stills(X):
    """Whether the images of a monochromatic observation table are stills: the beams
    of consecutive images differ by more than ``STILLS_ANGLE`` degrees in the median.
    Tables with fewer than two pairs of consecutive images to compare, or without the
    observed Miller indices (Hobs, Kobs, Lobs), count as rotation data.

    Examples
    --------
    >>> from skmerge.geometry import recorded_as_stills
    >>> from skmerge.datasets import make_unmerged
    >>> recorded_as_stills(make_unmerged(n_images=8, random_state=0)[0])
    False
    >>> recorded_as_stills(make_unmerged(n_images=8, stills=True, random_state=0)[0])
    True
    """
    if not {"Hobs", "Kobs", "Lobs"} <= set(X.columns):
        return False
    angles = consecutive_beam_angles(X)
    return len(angles) >= 2 and float(np.median(angles)) > STILLS_ANGLE
