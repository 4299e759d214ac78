"""Merging statistics: CC1/2, CCanom, CCpred and the per-shell table.

Everything here works on plain tables (``rs.DataSet``), so the statistics of a fit in
memory and of MTZ files written earlier (by skmerge, or careless's ``SigF`` layout) are
computed by the same code, without TensorFlow. The half-dataset merges they read are
made by :func:`skmerge.half_datasets.half_dataset_merges`. Shells, correlations and the
pairing of the halves come from :mod:`skmerge.shells`, the Friedel-mean columns of
careless-layout tables from :func:`skmerge.merged.combine_friedel`.
"""

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import reciprocalspaceship as rs

from .errors import InputError
from .io.writers import evaluation_rows
from .merged import combine_friedel
from .shells import (
    BINNINGS,
    check_method,
    correlation,
    half_correlations,
    make_shells,
    measured_reflections,
    weighted_pearson,
)
from .symmetry import pack_hkl, reflection_flags

__all__ = [
    "MergingStatistics",
    "cc_anom",
    "cc_half",
    "merging_statistics",
    "resolution_shells",
    "standardise_columns",
    "weighted_pearson",
]


def resolution_shells(dhkl, n_bins=10):
    """Equal-count resolution shells of reflections: the shell of each and the limits
    of every shell.

    Parameters
    ----------
    dhkl : array-like of shape (n_reflections,)
        Resolutions (Å), one per reflection.
    n_bins : int, default=10

    Returns
    -------
    shell : ndarray of int
        Shell of each reflection, 0 for the lowest resolution; shells hold equal numbers
        of the reflections (quantiles of 1/d², :func:`skmerge.shells.make_shells`).
    limits : list of (float, float)
        (d_max, d_min) of every shell in Å.

    Examples
    --------
    >>> from skmerge.stats import resolution_shells
    >>> shell, limits = resolution_shells([10.0, 5.0, 4.0, 3.0, 2.5, 2.0], 2)
    >>> shell.tolist()
    [0, 0, 0, 1, 1, 1]
    >>> [(round(a, 2), round(b, 2)) for a, b in limits]
    [(10.0, 3.39), (3.39, 2.0)]
    """
    shells = make_shells(dhkl, n_bins)
    return shells.assign(dhkl), list(zip(shells.d_max.tolist(), shells.d_min.tolist()))


def cc_half(halves, *, column="I", n_bins=10, method="pearson"):
    """CC1/2 per resolution shell (and overall) from half-dataset merges.

    The correlation of ``column`` between the two halves of each repeat over the
    reflections merged in both (:func:`skmerge.shells.paired_halves`), averaged over the
    repeats. The shells are equal-count in 1/d² over the reflections measured in the
    half-dataset table (:func:`skmerge.shells.measured_reflections`): for the
    half-dataset merges of one data set, its measured reflections, which are the
    reflections :func:`merging_statistics` makes its shells of. The two then give the
    same per-shell CC1/2.

    Parameters
    ----------
    halves : rs.DataSet
        :func:`~skmerge.half_datasets.half_dataset_merges`, or an ``_xval_`` MTZ file.
    column : str, default="I"
    n_bins : int, default=10
    method : {"pearson", "spearman"}, default="pearson"

    Returns
    -------
    pandas.DataFrame
        One row per shell (0 = lowest resolution), then an ``overall`` row: d_max, d_min
        (Å), n (pairs, averaged over repeats) and the correlation as ``CC1/2``.

    Examples
    --------
    >>> import gemmi
    >>> import numpy as np
    >>> import reciprocalspaceship as rs
    >>> from skmerge.stats import cc_half
    >>> rng = np.random.default_rng(0)
    >>> cell, sg = gemmi.UnitCell(30, 30, 30, 90, 90, 90), gemmi.SpaceGroup("P 1")
    >>> hkl = rs.utils.generate_reciprocal_asu(cell, sg, 5.0)
    >>> truth = rng.exponential(100, len(hkl))
    >>> halves = rs.concat([
    ...     rs.DataSet({"H": hkl[:, 0], "K": hkl[:, 1], "L": hkl[:, 2], "repeat": 0, "half": half,
    ...                 "I": truth + rng.normal(0, 30, len(hkl))},
    ...                cell=cell, spacegroup=sg).set_index(["H", "K", "L"])
    ...     for half in (0, 1)])
    >>> table = cc_half(halves, n_bins=3)
    >>> table.index.tolist()
    [0, 1, 2, 'overall']
    >>> bool(table.loc["overall", "CC1/2"] > 0.8), int(table.loc["overall", "n"]) == len(hkl)
    (True, True)
    """
    return _half_table(halves, column, n_bins, method, "CC1/2")


def cc_anom(halves, *, n_bins=10, method="pearson"):
    """CCanom per shell: the correlation of DANO = F(+) − F(−) between the halves.

    Over the acentric reflections measured in both Friedel halves of both halves; shells
    as :func:`cc_half` makes them. DANO is derived from F(±) when the table has none
    (:func:`standardise_columns`).

    Returns
    -------
    pandas.DataFrame
        As :func:`cc_half`, with the correlation as ``CCanom``.

    Examples
    --------
    >>> import gemmi
    >>> import numpy as np
    >>> import reciprocalspaceship as rs
    >>> from skmerge.stats import cc_anom
    >>> rng = np.random.default_rng(0)
    >>> cell, sg = gemmi.UnitCell(30, 30, 30, 90, 90, 90), gemmi.SpaceGroup("P 1")
    >>> hkl = rs.utils.generate_reciprocal_asu(cell, sg, 5.0)
    >>> f, dano = rng.rayleigh(10, len(hkl)), rng.normal(0, 1, len(hkl))
    >>> halves = rs.concat([
    ...     rs.DataSet({"H": hkl[:, 0], "K": hkl[:, 1], "L": hkl[:, 2], "repeat": 0, "half": half,
    ...                 "F(+)": f + dano / 2 + rng.normal(0, 0.3, len(hkl)),
    ...                 "F(-)": f - dano / 2 + rng.normal(0, 0.3, len(hkl))},
    ...                cell=cell, spacegroup=sg).set_index(["H", "K", "L"])
    ...     for half in (0, 1)])
    >>> bool(cc_anom(halves, n_bins=2).loc["overall", "CCanom"] > 0.7)
    True
    """
    halves, _ = standardise_columns(halves, "half-dataset")
    if "DANO" not in halves.columns:
        raise InputError("CCanom needs anomalous half-dataset merges (fit with anomalous=True).")
    return _half_table(halves, "DANO", n_bins, method, "CCanom")


def _half_table(halves, column, n_bins, method, name):
    check_method(method)
    shells = make_shells(measured_reflections(halves), n_bins)
    result = half_correlations(halves, column, shells, method)
    if not result.repeats:
        raise InputError(f"no reflection has {column} in both halves.")
    out = pd.DataFrame({
        "d_max": [*shells.d_max, shells.d_max[0]],
        "d_min": [*shells.d_min, shells.d_min[-1]],
        "n": result.counts.mean(axis=0).round().astype(int),
        name: result.mean(),
    }, index=[*range(shells.n), "overall"])
    return out


# --------------------------------------------------------------------------- the table
_DISPLAY = {
    # column: (heading, width, format)
    "n_obs": ("#obs", 9, "{:.0f}"),
    "n_unique": ("#uniq", 7, "{:.0f}"),
    "multiplicity": ("Mult", 6, "{:.1f}"),
    "completeness": ("Cmpl%", 6, "{:.1%}"),
    "anom_completeness": ("AnoCmp%", 8, "{:.1%}"),
    "mean_isigi": ("<I/sI>", 7, "{:.1f}"),
    "cc_half": ("CC1/2", 7, "{:.3f}"),
    "cc_anom": ("CCanom", 7, "{:.3f}"),
    "cc_diff": ("CCdiff", 7, "{:.3f}"),
    "cc_pred": ("CCpred", 7, "{:.3f}"),
}


@dataclass
class MergingStatistics:
    """The merging-statistics table of one merged data set.

    Attributes
    ----------
    table : pandas.DataFrame
        One row per resolution shell (index 1 … n, lowest resolution first), then an
        ``overall`` row. Columns: d_max, d_min (Å), n_obs, n_unique, multiplicity,
        completeness, [anom_completeness], mean_isigi, [cc_half], [cc_anom], [cc_pred]
        (columns in brackets only when they can be computed). Completeness values are
        fractions; CCs are NaN where fewer than 3 pairs exist.
    binning : {"equal-count", "equal-volume"}
    method : {"pearson", "spearman"}
    anomalous : bool
    n_repeats : int
        Half-dataset repeats the CCs are averaged over (0: no half-dataset merges).
    n_test : int
        Held-out observations CCpred is computed on (0: none).
    notes : list of str
        Anything the reader of the table should know (e.g. columns substituted).

    Examples
    --------
    >>> import pandas as pd
    >>> from skmerge.stats import MergingStatistics
    >>> table = pd.DataFrame({"d_max": [10.0, 3.0, 10.0], "d_min": [3.0, 2.0, 2.0],
    ...                       "n_obs": [400.0, 380.0, 780.0], "n_unique": [100.0, 95.0, 195.0],
    ...                       "multiplicity": [4.0, 4.0, 4.0], "completeness": [0.99, 0.97, 0.98],
    ...                       "mean_isigi": [20.1, 3.2, 11.8], "cc_half": [0.998, 0.61, 0.99]},
    ...                      index=[1, 2, "overall"])
    >>> stats = MergingStatistics(table, n_repeats=1)
    >>> print(stats)
    2 resolution shells of equal numbers of measured reflections; CC1/2: Pearson over 1 half-dataset repeat
      d_max  d_min      #obs   #uniq   Mult  Cmpl%  <I/sI>   CC1/2
    --------------------------------------------------------------
      10.00   3.00       400     100    4.0   99.0    20.1   0.998
       3.00   2.00       380      95    4.0   97.0     3.2   0.610
    --------------------------------------------------------------
      10.00   2.00       780     195    4.0   98.0    11.8   0.990  overall
    >>> MergingStatistics.from_dict(stats.to_dict()).to_string() == stats.to_string()
    True
    """

    table: pd.DataFrame
    binning: str = "equal-count"
    method: str = "pearson"
    anomalous: bool = False
    n_repeats: int = 0
    n_test: int = 0
    notes: list = field(default_factory=list)

    def header(self):
        """One line saying how the shells and correlations were made."""
        n = len(self.table) - 1
        what = "equal numbers of measured reflections" if self.binning == "equal-count" else (
            "equal numbers of possible reflections (about equal reciprocal volume)")
        parts = [f"{n} resolution shells of {what}"]
        if self.n_repeats:
            parts.append(f"CC1/2{' and CCanom' if 'cc_anom' in self.table else ''}: "
                         f"{self.method.capitalize()} over {self.n_repeats} half-dataset repeat"
                         f"{'s' if self.n_repeats > 1 else ''}")
        if self.n_test:
            weighting = "1/SIGIobs²-weighted Pearson" if self.method == "pearson" else "Spearman"
            parts.append(f"CCpred: {weighting}, {self.n_test:,} test observations")
        return "; ".join(parts)

    def to_string(self, title=None):
        """The table, aligned like the tables of AIMLESS and dials.merge."""
        columns = [c for c in _DISPLAY if c in self.table.columns]
        lines = []
        if title:
            lines.append(title)
        lines.append(self.header())
        heading = f"{'d_max':>7} {'d_min':>6}" + "".join(f"{_DISPLAY[c][0]:>{_DISPLAY[c][1] + 1}}" for c in columns)
        lines.append(heading)
        lines.append("-" * len(heading))
        for label, row in self.table.iterrows():
            if label == "overall":
                lines.append("-" * len(heading))
            text = f"{_fmt_d(row['d_max']):>7} {_fmt_d(row['d_min']):>6}"
            for c in columns:
                heading_text, width, fmt = _DISPLAY[c]
                value = row[c]
                cell = "-" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value)
                if c.endswith("completeness") and cell != "-":
                    cell = cell.rstrip("%")
                text += f"{cell:>{width + 1}}"
            lines.append(text + ("  overall" if label == "overall" else ""))
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def __str__(self):
        return self.to_string()

    def to_dict(self):
        """A JSON-serialisable description (shells as a list of records)."""
        records = []
        for label, row in self.table.iterrows():
            record = {"shell": label if label == "overall" else int(label)}
            for c, v in row.items():
                v = float(v)
                record[c] = None if math.isnan(v) else (int(v) if c in ("n_obs", "n_unique") else v)
            records.append(record)
        return {
            "binning": self.binning,
            "method": self.method,
            "anomalous": self.anomalous,
            "n_repeats": self.n_repeats,
            "n_test": self.n_test,
            "notes": list(self.notes),
            "shells": records,
        }

    @classmethod
    def from_dict(cls, data):
        """Inverse of :meth:`to_dict`."""
        table = pd.DataFrame(data["shells"]).set_index("shell")
        table.index = [i if i == "overall" else int(i) for i in table.index]
        table = table.astype(float)
        return cls(table, data["binning"], data["method"], data["anomalous"], data["n_repeats"],
                   data["n_test"], list(data.get("notes", [])))


def merging_statistics(merged, halves=None, predictions=None, *, parent_halves=None, shells=10,
                       binning="equal-count", method="pearson"):
    """Merging statistics per resolution shell, with an overall line.

    Parameters
    ----------
    merged : rs.DataSet
        One merged data set indexed by ASU H, K, L, with cell and space group: the output
        of ``VariationalMerger.transform`` or a merged MTZ file (I, SIGI and N; N(+),
        N(-) for the anomalous completeness). careless's ``SigI`` names are accepted.
    halves : rs.DataSet, optional
        Half-dataset merges of the same data (:func:`~skmerge.half_datasets.half_dataset_merges`, or an
        ``_xval_`` MTZ file): enables CC1/2, and CCanom when they hold DANO or F(±).
    predictions : DataFrame, optional
        One row per observation with Iobs, SIGIobs, Ipred and a ``test`` flag (1 for
        observations held out of the fit), and dHKL or an H, K, L index with the cell:
        enables CCpred when some observations are held out.
    parent_halves : rs.DataSet, optional
        The half-dataset merges of the data set's parent (another file of the same
        separate-files fit, e.g. the dark state of a time point): enables CCdiff.
    shells : int or sequence of float, default=10
        Number of shells, or their boundaries in Å from low to high resolution
        (reflections outside are left out).
    binning : {"equal-count", "equal-volume"}, default="equal-count"
        "equal-count": each shell holds the same number of measured unique reflections
        (quantiles of 1/d²). "equal-volume": each shell holds the same number of the
        possible reflections of the full asymmetric unit, which is about equal volume of
        reciprocal space; outer shells are then thinner in measured reflections.
    method : {"pearson", "spearman"}, default="pearson"
        Correlation coefficient for CC1/2, CCanom and CCpred.

    Returns
    -------
    MergingStatistics
        Its ``table`` has one row per shell and an overall row. ``print`` shows it.

    Notes
    -----
    Definitions (per shell; the overall line pools all shells):

    - **d_max, d_min**: resolution range in Å. Shells are bounded in 1/d² from the lowest
      to the highest resolution of the measured reflections of ``merged`` (N > 0 and a
      finite I), and made of them (:func:`skmerge.shells.make_shells`). Every column,
      the CCs included, uses these shells; for half-dataset merges of the same data
      they are the shells :func:`cc_half` makes, so its per-shell CC1/2 are the same.
    - **n_obs**: observations merged (sum of N); **n_unique**: reflections with N > 0;
      **multiplicity** = n_obs / n_unique.
    - **completeness**: n_unique / the number of reflections of the full reciprocal
      asymmetric unit (Friedel mates together, systematic absences excluded) in the
      shell's range (``rs.utils.generate_reciprocal_asu``).
      **anom_completeness** (anomalous data): the fraction of acentric reflections of
      the asymmetric unit with both Friedel mates measured (AIMLESS's AnomCmpl).
    - **mean_isigi**: the mean over unique reflections of the merged I / SIGI
      (AIMLESS's Mn(I/sd)). Variational posteriors are shrunk towards the prior, so for
      weak reflections this is larger than the I/σ of a weighted mean.
    - **cc_half**: the correlation of the merged I between the two halves of each
      half-dataset repeat over reflections merged in both, averaged over repeats.
    - **cc_anom**: the same for DANO = F(+) − F(−) (acentric reflections with both
      mates in both halves).
    - **cc_diff**: the same for DF = F − F_parent, the difference from the parent data
      set (CCdiff1/2: how well the halves agree on a time-resolved or isomorphous
      difference).
    - **cc_pred**: the correlation of Iobs with Ipred over the held-out (test)
      observations; with ``method="pearson"`` each observation is weighted by
      1/SIGIobs² (careless's ``ccpred`` convention), with "spearman" unweighted.

    Examples
    --------
    >>> import gemmi
    >>> import numpy as np
    >>> import reciprocalspaceship as rs
    >>> from skmerge.stats import merging_statistics
    >>> rng = np.random.default_rng(0)
    >>> cell, sg = gemmi.UnitCell(30, 30, 30, 90, 90, 90), gemmi.SpaceGroup("P 1")
    >>> hkl = rs.utils.generate_reciprocal_asu(cell, sg, 5.0)
    >>> truth = rng.exponential(100, len(hkl))
    >>> def table(**columns):
    ...     data = {"H": hkl[:, 0], "K": hkl[:, 1], "L": hkl[:, 2], **columns}
    ...     return rs.DataSet(data, cell=cell, spacegroup=sg, merged=True).set_index(["H", "K", "L"])
    >>> merged = table(I=truth + rng.normal(0, 10, len(hkl)), SIGI=np.full(len(hkl), 10.0), N=4)
    >>> halves = rs.concat([table(I=truth + rng.normal(0, 14, len(hkl)), N=2, repeat=0, half=half)
    ...                     for half in (0, 1)])
    >>> stats = merging_statistics(merged, halves, shells=3)
    >>> print(stats)
    3 resolution shells of equal numbers of measured reflections; CC1/2: Pearson over 1 half-dataset repeat
      d_max  d_min      #obs   #uniq   Mult  Cmpl%  <I/sI>   CC1/2
    --------------------------------------------------------------
      30.00   7.07       608     152    4.0  100.0    10.9   0.980
       7.07   5.77       612     153    4.0  100.0    10.9   0.983
       5.77   5.00       628     157    4.0  100.0    11.2   0.986
    --------------------------------------------------------------
      30.00   5.00      1848     462    4.0  100.0    11.0   0.983  overall

    The same halves give the same CC1/2 through :func:`cc_half` (shells counted 0 …):

    >>> from skmerge.stats import cc_half
    >>> np.allclose(cc_half(halves, n_bins=3)["CC1/2"], stats.table["cc_half"])
    True
    """
    if binning not in BINNINGS:
        raise InputError(f"binning={binning!r}: use one of {', '.join(BINNINGS)}.")
    check_method(method)
    merged, notes = standardise_columns(merged, "merged")
    cell, spacegroup = _symmetry(merged, "merged data")
    if "file_id" in merged.columns and merged["file_id"].nunique() > 1:
        raise InputError("the merged table holds several data sets (file_id); give one at a time.")
    for needed in ("I", "SIGI"):
        if needed not in merged.columns:
            raise InputError(f"the merged table has no {needed} column; columns: {', '.join(merged.columns)}.")

    hkl = merged.reset_index()[["H", "K", "L"]].to_numpy(np.int32)
    count = merged["N"].to_numpy(np.float64, na_value=0) if "N" in merged.columns else np.ones(len(merged))
    intensity = merged["I"].to_numpy(np.float64, na_value=np.nan)
    sigma = merged["SIGI"].to_numpy(np.float64, na_value=np.nan)
    measured = (count > 0) & np.isfinite(intensity)
    if not measured.any():
        raise InputError("the merged table has no measured reflection (all N = 0).")
    hkl, count, intensity, sigma = hkl[measured], count[measured], intensity[measured], sigma[measured]
    d = cell.calculate_d_array(hkl)
    s = 1 / d**2

    # The full asymmetric unit over the measured range.
    s_lo, s_hi = s.min(), s.max()
    full = rs.utils.generate_reciprocal_asu(cell, spacegroup, 1 / math.sqrt(s_hi) * (1 - 1e-9), anomalous=False)
    full = np.asarray(full, dtype=np.int32)
    d_full = cell.calculate_d_array(full)
    s_full = 1 / d_full**2
    tolerance = 1e-9 * s_hi
    inside = (s_full >= s_lo - tolerance) & (s_full <= s_hi + tolerance)
    full, d_full = full[inside], d_full[inside]

    bins = make_shells(d, shells, binning=binning, possible_dhkl=d_full)
    n = bins.n
    shell = bins.assign(d)
    full_shell = bins.assign(d_full)
    in_full = np.isin(pack_hkl(hkl), pack_hkl(full))

    rows = {
        "d_max": [*bins.d_max, bins.d_max[0]],
        "d_min": [*bins.d_min, bins.d_min[-1]],
        "n_obs": _per_shell(shell, n, count, np.sum),
        "n_unique": _per_shell(shell, n, np.ones_like(count), np.sum),
    }
    rows["multiplicity"] = _ratio(rows["n_obs"], rows["n_unique"])
    rows["completeness"] = _ratio(_per_shell(shell, n, in_full.astype(float), np.sum),
                                  _per_shell(full_shell, n, np.ones(len(full)), np.sum))
    anomalous = "N(+)" in merged.columns and "N(-)" in merged.columns
    if anomalous:
        rows["anom_completeness"] = _anomalous_completeness(merged, measured, hkl, shell, full, full_shell, n, spacegroup)
    rows["mean_isigi"] = _per_shell(shell, n, intensity / sigma, np.mean)

    n_repeats = 0
    if halves is not None:
        # Half-dataset files have careless's layout (Friedel halves without their means)
        # whoever wrote them, so rebuilding the means is no news worth a note.
        halves, _ = standardise_columns(halves, "half-dataset")
        column = "I" if "I" in halves.columns else "F"
        if column == "F":
            notes.append("CC1/2 is computed on F: the half-dataset table has no I column.")
        rows["cc_half"] = half_correlations(halves, column, bins, method).mean()
        n_repeats = int(halves["repeat"].nunique())
        if "DANO" in halves.columns:
            anomalous = True
            rows["cc_anom"] = half_correlations(halves, "DANO", bins, method).mean()
        if parent_halves is not None:
            parent_halves, _ = standardise_columns(parent_halves, "parent half-dataset")
            rows["cc_diff"] = half_correlations(difference_halves(halves, parent_halves), "DF", bins, method).mean()

    n_test = 0
    if predictions is not None:
        predictions, pred_notes = standardise_columns(predictions, "predictions")
        notes += pred_notes
        cc, n_test = _cc_pred(predictions, bins, method, cell)
        if n_test:
            rows["cc_pred"] = cc

    table = pd.DataFrame(rows, index=[*range(1, n + 1), "overall"])
    table.index.name = "shell"
    return MergingStatistics(table, binning, method, bool(anomalous), n_repeats, n_test, notes)


def difference_halves(halves, parent_halves):
    """Half-dataset merges of the difference DF = F − F_parent between a data set and
    its parent (e.g. a time point and the dark state), per repeat and half: the input of
    CCdiff1/2. Both tables come from the same half-dataset merges (one split of the
    images serves every file), so half h of one repeat pairs with half h of the other.

    Examples
    --------
    >>> import gemmi
    >>> import reciprocalspaceship as rs
    >>> from skmerge.stats import difference_halves
    >>> def halves(f):
    ...     return rs.DataSet({"H": [1, 1, 2, 2], "K": 0, "L": 0, "F": f, "repeat": 0, "half": [0, 1, 0, 1]},
    ...                       cell=gemmi.UnitCell(10, 10, 10, 90, 90, 90)).set_index(["H", "K", "L"])
    >>> difference_halves(halves([5.0, 6, 2, 3]), halves([4.0, 4, 2, 2]))["DF"].tolist()
    [1.0, 2.0, 0.0, 1.0]
    """
    keys = ["H", "K", "L", "repeat", "half"]
    # Plain frames: the halves may lack a space group, which rs.DataSet.merge demands.
    child, parent = (pd.DataFrame(t.reset_index()) for t in (halves, parent_halves))
    for table, what in ((child, "half-dataset"), (parent, "parent half-dataset")):
        missing = [c for c in keys + ["F"] if c not in table.columns]
        if missing:
            raise InputError(f"the {what} table has no {', '.join(missing)} column(s); CCdiff needs F per half.")
    parent = parent[keys + ["F"] + (["N"] if "N" in parent.columns else [])]
    both = child.merge(parent, on=keys, suffixes=("", "_parent"))
    if "N_parent" in both.columns:
        both["N"] = np.minimum(both["N"], both["N_parent"]) if "N" in both.columns else both["N_parent"]
    both["DF"] = both["F"].to_numpy(np.float64) - both["F_parent"].to_numpy(np.float64)
    table = rs.DataSet(both[keys + ["DF"] + (["N"] if "N" in both.columns else [])], cell=halves.cell,
                       spacegroup=halves.spacegroup, merged=True)
    return table.set_index(["H", "K", "L"])


def standardise_columns(table, what="table"):
    """Copy of a merged, half-dataset or predictions table with skmerge's column names.

    careless names standard deviations ``SigF``, ``SigI``, ``SigIobs``; they become
    ``SIGF``, ``SIGI``, ``SIGIobs``. A table with Friedel columns but without some of
    the Friedel-mean ones (careless's layout, or a table of Friedel halves only) gets
    the missing F, SIGF, I, SIGI, N, DANO and SIGDANO from
    :func:`skmerge.merged.combine_friedel`, the function that makes them for skmerge's
    own anomalous output. A Friedel half with N(±) = 0 counts as unmeasured there.

    Parameters
    ----------
    table : rs.DataSet or pandas.DataFrame
    what : str, default="table"
        Name of the table in the notes.

    Returns
    -------
    table : rs.DataSet or pandas.DataFrame
        A copy, with the cell, space group and ``merged`` flag of ``table``.
    notes : list of str
        What was derived.

    Examples
    --------
    >>> import gemmi
    >>> import reciprocalspaceship as rs
    >>> from skmerge.stats import standardise_columns
    >>> friedel = rs.DataSet({"H": [1, 2], "K": [2, 0], "L": [3, 0],
    ...                       "I(+)": [10.0, 4.0], "SigI(+)": [3.0, 2.0], "N(+)": [2, 1],
    ...                       "I(-)": [6.0, 4.0], "SigI(-)": [4.0, 2.0], "N(-)": [1, 1]},
    ...                      spacegroup=gemmi.SpaceGroup("P 1 2 1")).set_index(["H", "K", "L"])
    >>> out, notes = standardise_columns(friedel, "merged")
    >>> out[["I", "SIGI", "N"]].values.tolist()
    [[8.0, 2.5, 3.0], [4.0, 2.0, 1.0]]
    >>> notes
    ['merged: I, SIGI, N derived from the Friedel columns.']
    """
    renames = {c: "SIG" + c[3:] for c in table.columns if isinstance(c, str) and c.startswith("Sig")}
    renames = {old: new for old, new in renames.items() if new not in table.columns}
    out = table.rename(columns=renames) if renames else table.copy()
    for attr in ("cell", "spacegroup", "merged"):
        setattr(out, attr, getattr(table, attr, None))
    pairs = [name for name in ("F", "SIGF", "I", "SIGI", "N")
             if name + "(+)" in out.columns and name + "(-)" in out.columns]
    derivable = {"F": "F", "SIGF": "SIGF", "I": "I", "SIGI": "SIGI", "N": "N", "DANO": "F", "SIGDANO": "SIGF"}
    missing = [name for name, source in derivable.items() if source in pairs and name not in out.columns]
    if not missing:
        return out, []
    if out.spacegroup is None:
        raise InputError(f"the {what} table has Friedel columns but no space group (needed to tell "
                         "centric reflections, whose Friedel mates are one reflection).")
    hkl = out.reset_index()[["H", "K", "L"]].to_numpy(np.int32)
    centric, _ = reflection_flags(hkl, out.spacegroup)
    halves = {}
    for name in pairs:
        for sign in ("(+)", "(-)"):
            halves[name + sign] = out[name + sign].to_numpy(np.float64, na_value=np.nan)
    if "N" in pairs:
        for sign in ("(+)", "(-)"):
            unmeasured = ~(halves["N" + sign] > 0)
            for name in pairs:
                if name != "N":
                    halves[name + sign] = np.where(unmeasured, np.nan, halves[name + sign])
    combined = combine_friedel(halves, centric)
    for name in missing:
        out[name] = combined[name]
    means = [name for name in missing if name not in ("DANO", "SIGDANO")]
    return out, [f"{what}: {', '.join(means)} derived from the Friedel columns."] if means else []


# ---------------------------------------------------------------------------- helpers
def _per_shell(shell, n, values, reduce):
    """``reduce`` of ``values`` in each shell, then over every assigned value."""
    values = np.asarray(values, dtype=np.float64)
    out = []
    for i in range(n):
        part = values[shell == i]
        out.append(float(reduce(part)) if len(part) else (0.0 if reduce is np.sum else np.nan))
    assigned = values[shell >= 0]
    out.append(float(reduce(assigned)) if len(assigned) else np.nan)
    return np.array(out)


def _ratio(a, b):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1), np.nan)


def _anomalous_completeness(merged, measured, hkl, shell, full, full_shell, n, spacegroup):
    plus = merged["N(+)"].to_numpy(np.float64, na_value=0)[measured]
    minus = merged["N(-)"].to_numpy(np.float64, na_value=0)[measured]
    centric, _ = reflection_flags(hkl, spacegroup)
    full_centric, _ = reflection_flags(full, spacegroup)
    both = (plus > 0) & (minus > 0) & ~centric & np.isin(pack_hkl(hkl), pack_hkl(full))
    acentric_shell = np.where(full_centric, -1, full_shell)
    return _ratio(_per_shell(np.where(centric, -1, shell), n, both.astype(float), np.sum),
                  _per_shell(acentric_shell, n, np.ones(len(full)), np.sum))


def _cc_pred(predictions, shells, method, cell):
    """CCpred per shell and pooled over the held-out observations, and their number."""
    for needed in ("Iobs", "Ipred", "test"):
        if needed not in predictions.columns:
            raise InputError(f"the predictions table has no column {needed!r}.")
    test = evaluation_rows(predictions)
    if not test.any():
        return np.full(shells.n + 1, np.nan), 0
    table = predictions[test]
    if "dHKL" in table.columns:
        d = table["dHKL"].to_numpy(np.float64)
    else:
        hkl = table.reset_index()[["H", "K", "L"]].to_numpy(np.int32)
        d = (getattr(predictions, "cell", None) or cell).calculate_d_array(hkl)
    shell = shells.assign(d)
    iobs = table["Iobs"].to_numpy(np.float64)
    ipred = table["Ipred"].to_numpy(np.float64)
    # careless's convention: each observation weighted by 1/SIGIobs² (Pearson only).
    weight = None
    if method == "pearson" and "SIGIobs" in table.columns:
        weight = table["SIGIobs"].to_numpy(np.float64) ** -2.0
    values = []
    for rows in [*(shell == i for i in range(shells.n)), shell >= 0]:
        values.append(correlation(iobs[rows], ipred[rows], method, None if weight is None else weight[rows]))
    return np.array(values), int(test.sum())


def _symmetry(table, what):
    cell, spacegroup = getattr(table, "cell", None), getattr(table, "spacegroup", None)
    if cell is None or spacegroup is None:
        raise InputError(f"the {what} have no unit cell or space group.")
    return cell, spacegroup


def _fmt_d(d):
    return "inf" if not np.isfinite(d) else f"{d:.2f}"
