"""Analysis of a finished merge, and conversion of reflection files to unmerged MTZ.

The functions behind ``skmerge ccpred``, ``isigi``, ``rsplit``, ``completeness``,
``bfactor``, ``apply-bfactor``, ``filter-images``, ``plot-history``, ``xds2mtz`` and
``stream2mtz`` (:mod:`skmerge.analysis_cli`): the analyses careless's scripts of the same
names do, on the files of a run of skmerge or of careless (the same layout):

=============================  =========================================================
``OUT_<i>.mtz``                merged data set i
``OUT_predictions_<i>.mtz``    per observation: Iobs, SIGIobs, Ipred, SIGIpred, image,
                               test (careless: SigIobs, SigIpred)
``OUT_xval_<i>.mtz``           half-dataset merges with ``repeat`` and ``half`` columns
``OUT_history.csv``            the loss terms per step
=============================  =========================================================

Every function takes tables (``rs.DataSet``) and returns tables, without TensorFlow;
resolution shells and correlations are those of :mod:`skmerge.shells`, so the numbers
agree with ``skmerge stats``.
"""

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .calibration import robust_sd
from .errors import InputError
from .io.writers import prediction_flags
from .shells import correlation, make_shells, measured_reflections, paired_halves
from .stats import _per_shell, merging_statistics, standardise_columns
from .symmetry import reflection_flags

__all__ = [
    "CCpredReport",
    "WilsonFit",
    "apply_bfactor",
    "ccpred_report",
    "completeness_table",
    "convert_to_mtz",
    "filter_images",
    "format_table",
    "image_numbers",
    "isigi_table",
    "read_history",
    "read_run_table",
    "rsplit_table",
    "run_files",
    "unmerged_mtz",
    "wilson_b",
]

# The files of a run, by kind: OUT + the suffix, i the data set.
RUN_FILES = {"merged": "_{i}.mtz", "predictions": "_predictions_{i}.mtz", "xval": "_xval_{i}.mtz"}
WILSON_D_MAX = 4.5
"""Resolution (Å) beyond which a Wilson plot is straight: :func:`wilson_b` fits there."""
BAD_IMAGE_LIMIT = 4.0
"""An image is bad when its CCpred falls short of its noise ceiling by this many robust SDs
(over the images) more than the median image's does, ..."""
BAD_IMAGE_MARGIN = 0.1
"""... and by at least this much more: among images of similar quality the robust SD is
tiny."""


# ------------------------------------------------------------------------ the files
def run_files(out, kind="merged"):
    """The files of one kind of a run, in data-set order.

    Parameters
    ----------
    out : str or Path
        A run's output prefix (or the directory holding one run, see
        :func:`skmerge.workflow.resolve_output_prefix`), or one MTZ file of that kind.
    kind : {"merged", "predictions", "xval"}, default="merged"

    Returns
    -------
    list of Path

    Raises
    ------
    InputError
        When the run has no file of that kind.

    Examples
    --------
    >>> import pathlib, tempfile
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> for name in ("hypf_0.mtz", "hypf_1.mtz", "hypf_xval_0.mtz"):
    ...     _ = (folder / name).write_bytes(b"")
    >>> [p.name for p in run_files(folder / "hypf")]
    ['hypf_0.mtz', 'hypf_1.mtz']
    >>> [p.name for p in run_files(f"{folder}/", "xval")]
    ['hypf_xval_0.mtz']
    """
    from .workflow import _run_indices, resolve_output_prefix

    if kind not in RUN_FILES:
        raise InputError(f"kind={kind!r}: use one of {', '.join(RUN_FILES)}.")
    if Path(out).is_file():
        return [Path(out)]
    prefix = resolve_output_prefix(out)
    indices = _run_indices(prefix, RUN_FILES[kind])
    if not indices:
        raise InputError(f"no {kind} file {prefix}{RUN_FILES[kind].format(i=0)}: give the OUT prefix of a run "
                         "(skmerge's or careless's) or the file itself")
    return [Path(f"{prefix}{RUN_FILES[kind].format(i=i)}") for i in indices]


def read_run_table(path, kind="merged"):
    """One MTZ file of a run: merged (``"merged"``, ``"xval"``) or per observation
    (``"predictions"``), with careless's ``Sig`` names as skmerge's ``SIG``
    (:func:`skmerge.stats.standardise_columns`).

    Raises
    ------
    InputError
        When the file is missing or not readable MTZ, or holds observations (M/ISYM)
        where merged data belong; the message names the file.

    Examples
    --------
    >>> predictions = read_run_table("out/hypf_predictions_0.mtz", "predictions")  # doctest: +SKIP
    >>> ccpred_report(predictions).bad_images  # doctest: +SKIP
    [73, 74]
    """
    from .workflow import _read_mtz

    # careless writes its predictions without M/ISYM, as if merged: only the columns
    # tell a predictions file (see ccpred_report).
    table = _read_mtz(path, merged=kind != "predictions")
    if table is None:
        raise InputError(f"{path}: no such file")
    return standardise_columns(table, str(path))[0]


# -------------------------------------------------------------------------- CCpred
@dataclass
class CCpredReport:
    """CCpred per resolution shell and per image (:func:`ccpred_report`).

    Attributes
    ----------
    shells : pandas.DataFrame
        One row per shell (1 … n), then ``overall``: d_max, d_min, n_train, cc_train and,
        with held-out observations, n_test, cc_test.
    images : pandas.DataFrame
        One row per image, indexed by the predictions' image column (``image_id``, the
        run's 0-based image numbering): n_obs, ccpred (all its observations), ceiling
        (the CCpred its observations' noise allows), bad and, with held-out observations,
        n_test, cc_test.
    rule : str
        What made an image bad, in words.
    """

    shells: pd.DataFrame
    images: pd.DataFrame
    rule: str

    @property
    def bad_images(self):
        """The bad images' numbers, worst first."""
        return self.images[self.images["bad"]].sort_values("ccpred").index.tolist()

    def to_string(self, title=None):
        """The per-shell table, the worst images and the bad ones named."""
        lines = [title] if title else []
        lines.append(format_table(self.shells, title="CCpred per resolution shell (1/SIGIobs²-weighted Pearson "
                                  "unless --method spearman): training and held-out (test) observations"))
        worst = self.images.sort_values("ccpred").head(10)
        lines.append("")
        lines.append(format_table(worst, title=f"the {len(worst)} images of lowest CCpred of {len(self.images)}"))
        bad = self.bad_images
        lines.append(f"\n{len(bad)} bad image(s) ({self.rule})" + (
            ": " + " ".join(str(i) for i in bad) if bad else ""))
        return "\n".join(lines)


def ccpred_report(predictions, *, shells=10, method="pearson", below=None):
    """CCpred, the correlation of observed and predicted intensities, per resolution
    shell and per image.

    Parameters
    ----------
    predictions : rs.DataSet
        A predictions file (:func:`read_run_table`): Iobs, SIGIobs, Ipred, the image
        (``image_id``, else the first Batch column), ``test`` (optional; 1 for
        held-out observations) and an H, K, L index with the cell.
    shells : int or sequence of float, default=10
        Equal-count shells over the observed reflections, or limits in Å.
    method : {"pearson", "spearman"}, default="pearson"
        Pearson weights every observation by 1/SIGIobs² (as ``skmerge stats`` does).
    below : float, optional
        Images with a CCpred below this are bad. Default: an image is bad when its CCpred
        falls short of its noise ceiling by :data:`BAD_IMAGE_LIMIT` robust SDs, and at
        least :data:`BAD_IMAGE_MARGIN`, more than the median image's does. The ceiling is
        the CCpred the image would have if its observations missed the predictions by
        their noise alone (SIGIobs times the robust SD of every observation's
        (Iobs − Ipred)/SIGIobs): a still with few strong spots has a low CCpred without
        being wrong, and is not named for it.

    Returns
    -------
    CCpredReport

    Examples
    --------
    >>> import gemmi
    >>> import numpy as np
    >>> import reciprocalspaceship as rs
    >>> rng = np.random.default_rng(0)
    >>> n = 3000
    >>> ipred = rng.exponential(100, n)
    >>> image = np.arange(n) // 100
    >>> iobs = ipred + rng.normal(0, 10, n)
    >>> iobs[image == 7] = rng.exponential(100, 100)  # image 7 is unrelated to the model
    >>> predictions = rs.DataSet({"H": rng.integers(1, 20, n), "K": rng.integers(0, 20, n), "L": 0,
    ...                           "Iobs": iobs, "SIGIobs": 10.0, "Ipred": ipred, "image_id": image},
    ...                          cell=gemmi.UnitCell(60, 60, 60, 90, 90, 90)).set_index(["H", "K", "L"])
    >>> report = ccpred_report(predictions, shells=3)
    >>> report.bad_images
    [7]
    >>> report.shells.index.tolist(), bool(report.shells.loc["overall", "cc_train"] > 0.8)
    ([1, 2, 3, 'overall'], True)
    """
    frame = _prediction_frame(predictions)
    bins = make_shells(np.unique(frame["dHKL"]), shells)
    shell = bins.assign(frame["dHKL"].to_numpy())
    test = frame["test"].to_numpy()
    table = _shell_frame(bins)
    groups = [shell == i for i in range(bins.n)] + [shell >= 0]
    for part, rows in (("train", ~test), ("test", test)):
        if part == "test" and not test.any():
            continue
        table[f"n_{part}"] = [int((g & rows).sum()) for g in groups]
        table[f"cc_{part}"] = [_ccpred(frame[g & rows], method) for g in groups]

    groups = dict(tuple(frame.groupby("image", sort=True)))
    per_image = pd.DataFrame({"n_obs": [len(g) for g in groups.values()],
                              "ccpred": [_ccpred(g, method) for g in groups.values()]},
                             index=pd.Index(list(groups), name=frame.attrs["image_column"]))
    if test.any():
        per_image["n_test"] = [int(g["test"].sum()) for g in groups.values()]
        per_image["cc_test"] = [_ccpred(g[g["test"]], method) for g in groups.values()]
    spread = robust_sd((frame["Iobs"] - frame["Ipred"]).to_numpy() / frame["SIGIobs"].to_numpy())
    per_image["ceiling"] = [_ccpred_ceiling(g, spread, method) for g in groups.values()]
    if below is None:
        shortfall = (per_image["ceiling"] - per_image["ccpred"]).to_numpy()
        known = shortfall[np.isfinite(shortfall)]
        median = np.median(known) if len(known) else np.nan
        limit = max(median + BAD_IMAGE_LIMIT * robust_sd(known), median + BAD_IMAGE_MARGIN)
        per_image["bad"] = shortfall > limit
        rule = f"CCpred more than {limit:.3f} below its noise ceiling"
    else:
        per_image["bad"] = per_image["ccpred"].to_numpy() < below
        rule = f"CCpred < {below:.3f}"
    return CCpredReport(table, per_image, rule)


def _shell_frame(bins):
    """The d_max, d_min columns of a per-shell table: shells 1 … n, then overall."""
    return pd.DataFrame({"d_max": [*bins.d_max, bins.d_max[0]], "d_min": [*bins.d_min, bins.d_min[-1]]},
                        index=pd.Index([*range(1, bins.n + 1), "overall"], name="shell"))


def _prediction_frame(predictions):
    """Iobs, SIGIobs, Ipred, image, test and dHKL of a predictions table's rows outside
    a detector shadow (those neither fitted nor tested)."""
    missing = [c for c in ("Iobs", "SIGIobs", "Ipred") if c not in predictions.columns]
    if missing:
        raise InputError(f"the predictions table has no column {', '.join(missing)}; give a predictions file "
                         f"(OUT_predictions_<i>.mtz). Its columns: {', '.join(map(str, predictions.columns))}")
    image = _image_column(predictions, None, "predictions table")
    cell = getattr(predictions, "cell", None)
    if cell is None:
        raise InputError("the predictions table has no unit cell")
    test, shadowed = prediction_flags(predictions)
    if shadowed.any():
        predictions, test = predictions[~shadowed], test[~shadowed]
    hkl = predictions.reset_index()[["H", "K", "L"]].to_numpy(np.int32)
    frame = pd.DataFrame({
        "Iobs": predictions["Iobs"].to_numpy(np.float64), "SIGIobs": predictions["SIGIobs"].to_numpy(np.float64),
        "Ipred": predictions["Ipred"].to_numpy(np.float64), "image": predictions[image].to_numpy(np.int64),
        "test": test, "dHKL": cell.calculate_d_array(hkl)})
    frame.attrs["image_column"] = image
    return frame


def _ccpred(frame, method):
    """CCpred of some observations: 1/SIGIobs²-weighted Pearson, or Spearman."""
    return correlation(frame["Iobs"].to_numpy(), frame["Ipred"].to_numpy(), method, _ccpred_weights(frame, method))


def _ccpred_weights(frame, method):
    """CCpred's weight of every observation: 1/SIGIobs² for Pearson, None (equal) else."""
    return frame["SIGIobs"].to_numpy() ** -2.0 if method == "pearson" else None


def _ccpred_ceiling(frame, spread, method):
    """The CCpred of observations that would miss their predictions by noise alone, of SD
    ``spread``·SIGIobs: √(V / (V + N)), V the variance of Ipred and N the mean noise
    variance, both with CCpred's weights (Pearson's formula; for Spearman an
    approximation)."""
    sigma = frame["SIGIobs"].to_numpy()
    weights = _ccpred_weights(frame, method)
    weights = np.ones(len(frame)) if weights is None else weights
    ipred = frame["Ipred"].to_numpy()
    total = weights.sum()
    variance = np.sum(weights * (ipred - np.sum(weights * ipred) / total) ** 2) / total
    noise = spread**2 * np.sum(weights * sigma**2) / total
    return math.sqrt(variance / (variance + noise)) if variance + noise > 0 else np.nan


def _image_column(table, image_key, what):
    """The image column: ``image_key``, else (in a predictions table) image_id, else
    the first Batch column, else BATCH or (in an unmerged file) image_id."""
    if image_key is not None:
        if image_key not in table.columns:
            raise InputError(f"the {what} has no image column {image_key!r}; columns: "
                             f"{', '.join(map(str, table.columns))}")
        return image_key
    batch = [c for c, dtype in table.dtypes.items() if getattr(dtype, "name", "") == "Batch"]
    ids = ["image_id"]
    candidates = ids + batch + ["BATCH"] if what.startswith("predictions") else batch + ["BATCH"] + ids
    found = [c for c in candidates if c in table.columns]
    if not found:
        raise InputError(f"the {what} has no image column (image_id, BATCH or one of MTZ type B); columns: "
                         f"{', '.join(map(str, table.columns))}")
    return found[0]


# ------------------------------------------------------------------ merged tables
def _measured(merged):
    """The merged table with skmerge's names, its measured reflections only, and their
    resolutions."""
    merged, _ = standardise_columns(merged, "merged")
    if getattr(merged, "cell", None) is None:
        raise InputError("the merged table has no unit cell")
    for needed in ("I", "SIGI"):
        if needed not in merged.columns:
            raise InputError(f"the merged table has no {needed} column; columns: {', '.join(merged.columns)}")
    measured = np.isfinite(merged["I"].to_numpy(np.float64, na_value=np.nan))
    if "N" in merged.columns:
        measured &= merged["N"].to_numpy(np.float64, na_value=0) > 0
    if not measured.any():
        raise InputError("the merged table has no measured reflection")
    merged = merged[measured]
    return merged, merged.cell.calculate_d_array(merged.reset_index()[["H", "K", "L"]].to_numpy(np.int32))


def isigi_table(merged, *, shells=10):
    """I/σ(I) of merged intensities per resolution shell.

    Columns: n (measured reflections), mean_isigi (the mean of I/σ(I)), isigi_of_means
    (⟨I⟩/⟨σ(I)⟩) and, for anomalous data (DANO and SIGDANO, or F(±)), n_anom and
    mean_danosig (the mean of ``|DANO|/σ(DANO)`` over the acentric reflections with both
    mates).

    Examples
    --------
    >>> import gemmi
    >>> import numpy as np
    >>> import reciprocalspaceship as rs
    >>> hkl = np.array([[h, 0, 0] for h in range(1, 9)])
    >>> merged = rs.DataSet({"H": hkl[:, 0], "K": 0, "L": 0, "I": 10.0 * np.arange(8, 0, -1), "SIGI": 2.0},
    ...                     cell=gemmi.UnitCell(20, 20, 20, 90, 90, 90), merged=True).set_index(["H", "K", "L"])
    >>> isigi_table(merged, shells=2)["mean_isigi"].tolist()  # I/σ = 40, 35, … 5
    [32.5, 12.5, 22.5]
    """
    merged, d = _measured(merged)
    bins = make_shells(d, shells)
    shell, n = bins.assign(d), bins.n
    intensity, sigma = merged["I"].to_numpy(np.float64), merged["SIGI"].to_numpy(np.float64)
    table = _shell_frame(bins)
    table["n"] = _per_shell(shell, n, np.ones(len(d)), np.sum).astype(int)
    table["mean_isigi"] = _per_shell(shell, n, intensity / sigma, np.mean)
    table["isigi_of_means"] = _per_shell(shell, n, intensity, np.mean) / _per_shell(shell, n, sigma, np.mean)
    if "DANO" in merged.columns and "SIGDANO" in merged.columns:
        dano = np.abs(merged["DANO"].to_numpy(np.float64, na_value=np.nan))
        ratio = dano / merged["SIGDANO"].to_numpy(np.float64, na_value=np.nan)
        both = np.isfinite(ratio)
        anomalous_shell = np.where(both, shell, -1)
        table["n_anom"] = _per_shell(anomalous_shell, n, np.ones(len(d)), np.sum).astype(int)
        table["mean_danosig"] = _per_shell(anomalous_shell, n, np.where(both, ratio, 0.0), np.mean)
    return table


def completeness_table(merged, *, shells=10, binning="equal-count"):
    """Completeness (and anomalous completeness) of a merged data set per resolution
    shell: the columns of :func:`skmerge.merging_statistics` that need no half-dataset
    merges (n_obs, n_unique, multiplicity, completeness, [anom_completeness]), as
    fractions.

    Examples
    --------
    >>> import gemmi
    >>> import reciprocalspaceship as rs
    >>> cell, sg = gemmi.UnitCell(30, 30, 30, 90, 90, 90), gemmi.SpaceGroup("P 1")
    >>> hkl = rs.utils.generate_reciprocal_asu(cell, sg, 5.0)[::2]  # every other reflection
    >>> merged = rs.DataSet({"H": hkl[:, 0], "K": hkl[:, 1], "L": hkl[:, 2], "I": 1.0, "SIGI": 1.0, "N": 1},
    ...                     cell=cell, spacegroup=sg, merged=True).set_index(["H", "K", "L"])
    >>> round(float(completeness_table(merged, shells=2).loc["overall", "completeness"]), 1)
    0.5
    """
    table = merging_statistics(merged, shells=shells, binning=binning).table
    keep = ["d_max", "d_min", "n_obs", "n_unique", "multiplicity", "completeness", "anom_completeness"]
    return table[[c for c in keep if c in table.columns]]


def rsplit_table(halves, *, shells=10, column="I"):
    """Rsplit per resolution shell from half-dataset merges:

        Rsplit = (1/√2) · Σ|I₁ − I₂| / (½ · Σ(I₁ + I₂)),

    summed over the reflections merged in both halves of every repeat (shells as
    :func:`skmerge.stats.cc_half` makes them). On intensities, as Rsplit is usually
    defined; ``column="F"`` gives it on amplitudes (smaller: up to half, for strong
    data), as careless's ``rsplit`` computes it (which also scales one half to the
    other).

    Parameters
    ----------
    halves : rs.DataSet
        An ``OUT_xval_<i>.mtz`` table: ``repeat``, ``half`` and ``column``.
    shells : int or sequence of float, default=10
    column : str, default="I"

    Returns
    -------
    pandas.DataFrame
        d_max, d_min, n (pairs, summed over repeats) and rsplit per shell and overall.

    Examples
    --------
    >>> import gemmi
    >>> import reciprocalspaceship as rs
    >>> halves = rs.DataSet({"H": [1, 2, 1, 2], "K": 0, "L": 0, "I": [10.0, 20.0, 12.0, 18.0],
    ...                      "repeat": 0, "half": [0, 0, 1, 1]},
    ...                     cell=gemmi.UnitCell(10, 10, 10, 90, 90, 90)).set_index(["H", "K", "L"])
    >>> round(float(rsplit_table(halves, shells=1).loc["overall", "rsplit"]), 4)  # 4/30/√2
    0.0943
    """
    halves, _ = standardise_columns(halves, "half-dataset")
    bins = make_shells(measured_reflections(halves), shells)
    difference, total, count = (np.zeros(bins.n + 1) for _ in range(3))
    for _, pairs in paired_halves(halves, column):
        shell = bins.assign(pairs["dHKL"].to_numpy())
        a, b = pairs["a"].to_numpy(), pairs["b"].to_numpy()
        for i, rows in enumerate([shell == k for k in range(bins.n)] + [shell >= 0]):
            difference[i] += np.abs(a[rows] - b[rows]).sum()
            total[i] += (a[rows] + b[rows]).sum() / 2
            count[i] += rows.sum()
    if not count[-1]:
        raise InputError(f"no reflection has {column} in both halves")
    table = _shell_frame(bins)
    table["n"] = count.astype(int)
    with np.errstate(invalid="ignore", divide="ignore"):
        table["rsplit"] = np.where(total > 0, difference / np.where(total > 0, total, 1) / math.sqrt(2), np.nan)
    return table


# ------------------------------------------------------------------------ B factors
@dataclass
class WilsonFit:
    """A Wilson plot and the straight line fitted to it (:func:`wilson_b`).

    Attributes
    ----------
    b : float
        The Wilson B (Å²): ⟨I/ε⟩ ∝ exp(−B/(2d²)).
    log_scale : float
        ln⟨I/ε⟩ of the line at 1/d² = 0.
    shells : pandas.DataFrame
        Per shell: d_max, d_min, n, inv_d2 (mean 1/d²), mean_intensity (⟨I/ε⟩),
        log_intensity, fitted (the line's ln⟨I/ε⟩) and used (the shells fitted).
    note : str
        What the reader of the fit should know ("" when nothing).
    """

    b: float
    log_scale: float
    shells: pd.DataFrame
    note: str = ""

    def to_string(self):
        """The Wilson plot as a table and the fitted B."""
        used = self.shells[self.shells["used"]]
        text = format_table(self.shells, title="Wilson plot: ln<I/eps> per resolution shell")
        return text + (f"\nWilson B = {self.b:.2f} A^2 (fitted over {len(used)} shells, "
                       f"{used['d_max'].max():.2f}-{used['d_min'].min():.2f} A)") + (
                           f"\nnote: {self.note}" if self.note else "")


def wilson_b(merged, *, shells=20, d_max=WILSON_D_MAX):
    """Fit a Wilson B factor to merged intensities.

    The reflections are put into equal-count shells; in each, ⟨I/ε⟩ (ε the
    reflection's multiplicity factor) and the mean 1/d² are taken, and the line
    ln⟨I/ε⟩ = ln k − (B/2)·(1/d²) is fitted by least squares to the shells beyond
    ``d_max`` whose ⟨I/ε⟩ is positive (to all such shells, with a note, when fewer than
    three lie beyond it).

    Parameters
    ----------
    merged : rs.DataSet
        Merged I (or F, squared) with cell and space group.
    shells : int, default=20
    d_max : float, default=4.5
        Low-resolution limit (Å) of the fit: at lower resolution the plot is not straight.

    Returns
    -------
    WilsonFit

    Examples
    --------
    >>> import gemmi
    >>> import numpy as np
    >>> import reciprocalspaceship as rs
    >>> cell, sg = gemmi.UnitCell(40, 40, 40, 90, 90, 90), gemmi.SpaceGroup("P 1")
    >>> hkl = rs.utils.generate_reciprocal_asu(cell, sg, 2.0)
    >>> d = cell.calculate_d_array(hkl)
    >>> intensity = np.exp(-20.0 / (2 * d**2)) * np.random.default_rng(0).exponential(1000, len(d))
    >>> merged = rs.DataSet({"H": hkl[:, 0], "K": hkl[:, 1], "L": hkl[:, 2], "I": intensity, "SIGI": 1.0},
    ...                     cell=cell, spacegroup=sg, merged=True).set_index(["H", "K", "L"])
    >>> round(wilson_b(merged).b)
    20
    """
    merged, _ = standardise_columns(merged, "merged")
    if getattr(merged, "spacegroup", None) is None or getattr(merged, "cell", None) is None:
        raise InputError("the merged table has no unit cell or space group")
    if "I" in merged.columns:
        intensity = merged["I"].to_numpy(np.float64, na_value=np.nan)
    elif "F" in merged.columns:
        intensity = merged["F"].to_numpy(np.float64, na_value=np.nan) ** 2
    else:
        raise InputError(f"the merged table has neither I nor F; columns: {', '.join(merged.columns)}")
    hkl = merged.reset_index()[["H", "K", "L"]].to_numpy(np.int32)
    measured = np.isfinite(intensity)
    if "N" in merged.columns:
        measured &= merged["N"].to_numpy(np.float64, na_value=0) > 0
    if measured.sum() < 3:
        raise InputError("the merged table has fewer than 3 measured reflections; no Wilson plot")
    hkl, intensity = hkl[measured], intensity[measured]
    _, epsilon = reflection_flags(hkl, merged.spacegroup)
    inv_d2 = 1 / merged.cell.calculate_d_array(hkl) ** 2
    bins = make_shells(inv_d2**-0.5, shells)
    shell = bins.assign(inv_d2**-0.5)
    table = _shell_frame(bins).drop(index="overall")
    table["n"] = [int((shell == i).sum()) for i in range(bins.n)]
    table["inv_d2"] = [inv_d2[shell == i].mean() for i in range(bins.n)]
    table["mean_intensity"] = [(intensity / epsilon)[shell == i].mean() for i in range(bins.n)]
    positive = table["mean_intensity"].to_numpy() > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        table["log_intensity"] = np.where(positive, np.log(np.where(positive, table["mean_intensity"], 1)), np.nan)
    used = positive & (table["inv_d2"].to_numpy() > d_max**-2.0)
    note = ""
    if used.sum() < 3:
        used = positive
        note = f"fewer than 3 shells lie beyond {d_max:g} A, where a Wilson plot is straight: fitted over all"
    if used.sum() < 2:
        raise InputError("fewer than 2 shells have a positive mean intensity; no Wilson B can be fitted")
    slope, intercept = np.polyfit(table["inv_d2"].to_numpy()[used], table["log_intensity"].to_numpy()[used], 1)
    table["fitted"] = intercept + slope * table["inv_d2"]
    table["used"] = used
    return WilsonFit(float(-2 * slope), float(intercept), table, note)


# MTZ types of amplitudes (× exp(−B/(4d²))) and intensities (× exp(−B/(2d²))).
_AMPLITUDE_TYPES = {"SFAmplitude", "FriedelSFAmplitude", "AnomalousDifference", "StddevFriedelSF"}
_INTENSITY_TYPES = {"Intensity", "FriedelIntensity", "StddevFriedelI"}


def apply_bfactor(merged, b):
    """Merged data with a B factor applied: amplitudes (and their σ, DANO) multiplied
    by exp(−B/(4d²)), intensities (and their σ) by exp(−B/(2d²)), so that data of
    Wilson B₀ have Wilson B₀ + B afterwards (a negative B sharpens).

    Columns are told apart by their MTZ type; a σ column (type Q) follows the column
    it is named after (SIGF → F, SigI → I, SIGDANO → DANO). Other columns are left as
    they are.

    Returns
    -------
    table : rs.DataSet
        A copy.
    scaled : list of str
        The columns changed.

    Examples
    --------
    >>> import gemmi
    >>> import reciprocalspaceship as rs
    >>> merged = rs.DataSet({"H": [1], "K": [0], "L": [0], "F": [10.0], "SIGF": [1.0], "N": [3]},
    ...                     cell=gemmi.UnitCell(2, 2, 2, 90, 90, 90), merged=True).set_index(["H", "K", "L"])
    >>> merged = merged.infer_mtz_dtypes()
    >>> sharpened, scaled = apply_bfactor(merged, -16.0)   # d = 2 Å: F × e
    >>> round(float(sharpened["F"].iloc[0]), 3), scaled
    (27.183, ['F', 'SIGF'])
    """
    if getattr(merged, "cell", None) is None:
        raise InputError("the merged table has no unit cell")
    if not np.isfinite(b):
        raise InputError(f"B = {b}: give a finite B factor in Å²")
    kinds = {c: getattr(t, "name", "") for c, t in merged.dtypes.items()}
    kind_of = {}
    for column, kind in kinds.items():
        if kind in _AMPLITUDE_TYPES:
            kind_of[column] = "amplitude"
        elif kind in _INTENSITY_TYPES:
            kind_of[column] = "intensity"
    for column, kind in kinds.items():
        partner = column[3:] if column[:3].upper() == "SIG" else None
        if kind == "Stddev" and partner in kind_of:
            kind_of[column] = kind_of[partner]
    d = merged.cell.calculate_d_array(merged.reset_index()[["H", "K", "L"]].to_numpy(np.int32))
    factor = {"amplitude": np.exp(-b / (4 * d**2)), "intensity": np.exp(-b / (2 * d**2))}
    out = merged.copy()
    for column, kind in kind_of.items():
        out[column] = (merged[column].to_numpy(np.float64, na_value=np.nan) * factor[kind]).astype(np.float32)
        out[column] = out[column].astype(merged[column].dtype)
    return out, list(kind_of)


# -------------------------------------------------------------------- unmerged files
def image_numbers(predictions, unmerged, image_ids, *, file_id=None, image_key=None):
    """The image numbers of an unmerged file that a predictions file's image ids stand
    for.

    The predictions number the images of all the run's files 0, 1, … in file order,
    then image order (the observation table's ``image_id``), so the k-th image of file f
    in the predictions is the k-th image number of that file. (The image column of the
    predictions is found as :func:`ccpred_report` finds it.)

    Parameters
    ----------
    predictions : rs.DataSet
        The predictions file of the run that merged ``unmerged``.
    unmerged : rs.DataSet
        The unmerged file, as read (:func:`skmerge.io.read_reflection_file`).
    image_ids : array-like of int
        Image ids of the predictions.
    file_id : int, optional
        The position of ``unmerged`` among the run's files; needed when the predictions
        hold several.
    image_key : str, optional
        The image column of ``unmerged`` (default: the first Batch column).

    Returns
    -------
    ndarray of int

    Raises
    ------
    InputError
        When the files do not hold the same number of images, or an id is not among the
        file's.

    Examples
    --------
    >>> import pandas as pd
    >>> predictions = pd.DataFrame({"image_id": [0, 0, 1, 2], "file_id": 0})
    >>> unmerged = pd.DataFrame({"BATCH": [5, 7, 7, 9]})
    >>> image_numbers(predictions, unmerged, [1, 2]).tolist()
    [7, 9]
    """
    ids = predictions[_image_column(predictions, None, "predictions table")].to_numpy(np.int64)
    files = predictions["file_id"].to_numpy(np.int64) if "file_id" in predictions.columns else np.zeros(len(ids), int)
    present = np.unique(files)
    if file_id is None:
        if len(present) > 1:
            raise InputError(f"the predictions hold {len(present)} files ({', '.join(map(str, present))}); say "
                             "which one the unmerged file is (--file-id)")
        file_id = int(present[0])
    if file_id not in present:
        raise InputError(f"the predictions hold no file {file_id}; they hold {', '.join(map(str, present))}")
    own = np.unique(ids[files == file_id])
    numbers = np.unique(unmerged[_image_column(unmerged, image_key, "unmerged file")].to_numpy(np.int64))
    if len(own) != len(numbers):
        raise InputError(f"the predictions hold {len(own)} images of file {file_id}, the unmerged file "
                         f"{len(numbers)}: they are not of the same data")
    wanted = np.asarray(image_ids, dtype=np.int64)
    position = np.searchsorted(own, wanted)
    unknown = wanted[(position >= len(own)) | (own[np.minimum(position, len(own) - 1)] != wanted)]
    if len(unknown):
        raise InputError(f"image id(s) {', '.join(map(str, unknown[:10]))} are not images of file {file_id}")
    return numbers[position]


def filter_images(unmerged, images, *, image_key=None):
    """An unmerged table without the observations of some images.

    Parameters
    ----------
    unmerged : rs.DataSet
        Unmerged observations with an image column.
    images : array-like of int
        Image numbers (values of the image column) to remove.
    image_key : str, optional
        The image column (default: the first Batch column, else BATCH or ``image_id``).

    Returns
    -------
    rs.DataSet
        The remaining rows, with every column and the cell and space group.

    Raises
    ------
    InputError
        For an image number the table does not hold, or when nothing would remain.

    Examples
    --------
    >>> import reciprocalspaceship as rs
    >>> table = rs.DataSet({"BATCH": [1, 1, 2, 3], "I": [1.0, 2.0, 3.0, 4.0]}).astype({"BATCH": "Batch"})
    >>> filter_images(table, [2])["I"].tolist()
    [1.0, 2.0, 4.0]
    """
    key = _image_column(unmerged, image_key, "unmerged file")
    image = unmerged[key].to_numpy(np.int64)
    images = np.unique(np.asarray(images, dtype=np.int64))
    unknown = images[~np.isin(images, image)]
    if len(unknown):
        raise InputError(f"image(s) {', '.join(map(str, unknown[:10]))} are not in the file's {key} column "
                         f"(its images run from {image.min()} to {image.max()})")
    keep = ~np.isin(image, images)
    if not keep.any():
        raise InputError("every image would be removed")
    return unmerged[keep]


def unmerged_mtz(dataset, *, spacegroup=None, cell=None):
    """An unmerged reflection table in the layout of an unmerged MTZ file: indexed by the
    ASU H, K, L with an M/ISYM column, as careless and :func:`skmerge.read_unmerged`
    read it.

    Parameters
    ----------
    dataset : rs.DataSet
        Indexed by the observed H, K, L (a reader of :mod:`skmerge.io`).
    spacegroup : str, int or gemmi.SpaceGroup, optional
        Replaces the table's space group.
    cell : sequence of 6 floats or gemmi.UnitCell, optional
        Replaces the table's cell.

    Raises
    ------
    InputError
        When the table has no space group or cell and none is given.

    Examples
    --------
    >>> import reciprocalspaceship as rs
    >>> table = rs.DataSet({"H": [1, -1], "K": [2, 2], "L": [3, 3], "BATCH": [1, 2], "I": [5.0, 6.0],
    ...                     "SIGI": [1.0, 1.0]}).set_index(["H", "K", "L"])
    >>> out = unmerged_mtz(table, spacegroup="P 2 2 2", cell=(10, 20, 30, 90, 90, 90))
    >>> out.reset_index()[["H", "K", "L", "M/ISYM", "BATCH"]].values.tolist()
    [[1, 2, 3, 1, 1], [1, 2, 3, 6, 2]]
    """
    import gemmi

    from .table import _as_spacegroup

    table = dataset.copy()
    if spacegroup is not None:
        table.spacegroup = _as_spacegroup(spacegroup)
    if cell is not None:
        table.cell = cell if isinstance(cell, gemmi.UnitCell) else gemmi.UnitCell(*cell)
    if table.spacegroup is None:
        raise InputError("the reflections have no space group: give one (--spacegroup)")
    if table.cell is None:
        raise InputError("the reflections have no unit cell: give one (--cell A B C ALPHA BETA GAMMA)")
    table.merged = False
    table = table.hkl_to_asu()
    return table[["M/ISYM", *(c for c in table.columns if c != "M/ISYM")]]  # the usual place, after H K L


def convert_to_mtz(source, out, *, spacegroup=None, cell=None, expected=None):
    """Convert an unmerged reflection file (XDS, CrystFEL, DIALS) to an unmerged MTZ
    file, written atomically: what ``skmerge xds2mtz`` and ``stream2mtz`` do.

    Parameters
    ----------
    source : str or Path
        The reflection file; its columns are those of its reader in :mod:`skmerge.io`.
    out : str or Path
        The MTZ file to write.
    spacegroup, cell : optional
        See :func:`unmerged_mtz` (a CrystFEL stream needs the space group).
    expected : str, optional
        The format ``source`` must have ("xds", "crystfel", ...); InputError otherwise.

    Returns
    -------
    rs.DataSet
        The table written.

    Examples
    --------
    >>> convert_to_mtz("XDS_ASCII.HKL", "unmerged.mtz")  # doctest: +SKIP
    """
    from .io import read_reflection_file, sniff_format
    from .io.writers import write_mtz

    fmt = sniff_format(source)
    if expected is not None and fmt != expected:
        raise InputError(f"{source}: is a {fmt} file, not {expected}")
    try:
        table = unmerged_mtz(read_reflection_file(source, spacegroup=spacegroup), spacegroup=spacegroup, cell=cell)
    except InputError as exc:
        if str(exc).startswith(str(source)):
            raise
        raise InputError(f"{source}: {exc}") from None
    write_mtz(table, out)
    return table


def read_history(path):
    """A run's loss history (``OUT_history.csv``) with a ``step`` column.

    careless's and skmerge's files both work: a column named like the step (step,
    epoch, or the first unnamed one) becomes ``step`` (the row number when there is
    none), and the column named "nll", "kl" or "loss" in any case, else the one column
    whose name holds it (careless's "F KLDiv"), becomes ``nll``, ``kl`` or ``loss``;
    the others (careless's "Grad Norm", "NLL_val") keep their names.

    Raises
    ------
    InputError
        When the file is missing or holds no numeric column.

    Examples
    --------
    >>> import os, tempfile
    >>> import pandas as pd
    >>> path = os.path.join(tempfile.mkdtemp(), "merge_history.csv")
    >>> pd.DataFrame({"step": [0, 1], "loss": [3.0, 2.5], "F KLDiv": [1.0, 0.9], "NLL": [2.0, 1.6]}).to_csv(
    ...     path, index=False)
    >>> read_history(path).columns.tolist()
    ['step', 'loss', 'kl', 'nll']
    """
    try:
        history = pd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable history file ({exc})") from exc
    history = history.select_dtypes("number")
    step = [c for c in history.columns if str(c).lower() in ("step", "epoch", "unnamed: 0")]
    steps = history.pop(step[0]).to_numpy() if step else np.arange(1, len(history) + 1)
    if history.empty or not len(history.columns):
        raise InputError(f"{path}: no numeric loss column")
    renames = {}
    for name in ("nll", "kl", "loss"):
        matching = ([c for c in history.columns if str(c).lower() == name]
                    or [c for c in history.columns if name in str(c).lower() and c not in renames])
        if len(matching) == 1 and name not in history.columns:
            renames[matching[0]] = name
    history = history.rename(columns=renames)
    history.insert(0, "step", steps)
    return history


# --------------------------------------------------------------------------- text
def format_table(frame, title=None):
    """A table as aligned text: counts as whole numbers, resolutions with 2 decimals,
    other numbers with 3 significant decimals; NaN as '-'.

    Examples
    --------
    >>> import pandas as pd
    >>> print(format_table(pd.DataFrame({"d_min": [2.0], "n": [10], "cc": [0.9512]}, index=["overall"])))
              d_min       n      cc
    overall    2.00      10   0.951
    """
    index = [str(i) for i in frame.index]
    width = max([len(str(frame.index.name or ""))] + [len(i) for i in index])
    columns = {}
    for name in frame.columns:
        values = frame[name]
        cells = [_cell(name, v) for v in values]
        columns[name] = (max(8, len(str(name)) + 1, *(len(c) + 1 for c in cells)), cells)
    heading = f"{str(frame.index.name or ''):<{width}}" + "".join(f"{str(n):>{w}}" for n, (w, _) in columns.items())
    lines = ([title] if title else []) + [heading]
    for row, label in enumerate(index):
        lines.append(f"{label:<{width}}" + "".join(f"{cells[row]:>{w}}" for w, cells in columns.values()))
    return "\n".join(lines)


def _cell(name, value):
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, str):
        return value
    if value is None or not np.isfinite(value):
        return "-"
    name = str(name)
    if name.startswith("n") and float(value).is_integer():
        return f"{value:,.0f}"
    if name.startswith("d_") or name == "step":
        return f"{value:.2f}" if name != "step" else f"{value:.0f}"
    return f"{value:.3f}" if abs(value) < 1e4 else f"{value:.4g}"
