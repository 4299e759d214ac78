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
    spacegroup : gemmi.SpaceGroup
    cell : gemmi.UnitCell

    Examples
    --------
    >>> import gemmi
    >>> import numpy as np
    >>> from skmerge.merged import merged_table
    >>> table = merged_table(np.array([[2, 0, 0], [1, 0, 0]]), {"I": np.array([4.0, 9.0]), "N": np.array([3, 1])},
    ...                      gemmi.SpaceGroup("P 1"), gemmi.UnitCell(10, 10, 10, 90, 90, 90))
    >>> table.reset_index().values.tolist(), [str(t) for t in table.dtypes]
    ([[1, 0, 0, 9.0, 1], [2, 0, 0, 4.0, 3]], ['Intensity', 'MTZInt'])
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

    Examples
    --------
    >>> import gemmi
    >>> import numpy as np
    >>> from skmerge.merged import friedel_halves
    >>> hkl = np.array([[1, 2, 3], [-1, -2, -3], [4, 0, 0]])
    >>> unique, columns = friedel_halves(hkl, {"I": np.array([5.0, 7.0, 2.0])}, gemmi.SpaceGroup("P 1"))
    >>> unique.tolist(), columns["I(+)"].tolist(), columns["I(-)"].tolist()
    ([[1, 2, 3], [4, 0, 0]], [5.0, 2.0], [7.0, nan])
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


def anomalous_table(hkl, columns, spacegroup, cell, group=None, mate_correlation=None):
    """A merged table with Friedel columns from per-half values of anomalous ASU
    reflections.

    Parameters
    ----------
    hkl : ndarray of shape (n, 3)
        Anomalous ASU indices, as :func:`friedel_halves` takes them.
    columns : dict of str → ndarray
        F, SIGF, I, SIGI and N of every row of ``hkl``.
    spacegroup : gemmi.SpaceGroup
    cell : gemmi.UnitCell
    group : ndarray of shape (n,), optional
        File ids: reflections of different groups stay apart and a ``file_id`` column is
        added.
    mate_correlation : ndarray of shape (n,), optional
        Posterior correlation of every row's amplitude with its Friedel mate's (0 where
        they are independent): enters SIGF, SIGI and SIGDANO (:func:`combine_friedel`).

    Returns
    -------
    rs.DataSet
        Indexed by the plus-ASU H, K, L: F, SIGF, I, SIGI, N combining both Friedel
        halves (:func:`combine_friedel`), the Friedel columns F(±), SIGF(±), I(±),
        SIGI(±), N(±), and DANO, SIGDANO.

    Examples
    --------
    >>> import gemmi
    >>> import numpy as np
    >>> from skmerge.merged import anomalous_table
    >>> sg, cell = gemmi.SpaceGroup("P 1"), gemmi.UnitCell(10, 10, 10, 90, 90, 90)
    >>> hkl = np.array([[1, 2, 3], [-1, -2, -3], [2, 0, 0]])
    >>> one = np.ones(3)
    >>> table = anomalous_table(hkl, {"F": np.array([4.0, 2.0, 3.0]), "SIGF": one, "I": np.array([17.0, 5.0, 10.0]),
    ...                               "SIGI": one, "N": np.array([2, 1, 3])}, sg, cell)
    >>> table[["F", "I", "N", "DANO"]].reset_index().values.tolist()
    [[1, 2, 3, 3.0, 11.0, 3, 2.0], [2, 0, 0, 3.0, 10.0, 3, nan]]
    """
    if mate_correlation is not None:
        columns = {**columns, "correlation": np.asarray(mate_correlation, np.float64)}
    if group is None:
        plus_hkl, halves = friedel_halves(hkl, columns, spacegroup)
    else:
        plus_hkl, halves, plus_group = friedel_halves(hkl, columns, spacegroup, group=group)
    centric, _ = reflection_flags(plus_hkl, spacegroup)
    halves["N(+)"] = np.nan_to_num(halves["N(+)"]).astype(np.int32)
    halves["N(-)"] = np.nan_to_num(halves["N(-)"]).astype(np.int32)
    correlation = halves.pop("correlation(+)", None)
    halves.pop("correlation(-)", None)
    combined = combine_friedel(halves, centric, correlation)
    out = {name: combined[name] for name in ("F", "SIGF", "I", "SIGI", "N")}
    for quantity in ("F", "I"):
        for sign in ("(+)", "(-)"):
            out[quantity + sign] = halves[quantity + sign]
            out[f"SIG{quantity}{sign}"] = halves[f"SIG{quantity}{sign}"]
    out["N(+)"], out["N(-)"] = halves["N(+)"], halves["N(-)"]
    out["DANO"], out["SIGDANO"] = combined["DANO"], combined["SIGDANO"]
    if group is not None:
        out["file_id"] = plus_group
    return merged_table(plus_hkl, out, spacegroup, cell)


def combine_friedel(halves, centric, correlation=None):
    """Friedel-mean columns and anomalous differences from Friedel-half columns.

    For X in F and I: X is the mean of the measured halves (finite X(±)) and SIGX the
    standard deviation of that mean, √(SIGX(+)² + SIGX(−)² + 2ρ·SIGX(+)·SIGX(−)) / n_halves.
    N = N(+) + N(−). DANO = F(+) − F(−) and SIGDANO = √(SIGF(+)² + SIGF(−)² −
    2ρ·SIGF(+)·SIGF(−)) where both halves are measured. ρ is the halves' posterior
    correlation (``correlation``; 0 when not given: independent halves). A centric
    reflection has one value, which its Friedel columns may both hold or only one of them:
    it is counted once, and has no DANO.

    Parameters
    ----------
    halves : dict of str → ndarray
        Any of F(±), SIGF(±), I(±), SIGI(±), N(±), each pair complete; an unmeasured
        half holds NaN (N: 0 or NaN).
    centric : ndarray of bool
        Centric flag of every reflection.
    correlation : ndarray, optional
        Posterior correlation of each reflection's two halves (NaN or 0: independent).

    Returns
    -------
    dict of str → ndarray
        The columns the input allows: F, SIGF, I, SIGI (each needs its X(±)), N, DANO and
        SIGDANO (needs F(±), SIGF(±)).

    Examples
    --------
    >>> import numpy as np
    >>> from skmerge.merged import combine_friedel
    >>> out = combine_friedel({"I(+)": np.array([10.0, 4.0, 7.0]), "I(-)": np.array([6.0, np.nan, 7.0]),
    ...                        "SIGI(+)": np.array([3.0, 1.0, 2.0]), "SIGI(-)": np.array([4.0, np.nan, 2.0])},
    ...                       centric=np.array([False, False, True]))
    >>> out["I"].tolist(), out["SIGI"].tolist()
    ([8.0, 4.0, 7.0], [2.5, 1.0, 2.0])
    """
    centric = np.asarray(centric, dtype=bool)
    rho = np.zeros(len(centric)) if correlation is None else np.nan_to_num(np.asarray(correlation, np.float64))
    out = {}
    for name in ("F", "I"):
        if name + "(+)" not in halves:
            continue
        plus, minus = _one_centric_value(halves[name + "(+)"], halves[name + "(-)"], centric)
        n_halves = np.isfinite(plus).astype(int) + np.isfinite(minus)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[name] = np.nansum([plus, minus], axis=0) / n_halves
            sigma = "SIG" + name
            if sigma + "(+)" in halves:
                sig_plus, sig_minus = _one_centric_value(halves[sigma + "(+)"], halves[sigma + "(-)"], centric)
                shared = np.nan_to_num(2 * rho * sig_plus * sig_minus)
                out[sigma] = np.sqrt(np.nansum([sig_plus**2, sig_minus**2], axis=0) + shared) / n_halves
    if "N(+)" in halves:
        n_plus = np.nan_to_num(np.asarray(halves["N(+)"], dtype=np.float64))
        n_minus = np.nan_to_num(np.asarray(halves["N(-)"], dtype=np.float64))
        out["N"] = np.where(centric, np.maximum(n_plus, n_minus), n_plus + n_minus).astype(np.int32)
    if "F(+)" in halves:
        dano = np.asarray(halves["F(+)"], dtype=np.float64) - np.asarray(halves["F(-)"], dtype=np.float64)
        out["DANO"] = np.where(centric, np.nan, dano)
        if "SIGF(+)" in halves:
            sig_plus = np.asarray(halves["SIGF(+)"], dtype=np.float64)
            sig_minus = np.asarray(halves["SIGF(-)"], dtype=np.float64)
            sigdano = np.sqrt(np.maximum(sig_plus**2 + sig_minus**2 - 2 * rho * sig_plus * sig_minus, 0.0))
            out["SIGDANO"] = np.where(np.isnan(out["DANO"]), np.nan, sigdano)
    return out


def _one_centric_value(plus, minus, centric):
    """(+) and (−) values with a centric reflection's one value in (+) only."""
    plus = np.asarray(plus, dtype=np.float64)
    minus = np.asarray(minus, dtype=np.float64)
    return np.where(centric & ~np.isfinite(plus), minus, plus), np.where(centric, np.nan, minus)


def _is_negated(hkl, spacegroup):
    """True for indices outside the reciprocal ASU (the negated Friedel-minus ones)."""
    unique, inverse = unique_hkl(hkl)
    inside = rs.utils.in_asu(unique, spacegroup)
    return ~np.asarray(inside)[inverse]
