"""Symmetry arithmetic on arrays of Miller indices.

Large tables repeat the same few Miller indices many times, so every function here works
on the unique indices and broadcasts back: reciprocalspaceship's ASU mapping builds an
(N × n_ops × 3) array and would need gigabytes for a million rows.
"""

import numpy as np
import reciprocalspaceship as rs


def unique_hkl(hkl):
    """Dense ids of the distinct rows of an (N, 3) integer array.

    Returns ``(unique, inverse)`` with ``unique[inverse] == hkl``; rows are ordered as
    ``np.unique`` orders the packed keys (by H, then K, then L). Packing three indices into
    one int64 makes this a 1-D unique, several times faster than ``np.unique(axis=0)``.
    """
    hkl = np.asarray(hkl, dtype=np.int64).reshape(-1, 3)
    if len(hkl) == 0:
        return np.zeros((0, 3), dtype=np.int32), np.zeros(0, dtype=np.int64)
    offset = np.abs(hkl).max() + 1
    width = 2 * offset + 1
    keys = ((hkl[:, 0] + offset) * width + (hkl[:, 1] + offset)) * width + hkl[:, 2] + offset
    unique_keys, inverse = np.unique(keys, return_inverse=True)
    l = unique_keys % width - offset
    k = (unique_keys // width) % width - offset
    h = unique_keys // (width * width) - offset
    return np.stack([h, k, l], axis=1).astype(np.int32), inverse.ravel()


def map_to_asu(hkl, spacegroup, anomalous=False):
    """Map observed Miller indices to the reciprocal asymmetric unit.

    Follows reciprocalspaceship's convention: with ``anomalous=True`` acentric Friedel-minus
    observations get the negated ASU index (so ``h`` and ``-h`` are different reflections),
    while centric reflections always stay in the ASU.

    Parameters
    ----------
    hkl : array-like of shape (n, 3)
        Observed Miller indices.
    spacegroup : gemmi.SpaceGroup
    anomalous : bool
        Keep Friedel mates apart.

    Returns
    -------
    asu_hkl : ndarray of shape (n, 3), int32
    friedel_minus : ndarray of shape (n,), bool
        True for acentric observations of the Friedel-minus half (whether or not they are
        kept apart).
    """
    unique, inverse = unique_hkl(hkl)
    asu, isym = rs.utils.hkl_to_asu(unique, spacegroup)
    asu = np.asarray(asu, dtype=np.int32)
    centric = spacegroup.operations().centric_flag_array(asu)
    minus = (np.asarray(isym) % 2 == 0) & ~centric
    if anomalous:
        asu = np.where(minus[:, None], -asu, asu)
    return asu[inverse], minus[inverse]


def reflection_flags(hkl, spacegroup):
    """Centric flag and Wilson multiplicity ε of each Miller index.

    ε counts the symmetry operations, centring included, that leave ``h`` unchanged: the
    convention of reciprocalspaceship's ``compute_multiplicity``. The Wilson prior only
    uses ε relative to the mean intensity, so the constant centring factor cancels.
    """
    unique, inverse = unique_hkl(hkl)
    ops = spacegroup.operations()
    centric = ops.centric_flag_array(unique)
    epsilon = ops.epsilon_factor_array(unique)
    return centric[inverse], np.asarray(epsilon, dtype=np.int32)[inverse]


def resolution(hkl, cell):
    """dHKL in Å of each Miller index for a gemmi.UnitCell."""
    unique, inverse = unique_hkl(hkl)
    return cell.calculate_d_array(unique).astype(np.float32)[inverse]


def systematically_absent(hkl, spacegroup):
    """True where the space group forbids the reflection."""
    unique, inverse = unique_hkl(hkl)
    return spacegroup.operations().systematic_absences(unique)[inverse]
