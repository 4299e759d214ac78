"""Per-reflection arrays → merged ``rs.DataSet`` tables with MTZ column types.

Anything that produces merged data (the inverse-variance baseline, the variational
merger, half-dataset merges) hands its per-reflection numbers to :func:`merged_table`,
so the layout of merged output (index, column types, Friedel columns) lives in one place.
"""

import numpy as np
import reciprocalspaceship as rs

from .symmetry import pack_hkl, reflection_flags, unique_hkl, unpack_group, unpack_hkl

# MTZ column types of every merged column skmerge writes.
MTZ_TYPES = {
    "F": "SFAmplitude",
    "SIGF": "Stddev",
    "I": "Intensity",
    "SIGI": "Stddev",
    "N": "MTZInt",
    "F(+)": "FriedelSFAmplitude",
    "SIGF(+)": "StddevFriedelSF",
    "F(-)": "FriedelSFAmplitude",
    "SIGF(-)": "StddevFriedelSF",
    "I(+)": "FriedelIntensity",
    "SIGI(+)": "StddevFriedelI",
    "I(-)": "FriedelIntensity",
    "SIGI(-)": "StddevFriedelI",
    "N(+)": "MTZInt",
    "N(-)": "MTZInt",
    "DANO": "AnomalousDifference",
    "SIGDANO": "Stddev",
    "file_id": "MTZInt",
}


def merged_table(hkl, columns, spacegroup, cell):
    """A merged ``rs.DataSet`` indexed by H, K, L, sorted, with MTZ column types.

    Parameters
    ----------
    hkl : ndarray of shape (n, 3)
        ASU Miller indices, one per row of ``columns``.
    columns : dict of str → ndarray
        Column name → values; names in :data:`MTZ_TYPES` get their MTZ type, others are
        inferred. A ``file_id`` column (data sets merged separately) sorts first.
    """
    data = {"H": hkl[:, 0], "K": hkl[:, 1], "L": hkl[:, 2], **columns}
    table = rs.DataSet(data, spacegroup=spacegroup, cell=cell, merged=True)
    table = table.astype({"H": "HKL", "K": "HKL", "L": "HKL"})
    table = table.astype({c: MTZ_TYPES[c] for c in columns if c in MTZ_TYPES})
    table = table.infer_mtz_dtypes()
    order = ["file_id", "H", "K", "L"] if "file_id" in columns else ["H", "K", "L"]
    table = table.sort_values(order, kind="stable").reset_index(drop=True)
    return table.set_index(["H", "K", "L"])


def friedel_halves(hkl, columns, spacegroup, fill_value=np.nan, group=None):
    """Spread per-half values onto Friedel columns of the plus-ASU reflections.

    ``hkl`` are anomalous ASU indices as :func:`skmerge.symmetry.map_to_asu` gives them
    with ``anomalous=True`` (Friedel-minus acentrics negated). Returns the plus-ASU
    indices of the distinct reflections and, for each input column ``X``, ``X(+)`` and
    ``X(-)``. Centric reflections have one value, shown in both halves (the layout
    reciprocalspaceship's ``unstack_anomalous`` gives). A half never observed holds
    ``fill_value``. With ``group`` (e.g. file ids), reflections of different groups stay
    apart and the group of each output row is returned as a third value.
    """
    hkl = np.asarray(hkl)
    centric, _ = reflection_flags(hkl, spacegroup)
    # A negated ASU index lies outside the ASU; map back by negating again.
    minus = ~centric & _is_negated(hkl, spacegroup)
    plus_hkl = np.where(minus[:, None], -hkl, hkl)
    keys, row = np.unique(pack_hkl(plus_hkl, group), return_inverse=True)
    unique = unpack_hkl(keys)
    out = {}
    for name, values in columns.items():
        for half, mask in (("(+)", ~minus), ("(-)", minus)):
            spread = np.full(len(unique), fill_value, dtype=np.result_type(values, type(fill_value)))
            spread[row[mask]] = values[mask]
            out[name + half] = spread
        centric_rows = row[centric]
        out[name + "(-)"][centric_rows] = values[centric]
    if group is not None:
        return unique, out, unpack_group(keys)
    return unique, out


def _is_negated(hkl, spacegroup):
    """True for indices outside the reciprocal ASU (the negated Friedel-minus ones)."""
    unique, inverse = unique_hkl(hkl)
    inside = rs.utils.in_asu(unique, spacegroup)
    return ~np.asarray(inside)[inverse]
