"""Resolution shells, correlation coefficients and the pairing of half-dataset merges.

The one implementation of these in skmerge: the statistics table and the half-dataset
CCs (:mod:`skmerge.stats`), the scorers (:mod:`skmerge.metrics`), the Wilson curve that
starts a fit (:mod:`skmerge.model.initialisation`) and the benchmarks all use it, so the
same reflections give the same shells and the same correlations everywhere.

Shells are bounded in s = 1/d². :func:`make_shells` makes them from the reflections it is
given (equal counts), from the reflections that could be measured (equal volume) or from
limits in Å; :meth:`ResolutionShells.assign` puts reflections into them.
"""

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .errors import InputError

BINNINGS = ("equal-count", "equal-volume")
METHODS = ("pearson", "spearman")


# ------------------------------------------------------------------------- shells
@dataclass(frozen=True)
class ResolutionShells:
    """Resolution shells bounded in s = 1/d².

    Attributes
    ----------
    edges : ndarray of shape (n + 1,)
        Shell boundaries in 1/d² (Å⁻²), ascending: shell i holds
        ``edges[i] <= s < edges[i + 1]``; the last shell also holds its upper edge.
    bounded : bool
        True when the edges are limits the user gave: reflections outside them belong to
        no shell. False when they were computed from reflections: values beyond the
        outer edges count in the outer shells.
    """

    edges: np.ndarray
    bounded: bool = False

    @property
    def n(self):
        """Number of shells."""
        return len(self.edges) - 1

    @property
    def d_max(self):
        """Low-resolution limit of every shell in Å (inf for s = 0)."""
        return _d(self.edges[:-1])

    @property
    def d_min(self):
        """High-resolution limit of every shell in Å."""
        return _d(self.edges[1:])

    def assign(self, dhkl):
        """Shell of each resolution ``dhkl`` (Å): 0 for the lowest-resolution shell, −1
        for none (only outside user-given limits).

        Examples
        --------
        >>> from skmerge.shells import make_shells
        >>> shells = make_shells([8.0, 4.0, 3.0, 2.0], [8.0, 3.0, 2.0])
        >>> shells.assign([8.0, 5.0, 3.0, 2.5, 2.0, 1.5]).tolist()
        [0, 0, 1, 1, 1, -1]
        """
        s = _inverse_square(dhkl)
        shell = np.searchsorted(self.edges, s, side="right") - 1
        if not self.bounded:
            return np.clip(shell, 0, self.n - 1)
        # A reflection on an outer limit (up to rounding of the limit in Å) is inside.
        low, high = self.edges[0] * (1 - 1e-9), self.edges[-1] * (1 + 1e-9)
        shell = np.clip(shell, 0, self.n - 1)
        return np.where((s < low) | (s > high), -1, shell)


def make_shells(dhkl, shells=10, *, binning="equal-count", possible_dhkl=None):
    """Resolution shells over reflections at resolutions ``dhkl``.

    Parameters
    ----------
    dhkl : array-like of shape (n_reflections,)
        Resolution (Å) of the reflections the shells are made for, one value per
        reflection (not per observation). The shells span their range.
    shells : int or sequence of float, default=10
        A number of shells, or the shell limits in Å from low to high resolution (then
        ``dhkl`` and ``binning`` are not used, and reflections outside belong to no
        shell).
    binning : {"equal-count", "equal-volume"}, default="equal-count"
        "equal-count": every shell holds the same number of the reflections ``dhkl``
        (quantiles of 1/d²). "equal-volume": every shell holds the same number of the
        reflections that could be measured, ``possible_dhkl`` (about equal volumes of
        reciprocal space).
    possible_dhkl : array-like, optional
        Resolutions of every reflection of the reciprocal asymmetric unit in the range of
        ``dhkl``; needed for "equal-volume".

    Returns
    -------
    ResolutionShells

    Examples
    --------
    >>> import numpy as np
    >>> from skmerge.shells import make_shells
    >>> d = 1 / np.sqrt(np.linspace(0.01, 0.25, 9))  # 10 Å to 2 Å
    >>> shells = make_shells(d, 4)
    >>> np.round(shells.d_min, 2).tolist()
    [3.78, 2.77, 2.29, 2.0]
    >>> np.bincount(shells.assign(d)).tolist()
    [2, 2, 2, 3]
    """
    if np.ndim(shells) == 0:
        n = int(shells)
        if n < 1 or n != shells:
            raise InputError(f"shells={shells!r}: give a positive whole number of shells or their limits in Å.")
        if binning not in BINNINGS:
            raise InputError(f"binning={binning!r}: use one of {', '.join(BINNINGS)}.")
        s = _inverse_square(dhkl)
        if not len(s):
            raise InputError("no reflection to make resolution shells from.")
        population = s
        if binning == "equal-volume":
            if possible_dhkl is None:
                raise InputError("equal-volume shells need the resolutions of the possible reflections.")
            possible = _inverse_square(possible_dhkl)
            population = possible if len(possible) else s
        edges = np.quantile(population, np.linspace(0, 1, n + 1))
        edges[0], edges[-1] = s.min(), s.max()
        return ResolutionShells(np.maximum.accumulate(edges), bounded=False)
    limits = np.asarray(shells, dtype=np.float64)
    if limits.ndim != 1 or len(limits) < 2 or not (limits > 0).all() or (np.diff(limits) >= 0).any():
        raise InputError(f"shells={list(shells)!r}: give at least two resolution limits in Å, decreasing.")
    return ResolutionShells(1 / limits**2, bounded=True)


def _inverse_square(dhkl):
    return 1 / np.asarray(dhkl, dtype=np.float64).ravel() ** 2


def _d(s):
    with np.errstate(divide="ignore"):
        return 1 / np.sqrt(np.asarray(s, dtype=np.float64))


# ---------------------------------------------------------------- correlations
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
        NaN for fewer than three pairs of non-zero weight or when either variable is
        constant.

    Examples
    --------
    >>> from skmerge.shells import weighted_pearson
    >>> round(weighted_pearson([1, 2, 3, 4], [1, 2, 3, 5]), 4)
    0.9827
    >>> round(weighted_pearson([1, 2, 3, 4], [1, 2, 3, 5], weights=[1, 1, 1, 0]), 4)
    1.0
    """
    a, b, w = _finite_pairs(a, b, weights)
    if np.count_nonzero(w) < 3:
        return float("nan")
    w = w / w.sum()
    da = a - np.dot(w, a)
    db = b - np.dot(w, b)
    var_a, var_b = np.dot(w, da * da), np.dot(w, db * db)
    if not (var_a > 0 and var_b > 0):
        return float("nan")
    return float(np.dot(w, da * db) / np.sqrt(var_a * var_b))


def spearman(a, b):
    """Spearman's rank correlation of ``a`` and ``b``: the Pearson correlation of their
    ranks, tied values sharing their mean rank. Pairs with a non-finite value are left
    out; NaN for fewer than three pairs or a constant variable.

    Examples
    --------
    >>> from skmerge.shells import spearman
    >>> spearman([1, 2, 3, 4], [1, 4, 9, 100])
    1.0
    >>> spearman([1, 2, 3, 4], [4, 3, 2, float("nan")])
    -1.0
    """
    a, b, _ = _finite_pairs(a, b, None)
    if len(a) < 3:
        return float("nan")
    return weighted_pearson(_ranks(a), _ranks(b))


def correlation(a, b, method="pearson", weights=None):
    """The correlation of ``a`` and ``b`` by ``method``: :func:`weighted_pearson`
    ("pearson", with ``weights``) or :func:`spearman` (which takes no weights).

    Examples
    --------
    >>> from skmerge.shells import correlation
    >>> correlation([1, 2, 3, 4], [1, 4, 9, 100], "spearman")
    1.0
    """
    check_method(method)
    if method == "spearman":
        if weights is not None:
            raise InputError("Spearman's correlation takes no weights.")
        return spearman(a, b)
    return weighted_pearson(a, b, weights)


def check_method(method):
    """Raise :class:`~skmerge.errors.InputError` unless ``method`` is in :data:`METHODS`."""
    if method not in METHODS:
        raise InputError(f"method={method!r}: use 'pearson' or 'spearman'.")


def _finite_pairs(a, b, weights):
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    w = np.ones_like(a) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    if not (len(a) == len(b) == len(w)):
        raise InputError(f"correlation of arrays of lengths {len(a)}, {len(b)} and {len(w)}.")
    if (w < 0).any() or not np.isfinite(w).all():
        raise InputError("correlation weights must be finite and non-negative.")
    finite = np.isfinite(a) & np.isfinite(b)
    return a[finite], b[finite], w[finite]


def _ranks(values):
    return pd.Series(values).rank(method="average").to_numpy()


# ------------------------------------------------------------ half-dataset merges
@dataclass
class HalfCorrelations:
    """Correlations between the two halves of every half-dataset repeat.

    Attributes
    ----------
    values : ndarray of shape (n_repeats, n_shells + 1)
        Correlation per repeat and shell; the last column pools every shell.
    counts : ndarray of shape (n_repeats, n_shells + 1)
        Reflections paired (finite in both halves) per repeat and shell.
    repeats : list of int
        The repeat numbers of the rows, ascending (repeats without any pair are left
        out).
    """

    values: np.ndarray
    counts: np.ndarray
    repeats: list

    def mean(self):
        """Correlation per shell (and pooled) averaged over the repeats that give one
        (NaN where none does)."""
        finite = np.isfinite(self.values)
        total = np.where(finite, self.values, 0).sum(axis=0)
        n = finite.sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(n > 0, total / np.maximum(n, 1), np.nan)


def half_table_keys(halves):
    """Columns that identify a reflection in a half-dataset table: H, K, L and, for data
    sets merged separately, ``file_id``."""
    return ["H", "K", "L"] + (["file_id"] if "file_id" in halves.columns else [])


def measured_reflections(halves):
    """Resolutions (Å) of the distinct reflections of a half-dataset table that are
    measured in at least one half: N > 0 (every row when there is no N column).

    For the half-dataset merges of one data set these are the reflections measured in
    the whole data set (each repeat splits all images between its two halves), so
    shells made from them are the shells of the merged table.

    Examples
    --------
    >>> import gemmi
    >>> import reciprocalspaceship as rs
    >>> from skmerge.shells import measured_reflections
    >>> halves = rs.DataSet({"H": [1, 1, 2], "K": [0, 0, 0], "L": [0, 0, 0], "N": [2, 1, 0],
    ...                      "repeat": [0, 0, 0], "half": [0, 1, 1]},
    ...                     cell=gemmi.UnitCell(10, 10, 10, 90, 90, 90)).set_index(["H", "K", "L"])
    >>> measured_reflections(halves).tolist()
    [10.0]
    """
    _check_halves(halves, None)
    data = halves.reset_index()
    keys = half_table_keys(halves)
    if "N" in data.columns:
        data = data[data["N"].to_numpy(np.float64, na_value=0) > 0]
    distinct = data[keys].drop_duplicates()
    return halves.cell.calculate_d_array(distinct[["H", "K", "L"]].to_numpy(np.int32))


def paired_halves(halves, column):
    """The two halves of every repeat side by side.

    Reflections are paired by H, K, L (and ``file_id``, for data sets merged
    separately). A value counts where it is finite and, when the table has an N column,
    N > 0.

    Parameters
    ----------
    halves : rs.DataSet
        Half-dataset merges (:func:`skmerge.half_datasets.half_dataset_merges`, or an
        ``_xval_`` MTZ file) with integer ``repeat`` and ``half`` (0, 1) columns and a
        unit cell.
    column : str
        The column to pair.

    Yields
    ------
    repeat : int
    pairs : pandas.DataFrame
        Columns H, K, L [, file_id], ``a`` and ``b`` (the value in half 0 and half 1) and
        dHKL, one row per reflection with a value in both halves.

    Examples
    --------
    >>> import gemmi
    >>> import reciprocalspaceship as rs
    >>> from skmerge.shells import paired_halves
    >>> halves = rs.DataSet({"H": [1, 1, 2], "K": [0, 0, 0], "L": [0, 0, 0], "I": [5.0, 6.0, 1.0],
    ...                      "repeat": [0, 0, 0], "half": [0, 1, 1]},
    ...                     cell=gemmi.UnitCell(10, 10, 10, 90, 90, 90)).set_index(["H", "K", "L"])
    >>> repeat, pairs = next(paired_halves(halves, "I"))
    >>> pairs[["a", "b", "dHKL"]].values.tolist()
    [[5.0, 6.0, 10.0]]
    """
    _check_halves(halves, column)
    data = halves.reset_index()
    keys = half_table_keys(halves)
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
        pairs = a.merge(b, on=keys, how="inner")
        if pairs.empty:
            continue
        pairs["dHKL"] = halves.cell.calculate_d_array(pairs[["H", "K", "L"]].to_numpy(np.int32))
        yield int(repeat), pairs


def half_correlations(halves, column, shells, method="pearson"):
    """Correlation of ``column`` between the two halves of every repeat, per shell.

    Parameters
    ----------
    halves : rs.DataSet
        Half-dataset merges, as :func:`paired_halves` takes them.
    column : str
        Merged column to correlate (I, F, DANO …).
    shells : ResolutionShells
        Shells the pairs are assigned to by their resolution.
    method : {"pearson", "spearman"}, default="pearson"

    Returns
    -------
    HalfCorrelations

    Examples
    --------
    >>> import gemmi
    >>> import numpy as np
    >>> import reciprocalspaceship as rs
    >>> from skmerge.shells import half_correlations, make_shells
    >>> h = np.arange(1, 7)
    >>> halves = rs.DataSet({"H": np.tile(h, 2), "K": 0, "L": 0,
    ...                      "I": [6.0, 5, 4, 3, 2, 1, 6.5, 4.5, 4, 3, 1, 2],
    ...                      "repeat": 0, "half": np.repeat([0, 1], 6)},
    ...                     cell=gemmi.UnitCell(20, 20, 20, 90, 90, 90)).set_index(["H", "K", "L"])
    >>> result = half_correlations(halves, "I", make_shells(20 / h, 2))
    >>> np.round(result.values, 3).tolist(), result.counts.tolist()
    ([[0.945, 0.5, 0.932]], [[3, 3, 6]])
    """
    check_method(method)
    values, counts, repeats = [], [], []
    for repeat, pairs in paired_halves(halves, column):
        shell = shells.assign(pairs["dHKL"].to_numpy())
        a, b = pairs["a"].to_numpy(), pairs["b"].to_numpy()
        rows = [shell == i for i in range(shells.n)] + [shell >= 0]
        values.append([correlation(a[r], b[r], method) for r in rows])
        counts.append([int(r.sum()) for r in rows])
        repeats.append(repeat)
    shape = (len(repeats), shells.n + 1)
    return HalfCorrelations(np.array(values, dtype=np.float64).reshape(shape),
                            np.array(counts, dtype=np.int64).reshape(shape), repeats)


def _check_halves(halves, column):
    for needed in ("repeat", "half") + ((column,) if column else ()):
        if needed not in halves.columns:
            raise InputError(
                f"the half-dataset table has no column {needed!r}; give the output of "
                "half_dataset_merges (or an _xval_ MTZ file)."
            )
    if getattr(halves, "cell", None) is None:
        raise InputError("the half-dataset table has no unit cell.")
