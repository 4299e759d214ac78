"""Symmetry arithmetic on arrays of Miller indices.

Large tables repeat the same few Miller indices many times, so every function here works
on the unique indices and broadcasts back: reciprocalspaceship's ASU mapping builds an
(N × n_ops × 3) array and would need gigabytes for a million rows.
"""

import numpy as np
import reciprocalspaceship as rs


# Miller indices are packed into one int64 key (3 × 16 bits, plus a group number such as
# a file id in the bits above) so that unique, sort and lookup are 1-D numpy operations,
# several times faster than their axis=0 versions.
_PACK_OFFSET = 1 << 15
_PACK_WIDTH = 1 << 16
_GROUP_SHIFT = 48


def pack_hkl(hkl, group=None):
    """One sortable int64 key per row of an (N, 3) array of Miller indices, optionally
    prefixed by a non-negative group number per row (keys sort by group first)."""
    hkl = np.asarray(hkl, dtype=np.int64).reshape(-1, 3)
    if len(hkl) and np.abs(hkl).max() >= _PACK_OFFSET:
        raise ValueError("Miller index out of range")
    keys = ((hkl[:, 0] + _PACK_OFFSET) * _PACK_WIDTH + hkl[:, 1] + _PACK_OFFSET) * _PACK_WIDTH + hkl[:, 2] + _PACK_OFFSET
    if group is not None:
        keys = keys + (np.asarray(group, dtype=np.int64) << _GROUP_SHIFT)
    return keys


def unpack_hkl(keys):
    """Miller indices of keys made by :func:`pack_hkl`."""
    keys = np.asarray(keys, dtype=np.int64) & ((1 << _GROUP_SHIFT) - 1)
    l = keys % _PACK_WIDTH - _PACK_OFFSET
    k = (keys // _PACK_WIDTH) % _PACK_WIDTH - _PACK_OFFSET
    h = keys // (_PACK_WIDTH * _PACK_WIDTH) - _PACK_OFFSET
    return np.stack([h, k, l], axis=1).astype(np.int32)


def unpack_group(keys):
    """Group numbers of keys made by :func:`pack_hkl`."""
    return (np.asarray(keys, dtype=np.int64) >> _GROUP_SHIFT).astype(np.int32)


def unique_hkl(hkl, group=None):
    """Dense ids of the distinct rows of an (N, 3) integer array (within each group).

    Returns ``(unique, inverse)`` with ``unique[inverse] == hkl``; rows are sorted by
    group, then H, K and L. With ``group``, ``unique`` holds the packed keys instead of
    Miller indices (see :func:`unpack_hkl` and :func:`unpack_group`).
    """
    unique_keys, inverse = np.unique(pack_hkl(hkl, group), return_inverse=True)
    return (unpack_hkl(unique_keys) if group is None else unique_keys), inverse.ravel()


def lookup_keys(table_keys, keys):
    """Row of each key in the sorted ``table_keys``, or −1 where it is absent."""
    table_keys = np.asarray(table_keys, dtype=np.int64)
    keys = np.asarray(keys, dtype=np.int64)
    if len(table_keys) == 0:
        return np.full(len(keys), -1, dtype=np.int64)
    row = np.minimum(np.searchsorted(table_keys, keys), len(table_keys) - 1)
    return np.where(table_keys[row] == keys, row, -1)


def lookup_hkl(table, hkl):
    """Row of each of ``hkl`` in ``table`` (rows sorted as :func:`unique_hkl` returns
    them), or −1 where it is absent."""
    return lookup_keys(pack_hkl(table), pack_hkl(hkl))


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


# Cells may differ by this much before they count as non-isomorphous (relative for
# lengths, degrees for angles).
CELL_LENGTH_TOLERANCE = 0.02
CELL_ANGLE_TOLERANCE = 2.0


def isomorphous(cell, other):
    """Whether two unit cells agree within CELL_LENGTH_TOLERANCE and CELL_ANGLE_TOLERANCE."""
    a, b = np.array(cell.parameters), np.array(other.parameters)
    return bool((np.abs(b[:3] / a[:3] - 1) <= CELL_LENGTH_TOLERANCE).all()
                and (np.abs(b[3:] - a[3:]) <= CELL_ANGLE_TOLERANCE).all())


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
