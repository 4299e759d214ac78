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


def anomalous_table(hkl, columns, spacegroup, cell, group=None):
    """A merged table with Friedel columns from per-half values of anomalous ASU
    reflections (``hkl`` as :func:`friedel_halves` takes them): F, SIGF, I, SIGI and N
    combine both halves (a centric reflection has one), and DANO, SIGDANO are F(+) − F(−)
    of acentric reflections. ``columns`` holds F, SIGF, I, SIGI and N; with ``group``
    (file ids) reflections of different groups stay apart and a ``file_id`` column is
    added."""
    if group is None:
        plus_hkl, halves = friedel_halves(hkl, columns, spacegroup)
    else:
        plus_hkl, halves, plus_group = friedel_halves(hkl, columns, spacegroup, group=group)
    n_halves = (~np.isnan(halves["F(+)"])).astype(int) + (~np.isnan(halves["F(-)"])).astype(int)
    centric, _ = reflection_flags(plus_hkl, spacegroup)
    n_halves = np.where(centric, 1, n_halves)
    combined = {}
    for name in ("F", "I"):
        plus, minus = halves[f"{name}(+)"], halves[f"{name}(-)"]
        sig_plus, sig_minus = halves[f"SIG{name}(+)"], halves[f"SIG{name}(-)"]
        total = np.where(centric, plus, np.nansum([plus, minus], axis=0))
        var = np.where(centric, sig_plus**2, np.nansum([sig_plus**2, sig_minus**2], axis=0))
        combined[name] = total / n_halves
        combined[f"SIG{name}"] = np.sqrt(var) / n_halves
    n_plus = np.nan_to_num(halves["N(+)"]).astype(np.int32)
    n_minus = np.nan_to_num(halves["N(-)"]).astype(np.int32)
    combined["N"] = np.where(centric, n_plus, n_plus + n_minus)
    dano = halves["F(+)"] - halves["F(-)"]
    sigdano = np.sqrt(halves["SIGF(+)"] ** 2 + halves["SIGF(-)"] ** 2)
    out = {
        "F": combined["F"], "SIGF": combined["SIGF"], "I": combined["I"], "SIGI": combined["SIGI"], "N": combined["N"],
        "F(+)": halves["F(+)"], "SIGF(+)": halves["SIGF(+)"], "F(-)": halves["F(-)"], "SIGF(-)": halves["SIGF(-)"],
        "I(+)": halves["I(+)"], "SIGI(+)": halves["SIGI(+)"], "I(-)": halves["I(-)"], "SIGI(-)": halves["SIGI(-)"],
        "N(+)": n_plus, "N(-)": n_minus,
        "DANO": np.where(centric, np.nan, dano), "SIGDANO": np.where(centric, np.nan, sigdano),
    }
    if group is not None:
        out["file_id"] = plus_group
    return merged_table(plus_hkl, out, spacegroup, cell)


def _is_negated(hkl, spacegroup):
    """True for indices outside the reciprocal ASU (the negated Friedel-minus ones)."""
    unique, inverse = unique_hkl(hkl)
    inside = rs.utils.in_asu(unique, spacegroup)
    return ~np.asarray(inside)[inverse]
