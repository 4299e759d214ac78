"""Merging statistics: half-dataset merges, CC1/2 and CCanom by resolution shell."""

import copy

import numpy as np
import pandas as pd
from sklearn.utils import check_random_state

from .errors import InputError


def half_dataset_merges(merger, X, *, n_repeats=1, random_state=None):
    """Merge random halves of the images with the fitted scale model frozen.

    For each repeat the images are split at random into two halves; each half is merged
    by refitting only the posteriors of a copy of ``merger`` on that half's observations
    (the posterior started afresh from the half's own data, so the halves stay
    independent), with the scale model fixed at its full-data fit.

    Parameters
    ----------
    merger : VariationalMerger
        A fitted merger.
    X : rs.DataSet
        The observation table it was fitted on.
    n_repeats : int, default=1
    random_state : int, RandomState instance or None
        Makes the splits repeatable.

    Returns
    -------
    rs.DataSet
        The merged tables of every half, stacked, with integer columns ``repeat`` and
        ``half`` (0 or 1), indexed by H, K, L.

    Examples
    --------
    >>> halves = half_dataset_merges(merger, X, n_repeats=2)  # doctest: +SKIP
    >>> cc_half(halves)  # doctest: +SKIP
    """
    rng = check_random_state(random_state)
    images = np.unique(X["image_id"].to_numpy())
    if len(images) < 2:
        raise InputError("half-dataset merging needs at least two images.")
    image_id = X["image_id"].to_numpy()
    tables = []
    for repeat in range(n_repeats):
        first = rng.permutation(images)[: len(images) // 2]
        in_first = np.isin(image_id, first)
        for half, rows in enumerate((in_first, ~in_first)):
            half_merger = copy.deepcopy(merger)
            half_merger.set_params(warm_start="scales", freeze="scales", early_stopping=False, verbose=0,
                                   random_state=rng.randint(2**31 - 1))
            X_half = X.iloc[np.flatnonzero(rows)]
            merged = half_merger.fit(X_half).transform(X_half)
            merged["repeat"] = np.int32(repeat)
            merged["half"] = np.int32(half)
            tables.append(merged)
    out = pd.concat(tables).astype({"repeat": "MTZInt", "half": "MTZInt"})
    out.spacegroup, out.cell, out.merged = tables[0].spacegroup, tables[0].cell, True
    return out


def resolution_shells(dhkl, n_bins=10):
    """Shell number of each resolution in equal-count shells of 1/d² (0 = lowest
    resolution) and the (d_max, d_min) of every shell."""
    s = 1 / np.asarray(dhkl, dtype=np.float64) ** 2
    edges = np.quantile(s, np.linspace(0, 1, n_bins + 1))
    shell = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, n_bins - 1)
    limits = [(1 / np.sqrt(edges[i]) if edges[i] > 0 else np.inf, 1 / np.sqrt(edges[i + 1])) for i in range(n_bins)]
    return shell, limits


def cc_half(halves, *, column="I", n_bins=10, method="pearson"):
    """CC1/2 per resolution shell (and overall) from :func:`half_dataset_merges`.

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
    if column not in halves.columns:
        raise InputError(f"the half-dataset table has no column {column!r}.")
    rows = []
    for repeat, table in halves.groupby("repeat"):
        a = table[table["half"] == 0][column].astype(float)
        b = table[table["half"] == 1][column].astype(float)
        paired = pd.concat([a.rename("a"), b.rename("b")], axis=1, join="inner").dropna()
        if paired.empty:
            continue
        d = _dhkl(paired.index, halves)
        shell, limits = resolution_shells(d, n_bins)
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


def _correlation(a, b, method):
    if len(a) < 3:
        return np.nan
    return float(pd.Series(np.asarray(a)).corr(pd.Series(np.asarray(b)), method=method))


def _dhkl(index, table):
    hkl = index.to_frame().to_numpy(np.int32)
    return table.cell.calculate_d_array(hkl)
