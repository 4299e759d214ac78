"""Merging statistics: CC1/2, CCanom, CCpred and the per-shell table.

Everything here works on plain tables (``rs.DataSet``), so the statistics of a fit in
memory and of MTZ files written earlier (by skmerge, or careless's ``SigF`` layout) are
computed by the same code, without TensorFlow. The half-dataset merges they read are
made by :func:`skmerge.half_datasets.half_dataset_merges`.
"""

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import reciprocalspaceship as rs

from .errors import InputError
from .symmetry import pack_hkl, reflection_flags

BINNINGS = ("equal-count", "equal-volume")
METHODS = ("pearson", "spearman")


def resolution_shells(dhkl, n_bins=10):
    """Shell number of each resolution in equal-count shells of 1/d² (0 = lowest
    resolution) and the (d_max, d_min) of every shell."""
    s = 1 / np.asarray(dhkl, dtype=np.float64) ** 2
    edges = np.quantile(s, np.linspace(0, 1, n_bins + 1))
    shell = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, n_bins - 1)
    return shell, _limits(edges)


def cc_half(halves, *, column="I", n_bins=10, method="pearson"):
    """CC1/2 per resolution shell (and overall) from :func:`~skmerge.half_datasets.half_dataset_merges`.

    The correlation of ``column`` between the two halves over the reflections merged in
    both, averaged over repeats. Shells are equal-count in 1/d² over those reflections.

    Returns
    -------
    pandas.DataFrame
        One row per shell, then an ``overall`` row: d_max, d_min, n (reflections), and
        the correlation under the name ``CC1/2``.
    """
    return _half_correlation(halves, column, n_bins, method, "CC1/2")


def cc_anom(halves, *, n_bins=10, method="pearson"):
    """CCanom per shell: the correlation of DANO between the halves (acentric reflections
    measured in both Friedel halves of both halves)."""
    if "DANO" not in halves.columns:
        raise InputError("CCanom needs anomalous half-dataset merges (fit with anomalous=True).")
    return _half_correlation(halves, "DANO", n_bins, method, "CCanom")


def _half_correlation(halves, column, n_bins, method, name):
    _check_method(method)
    rows = []
    for repeat, paired in _paired_halves(halves, column):
        shell, limits = resolution_shells(paired["dHKL"].to_numpy(), n_bins)
        for i, (dmax, dmin) in enumerate(limits):
            part = paired[shell == i]
            rows.append((repeat, i, dmax, dmin, len(part), _correlation(part.a, part.b, method)))
        rows.append((repeat, n_bins, limits[0][0], limits[-1][1], len(paired), _correlation(paired.a, paired.b, method)))
    if not rows:
        raise InputError(f"no reflection has {column} in both halves.")
    table = pd.DataFrame(rows, columns=["repeat", "shell", "d_max", "d_min", "n", name])
    out = table.groupby("shell")[["d_max", "d_min", "n", name]].mean()
    out.index = [*range(n_bins), "overall"][: len(out)]
    out["n"] = out["n"].round().astype(int)
    return out


def _paired_halves(halves, column):
    """(repeat, DataFrame) for every repeat: columns a, b (``column`` in half 0 and half
    1) and dHKL, over the reflections with a finite value in both halves. Reflections
    are paired by H, K, L and, for data sets merged separately, ``file_id``."""
    for needed in ("repeat", "half", column):
        if needed not in halves.columns:
            raise InputError(
                f"the half-dataset table has no column {needed!r}; give the output of "
                "half_dataset_merges (or an _xval_ MTZ file)."
            )
    if getattr(halves, "cell", None) is None:
        raise InputError("the half-dataset table has no unit cell.")
    data = halves.reset_index()
    keys = ["H", "K", "L"] + (["file_id"] if "file_id" in data.columns else [])
    frame = pd.DataFrame({k: data[k].to_numpy(np.int64) for k in keys})
    frame["value"] = data[column].to_numpy(np.float64, na_value=np.nan)
    if "N" in data.columns:
        frame.loc[data["N"].to_numpy(np.float64, na_value=0) <= 0, "value"] = np.nan
    frame["repeat"] = data["repeat"].to_numpy(np.int64)
    frame["half"] = data["half"].to_numpy(np.int64)
    frame = frame[np.isfinite(frame["value"])]
    for repeat, table in frame.groupby("repeat", sort=True):
        a = table[table["half"] == 0].drop(columns=["half", "repeat"]).rename(columns={"value": "a"})
        b = table[table["half"] == 1].drop(columns=["half", "repeat"]).rename(columns={"value": "b"})
        paired = a.merge(b, on=keys, how="inner")
        if paired.empty:
            continue
        hkl = paired[["H", "K", "L"]].to_numpy(np.int32)
        paired["dHKL"] = halves.cell.calculate_d_array(hkl)
        yield repeat, paired


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


def merging_statistics(merged, halves=None, predictions=None, *, shells=10, binning="equal-count",
                       method="pearson"):
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
      to the highest resolution of the measured reflections.
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
    - **cc_pred**: the correlation of Iobs with Ipred over the held-out (test)
      observations; with ``method="pearson"`` each observation is weighted by
      1/SIGIobs² (careless's ``ccpred`` convention), with "spearman" unweighted.
    """
    if binning not in BINNINGS:
        raise InputError(f"binning={binning!r}: use one of {', '.join(BINNINGS)}.")
    _check_method(method)
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
    s = 1 / cell.calculate_d_array(hkl) ** 2

    # The full asymmetric unit over the measured range.
    s_lo, s_hi = s.min(), s.max()
    full = rs.utils.generate_reciprocal_asu(cell, spacegroup, 1 / math.sqrt(s_hi) * (1 - 1e-9), anomalous=False)
    full = np.asarray(full, dtype=np.int32)
    s_full = 1 / cell.calculate_d_array(full) ** 2
    tolerance = 1e-9 * s_hi
    inside = (s_full >= s_lo - tolerance) & (s_full <= s_hi + tolerance)
    full, s_full = full[inside], s_full[inside]

    edges, clip = _shell_edges(shells, binning, s, s_full)
    n = len(edges) - 1
    shell = _assign(s, edges, clip)
    full_shell = _assign(s_full, edges, clip)
    in_full = np.isin(pack_hkl(hkl), pack_hkl(full))

    rows = {
        "d_max": _d([*edges[:-1], edges[0]]),
        "d_min": _d([*edges[1:], edges[-1]]),
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
        halves, half_notes = standardise_columns(halves, "half-dataset")
        notes += half_notes
        column = "I" if "I" in halves.columns else "F"
        if column == "F":
            notes.append("CC1/2 is computed on F: the half-dataset table has no I column.")
        rows["cc_half"], n_repeats = _half_cc(halves, column, edges, clip, method)
        if "DANO" in halves.columns:
            anomalous = True
            rows["cc_anom"], _ = _half_cc(halves, "DANO", edges, clip, method)

    n_test = 0
    if predictions is not None:
        predictions, pred_notes = standardise_columns(predictions, "predictions")
        notes += pred_notes
        cc, n_test = _cc_pred(predictions, edges, clip, method, cell)
        if n_test:
            rows["cc_pred"] = cc

    table = pd.DataFrame(rows, index=[*range(1, n + 1), "overall"])
    table.index.name = "shell"
    return MergingStatistics(table, binning, method, bool(anomalous), n_repeats, n_test, notes)


def standardise_columns(table, what="table"):
    """Copy of a merged, half-dataset or predictions table with skmerge's column names.

    careless names standard deviations ``SigF``, ``SigI``, ``SigIobs``; they become
    ``SIGF``, ``SIGI``, ``SIGIobs``. Anomalous tables without the mean columns get
    I (mean of I(±) measured), SIGI, N (= N(+) + N(−), centrics counted once) and DANO
    (= F(+) − F(−)). Returns the table and a list of notes on what was derived.
    """
    notes = []
    renames = {c: "SIG" + c[3:] for c in table.columns if isinstance(c, str) and c.startswith("Sig")}
    renames = {old: new for old, new in renames.items() if new not in table.columns}
    out = table.rename(columns=renames) if renames else table.copy()
    for attr in ("cell", "spacegroup", "merged"):
        setattr(out, attr, getattr(table, attr, None))
    if {"I(+)", "I(-)"} <= set(out.columns) and "I" not in out.columns:
        plus = out["I(+)"].to_numpy(np.float64, na_value=np.nan)
        minus = out["I(-)"].to_numpy(np.float64, na_value=np.nan)
        out["I"] = np.nanmean(np.stack([plus, minus]), axis=0) if len(out) else plus
        if {"SIGI(+)", "SIGI(-)"} <= set(out.columns):
            sp = out["SIGI(+)"].to_numpy(np.float64, na_value=np.nan)
            sm = out["SIGI(-)"].to_numpy(np.float64, na_value=np.nan)
            both = np.isfinite(sp) & np.isfinite(sm)
            out["SIGI"] = np.where(both, np.sqrt(sp**2 + sm**2) / 2, np.where(np.isfinite(sp), sp, sm))
        notes.append(f"{what}: I and SIGI derived from I(+) and I(-).")
    if {"N(+)", "N(-)"} <= set(out.columns) and "N" not in out.columns and out.spacegroup is not None:
        hkl = out.reset_index()[["H", "K", "L"]].to_numpy(np.int32)
        centric, _ = reflection_flags(hkl, out.spacegroup)
        plus = out["N(+)"].to_numpy(np.float64, na_value=0)
        minus = out["N(-)"].to_numpy(np.float64, na_value=0)
        out["N"] = np.where(centric, np.maximum(plus, minus), plus + minus)
    if {"F(+)", "F(-)"} <= set(out.columns) and "DANO" not in out.columns:
        dano = out["F(+)"].to_numpy(np.float64, na_value=np.nan) - out["F(-)"].to_numpy(np.float64, na_value=np.nan)
        if out.spacegroup is not None:
            centric, _ = reflection_flags(out.reset_index()[["H", "K", "L"]].to_numpy(np.int32), out.spacegroup)
            dano = np.where(centric, np.nan, dano)
        out["DANO"] = dano
    return out, notes


# ---------------------------------------------------------------------------- helpers
def _shell_edges(shells, binning, s, s_full):
    """Ascending shell edges in 1/d², and whether values outside them are clipped into
    the outer shells (computed edges) or left out (edges given by the user)."""
    if np.ndim(shells) == 0:
        n = int(shells)
        if n < 1 or n != shells:
            raise InputError(f"shells={shells!r}: give a positive whole number of shells or their limits in Å.")
        population = s if binning == "equal-count" else (s_full if len(s_full) else s)
        edges = np.quantile(population, np.linspace(0, 1, n + 1))
        edges[0], edges[-1] = s.min(), s.max()
        edges = np.maximum.accumulate(edges)
        return edges, True
    limits = np.asarray(shells, dtype=np.float64)
    if limits.ndim != 1 or len(limits) < 2 or not (limits > 0).all() or (np.diff(limits) >= 0).any():
        raise InputError(f"shells={list(shells)!r}: give at least two resolution limits in Å, decreasing.")
    return 1 / limits**2, False


def _assign(s, edges, clip):
    n = len(edges) - 1
    shell = np.searchsorted(edges, s, side="right") - 1
    if clip:
        return np.clip(shell, 0, n - 1)
    # Limits given in Å: a reflection on the outer limits (up to rounding) is inside.
    low, high = edges[0] * (1 - 1e-9), edges[-1] * (1 + 1e-9)
    shell = np.minimum(shell, n - 1)
    return np.where((s < low) | (s > high), -1, np.maximum(shell, 0))


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


def _d(s):
    with np.errstate(divide="ignore"):
        return 1 / np.sqrt(np.asarray(s, dtype=np.float64))


def _anomalous_completeness(merged, measured, hkl, shell, full, full_shell, n, spacegroup):
    plus = merged["N(+)"].to_numpy(np.float64, na_value=0)[measured]
    minus = merged["N(-)"].to_numpy(np.float64, na_value=0)[measured]
    centric, _ = reflection_flags(hkl, spacegroup)
    full_centric, _ = reflection_flags(full, spacegroup)
    both = (plus > 0) & (minus > 0) & ~centric & np.isin(pack_hkl(hkl), pack_hkl(full))
    acentric_shell = np.where(full_centric, -1, full_shell)
    return _ratio(_per_shell(np.where(centric, -1, shell), n, both.astype(float), np.sum),
                  _per_shell(acentric_shell, n, np.ones(len(full)), np.sum))


def _half_cc(halves, column, edges, clip, method):
    """Per-shell and overall correlation of ``column`` between the halves, averaged over
    repeats; and the number of repeats."""
    n = len(edges) - 1
    per_repeat = []
    for _, paired in _paired_halves(halves, column):
        shell = _assign(1 / paired["dHKL"].to_numpy(np.float64) ** 2, edges, clip)
        a, b = paired["a"].to_numpy(), paired["b"].to_numpy()
        values = [_correlation(a[shell == i], b[shell == i], method) for i in range(n)]
        values.append(_correlation(a[shell >= 0], b[shell >= 0], method))
        per_repeat.append(values)
    n_repeats = int(halves["repeat"].nunique()) if "repeat" in halves.columns else 0
    if not per_repeat:
        return np.full(n + 1, np.nan), n_repeats
    with np.errstate(invalid="ignore"):
        stacked = np.array(per_repeat, dtype=np.float64)
        finite = np.isfinite(stacked)
        total = np.where(finite, stacked, 0).sum(axis=0)
        counts = finite.sum(axis=0)
        return np.where(counts > 0, total / np.maximum(counts, 1), np.nan), n_repeats


def _cc_pred(predictions, edges, clip, method, cell):
    for needed in ("Iobs", "Ipred", "test"):
        if needed not in predictions.columns:
            raise InputError(f"the predictions table has no column {needed!r}.")
    test = predictions["test"].to_numpy(np.float64, na_value=0) > 0
    n = len(edges) - 1
    if not test.any():
        return np.full(n + 1, np.nan), 0
    table = predictions[test]
    if "dHKL" in table.columns:
        d = table["dHKL"].to_numpy(np.float64)
    else:
        hkl = table.reset_index()[["H", "K", "L"]].to_numpy(np.int32)
        d = (getattr(predictions, "cell", None) or cell).calculate_d_array(hkl)
    shell = _assign(1 / d**2, edges, clip)
    iobs = table["Iobs"].to_numpy(np.float64)
    ipred = table["Ipred"].to_numpy(np.float64)
    if "SIGIobs" in table.columns:
        weight = table["SIGIobs"].to_numpy(np.float64) ** -2.0
    else:
        weight = np.ones(len(table))
    values = []
    for rows in [*(shell == i for i in range(n)), shell >= 0]:
        if method == "pearson":
            values.append(weighted_pearson(iobs[rows], ipred[rows], weight[rows]))
        else:
            values.append(_correlation(iobs[rows], ipred[rows], "spearman"))
    return np.array(values), int(test.sum())


def weighted_pearson(a, b, weights=None):
    """Pearson correlation of ``a`` and ``b`` with observation weights.

    With weights wᵢ, means ā = Σwᵢaᵢ/Σwᵢ (likewise b̄) and

        r = Σwᵢ(aᵢ − ā)(bᵢ − b̄) / √(Σwᵢ(aᵢ − ā)² · Σwᵢ(bᵢ − b̄)²);

    equal weights give the ordinary Pearson correlation. Pairs with a non-finite value
    are left out.

    Parameters
    ----------
    a, b : array-like of shape (n,)
    weights : array-like of shape (n,), optional
        Non-negative weights; None weighs every pair equally.

    Returns
    -------
    float
        NaN for fewer than three pairs or when either variable is constant.

    Examples
    --------
    >>> from skmerge.stats import weighted_pearson
    >>> round(weighted_pearson([1, 2, 3, 4], [1, 2, 3, 5]), 4)
    0.9827
    >>> round(weighted_pearson([1, 2, 3, 4], [1, 2, 3, 5], weights=[1, 1, 1, 0]), 4)
    1.0
    """
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    w = np.ones_like(a) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    if not (len(a) == len(b) == len(w)):
        raise InputError(f"weighted_pearson got arrays of lengths {len(a)}, {len(b)} and {len(w)}.")
    if (w < 0).any() or not np.isfinite(w).all():
        raise InputError("weighted_pearson needs finite, non-negative weights.")
    finite = np.isfinite(a) & np.isfinite(b)
    a, b, w = a[finite], b[finite], w[finite]
    if np.count_nonzero(w) < 3 or w.sum() <= 0:
        return float("nan")
    w = w / w.sum()
    da = a - np.dot(w, a)
    db = b - np.dot(w, b)
    var_a, var_b = np.dot(w, da * da), np.dot(w, db * db)
    if not (var_a > 0 and var_b > 0):
        return float("nan")
    return float(np.dot(w, da * db) / np.sqrt(var_a * var_b))


def _correlation(a, b, method):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 3:
        return np.nan
    if method == "spearman":
        a, b = _ranks(a), _ranks(b)
    with np.errstate(invalid="ignore", divide="ignore"):
        if a.std() == 0 or b.std() == 0:
            return np.nan
        return float(np.corrcoef(a, b)[0, 1])


def _ranks(values):
    """Ranks with ties given their mean rank (as Spearman's coefficient needs)."""
    return pd.Series(values).rank(method="average").to_numpy()


def _check_method(method):
    if method not in METHODS:
        raise InputError(f"method={method!r}: use 'pearson' or 'spearman'.")


def _symmetry(table, what):
    cell, spacegroup = getattr(table, "cell", None), getattr(table, "spacegroup", None)
    if cell is None or spacegroup is None:
        raise InputError(f"the {what} have no unit cell or space group.")
    return cell, spacegroup


def _limits(edges):
    return [(1 / np.sqrt(edges[i]) if edges[i] > 0 else np.inf, 1 / np.sqrt(edges[i + 1])) for i in range(len(edges) - 1)]


def _fmt_d(d):
    return "inf" if not np.isfinite(d) else f"{d:.2f}"
