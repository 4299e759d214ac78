"""The merging workflow of ``skmerge mono`` and ``skmerge poly`` as library calls.

:func:`run_merge` reads the data, fits a :class:`~skmerge.VariationalMerger`, predicts
every observation, merges half datasets, computes the merging statistics and, given an
output prefix, writes the command line's files; :func:`statistics_from_outputs` is
``skmerge stats``. The steps after the fit that a streamed merge of an observation
store shares with it (predictions, half datasets, statistics, ``OUT_stats.json``, the
report) are in :mod:`skmerge.merge_outputs`; the merge of a store with minibatches is
:func:`skmerge.streamed_merge.run_streamed_merge`.
"""

import copy
import json
import logging
import os
import re
from dataclasses import dataclass, field
from numbers import Integral, Real
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils._param_validation import Interval, InvalidParameterError, StrOptions, validate_parameter_constraints

from .calibration import Calibration, calibration_report
from .diagnostics import check_metadata_keys, partiality_warning, sigma_scatter, sigma_scatter_warning
from .errors import DataWarning, InputError, ParameterError
from .io import writers
from .merge_outputs import (caught_warnings, dataset_statistics, fit_messages, fitted_error_model, merged_halves,
                            observation_predictions, parent_files, report_calibration, resolution_shells, split_seed,
                            statistics_table, write_merger, write_run_files)
from .shadows import find_shadows
from .table import take_rows

__all__ = ["MergeResult", "calibration_from_outputs", "check_options", "format_statistics", "held_out_rows",
           "make_merger", "parent_files", "reindexing_summary", "resolve_output_prefix", "run_merge",
           "statistics_from_outputs", "statistics_table", "write_merger"]

# The workflow's own options (the estimator validates its parameters itself).
OPTION_CONSTRAINTS = {
    "half_datasets": [Interval(Integral, 0, None, closed="left")],
    "test_fraction": [Interval(Real, 0, 1, closed="left")],
    "mask_shadows": ["boolean"],
    "shells": [Interval(Integral, 1, None, closed="left"), list, tuple],
    "binning": [StrOptions({"equal-count", "equal-volume"})],
    "method": [StrOptions({"pearson", "spearman"})],
}
_READ_OPTIONS = ("spacegroup", "cell", "dmin", "isigi_cutoff", "intensity_key", "sigma_key", "image_key",
                 "drop_invalid")
_logger = logging.getLogger("skmerge")


@dataclass
class MergeResult:
    """Everything a merge produced; ``merged``, ``predictions``, ``halves`` and
    ``statistics`` hold one entry per data set (one per file with ``separate_files``).

    Attributes
    ----------
    merger : VariationalMerger
        The fitted merger.
    observations : rs.DataSet
        Every observation read (the fit saw those with ``test`` False).
    test : ndarray of bool
        The observations held out of the fit (``test_fraction``).
    merged : list of rs.DataSet
        Merged amplitudes and intensities of the fitted observations.
    predictions : list of rs.DataSet
        Iobs, SIGIobs, Ipred, SIGIpred, Z, Weight, Scale, SIGScale, image_id, file_id
        and test per observation, in the unmerged MTZ layout (Z and Weight:
        :mod:`skmerge.calibration`).
    halves : list of rs.DataSet or None
        Half-dataset merges (``half_datasets > 0``).
    statistics : list of MergingStatistics
    names : list of str
        The data sets' names (their files).
    warnings : list of str
        The diagnostics of :mod:`skmerge.diagnostics` that fired, and a note when
        ``max_iter`` stopped half-dataset merges (the merger's ``converged_`` tells of
        the main fit).
    paths : list of Path
        The files written (empty without ``out``).
    calibration : list of Calibration
        Calibration of the held-out observations, and the outliers and listed images
        (:func:`skmerge.calibration.calibration_report`).
    command : str or None
        The command line that ran the merge (None from Python), for the report.
    shadow : ShadowMask or None
        The detector shadow whose observations were left out of the fit
        (:func:`skmerge.shadows.find_shadows`).
    """

    merger: object
    observations: object
    test: np.ndarray
    merged: list
    predictions: list
    halves: list
    statistics: list
    names: list
    warnings: list = field(default_factory=list)
    paths: list = field(default_factory=list)
    calibration: list = field(default_factory=list)
    command: str = None
    shadow: object = None

    @property
    def error_model(self):
        """The fitted error model as ``{"sdfac": ..., "sdadd": ...}``, or None."""
        return fitted_error_model(self.merger)

    def write(self, out):
        """Write the outputs of ``skmerge mono`` under the prefix ``out``, as a set: all of
        them or none (:func:`skmerge.io.writers.output_set`), replacing every file an
        earlier run wrote under the same prefix.

        ``OUT_<i>.mtz``, ``OUT_predictions_<i>.mtz``, ``OUT_xval_<i>.mtz`` (with half
        datasets), ``OUT_history.csv``, ``OUT.joblib``, ``OUT.npz`` (the merger in the safe
        format, unless it holds what only joblib stores), ``OUT_stats.csv``,
        ``OUT_stats.json``, ``OUT_reindexing.csv`` (when the indexing was ambiguous: each
        image's operator and probability), ``OUT_history.png``, ``OUT_cchalf.png`` (with half
        datasets or a test set), ``OUT_calibration.png``, ``OUT_shadow.png`` (when a detector
        shadow was left out) and ``OUT_report.html``
        (:mod:`skmerge.report`); see ``docs/cli.md``.

        Returns
        -------
        list of Path
            The files written, in that order.
        """
        writers.check_output_prefix(out)
        with writers.output_set(out) as staged:
            written = self._write(staged)
        return [Path(out).parent / path.name for path in written]

    def _write(self, out):
        paths = []
        halves = self.halves or [None] * len(self.merged)
        for i, (merged, predictions, half) in enumerate(zip(self.merged, self.predictions, halves)):
            paths.append(writers.write_mtz(merged, f"{out}_{i}.mtz"))
            # The analysis files in careless's layout, so that careless's tools read them.
            paths.append(writers.write_mtz(writers.careless_layout(predictions), f"{out}_predictions_{i}.mtz"))
            if half is not None:
                paths.append(writers.write_mtz(writers.careless_layout(half), f"{out}_xval_{i}.mtz"))
        return paths + write_run_files(self, out, correlations=self.halves is not None or self.test.any())


def run_merge(data, out=None, *, merger=None, spacegroup=None, cell=None, dmin=None, isigi_cutoff=None,
              intensity_key=None, sigma_key=None, image_key=None, drop_invalid=None, half_datasets=0, test_fraction=0.0,
              track_test_loss=False, mask_shadows=True, shells=10, binning="equal-count", method="pearson", log=None,
              command=None, **params):
    """Read, fit, predict, merge half datasets, compute statistics and write the outputs:
    what ``skmerge mono`` and ``skmerge poly`` do.

    Parameters
    ----------
    data : path, rs.DataSet, or list of them
        Reflection files or data sets for :func:`skmerge.read_unmerged`, or an
        observation table it made. An observation store merged with ``batch_size``
        streams from disk without being read into memory
        (:func:`skmerge.streamed_merge.run_streamed_merge`; the result is a
        :class:`~skmerge.streamed_merge.StreamedMergeResult`).
    out : str or Path, optional
        Output prefix (its directory must exist); writes :meth:`MergeResult.write`'s
        files when given.
    merger : VariationalMerger, optional
        The estimator to fit (a clone of it is fitted; a copy, with its fitted state, when
        it is to be warm-started). None builds one from ``params``.
    spacegroup, cell, dmin, isigi_cutoff, intensity_key, sigma_key, image_key, drop_invalid : optional
        Read options of :func:`skmerge.read_unmerged` (only with files); ``anomalous``
        is the merger's.
    half_datasets : int, default=0
        Random half splits of the images merged after the fit (0: none); their merges
        give CC1/2 and CCanom.
    test_fraction : float, default=0.0
        Fraction of the observations held out of the fit (seeded by the merger's
        ``random_state``); CCpred and the calibration of the predictive σ are computed
        on them.
    track_test_loss : bool, default=False
        Record the test observations' loss every ``validation_frequency`` steps of the
        fit (the merger's ``held_out_loss_curve_``, the ``test_loss`` column of
        ``OUT_history.csv``); it does not steer the fit.
    mask_shadows : bool, default=True
        Look for a detector shadow after the fit (:func:`skmerge.shadows.find_shadows`,
        with the data's detector-position columns: cells whose spots are extinguished, a
        zone around the beam whose spots disagree with the fit) and, when there is one, fit again
        without the observations behind it; they keep their predictions, flagged in the
        ``shadowed`` column, and are left out of the half datasets and the calibration.
        (A streamed merge of a store does not look.)
    shells, binning, method
        The statistics table's, see :func:`skmerge.merging_statistics`.
    log : callable, optional
        Called as ``log(level, message)`` with level "info" or "warning" for each status
        line and diagnostic; by default they go to the ``logging`` logger "skmerge".
    command : str, optional
        The command line that runs the merge, recorded in ``OUT_stats.json`` and the
        report (``skmerge mono`` gives its own).
    **params
        VariationalMerger parameters (set on ``merger`` when it is given), e.g.
        ``metadata``, ``anomalous``, ``separate_files``, ``max_iter``, ``random_state``,
        which also seeds the test and half-dataset splits.

    Returns
    -------
    MergeResult

    Raises
    ------
    ParameterError
        For a parameter or option that cannot work, before anything is read.
    InputError
        For data that cannot be merged as asked.

    Examples
    --------
    >>> import skmerge
    >>> from skmerge.datasets import make_unmerged
    >>> X, _ = make_unmerged(n_images=12, random_state=0)
    >>> result = skmerge.run_merge(X, metadata=["dHKL", "XDET", "YDET"], mlp_layers=2, max_iter=100,
    ...                            half_datasets=1, random_state=0, log=lambda level, message: None)
    >>> len(result.merged), bool(result.statistics[0].table.loc["overall", "cc_half"] > 0.5)
    (1, True)

    With files and an output prefix, as ``skmerge mono`` does:

    >>> result = skmerge.run_merge(  # doctest: +SKIP
    ...     "hypf_unmerged.mtz", "out/hypf", metadata=["dHKL", "XDET", "YDET", "BATCH"],
    ...     anomalous=True, half_datasets=1, random_state=0)
    """
    report = log or _log_to_logger
    check_options(half_datasets=half_datasets, test_fraction=test_fraction, mask_shadows=mask_shadows, shells=shells,
                  binning=binning, method=method)
    merger = make_merger(merger, **params)
    if out is not None:
        writers.check_output_prefix(out)
    read_options = {name: value for name, value in zip(_READ_OPTIONS, (
        spacegroup, cell, dmin, isigi_cutoff, intensity_key, sigma_key, image_key, drop_invalid))
        if value is not None}
    if merger.batch_size is not None and _store(data) is not None:
        from .streamed_merge import run_streamed_merge

        return run_streamed_merge(_store(data), out, merger, read_options=read_options, half_datasets=half_datasets,
                                  test_fraction=test_fraction, shells=shells, binning=binning, method=method,
                                  report=report, command=command)
    with caught_warnings(DataWarning) as data_warnings:
        X, names = _observations(data, merger.anomalous, read_options)
    n_sets = len(names) if merger.separate_files else 1
    if n_sets == 1:
        names = [", ".join(names)]
    warnings = []

    def warn(message):
        if message:
            warnings.append(message)
            report("warning", message)

    for message in data_warnings:
        warn(message)
    if half_datasets and X["image_id"].nunique() < 2:
        raise ParameterError("half_datasets (--merge-half-datasets) needs at least two images; the data have one")
    keys = merger.metadata if isinstance(merger.metadata, (list, tuple)) else []
    check_metadata_keys(keys, X)
    warn(partiality_warning(X, keys))
    seed = split_seed(merger.random_state)
    test = held_out_rows(np.arange(len(X)), test_fraction, seed)
    if test.all():
        raise ParameterError(f"test_fraction={test_fraction} leaves no observation to fit")
    report("info", f"read {len(X):,} observations of {X['asu_index'].nunique():,} reflections"
           + (" (Friedel mates apart)" if merger.anomalous else "") + f" on "
           f"{X['image_id'].nunique():,} images from {X['file_id'].nunique()} file(s)"
           + (f"; {int(test.sum()):,} held out for testing" if test.any() else ""))

    # A second start, should the fit find a detector shadow to leave out.
    unfitted = copy.deepcopy(merger) if mask_shadows else None
    shadowed = np.zeros(len(X), dtype=bool)
    X, merged = _fit_and_merge(merger, X, test, shadowed, track_test_loss)
    predictions = observation_predictions(merger, X, test)
    shadow = find_shadows(take_rows(X, ~test), predictions["Ipred"].to_numpy()[~test]) if mask_shadows else None
    if shadow is not None:
        shadowed = shadow.contains(X)
        report("info", f"found {shadow.describe()}; fitting again without its {int(shadowed.sum()):,} observations")
        merger = unfitted
        X, merged = _fit_and_merge(merger, X, test, shadowed, track_test_loss)
        predictions = observation_predictions(merger, X, test, shadowed)
    for message in fit_messages(merger):
        report("info", message)
    if len(merger.reindexing_operators_) > 1:
        report("info", reindexing_summary(merger))
    if fitted_error_model(merger) is None:
        warn(sigma_scatter_warning(sigma_scatter(predictions)))
    halves = merged_halves(merger, take_rows(X, ~shadowed), half_datasets, seed, warn) if half_datasets else None
    merged, predictions = writers.split_by_file(merged, n_sets), writers.split_by_file(predictions, n_sets)
    halves = None if halves is None else writers.split_by_file(halves, n_sets)
    statistics = dataset_statistics(merged, halves or [None] * n_sets, predictions, parent_files(merger, n_sets),
                                    shells=shells, binning=binning, method=method)
    calibration = [calibration_report(p, resolution_shells(stats)) for p, stats in zip(predictions, statistics)]
    report_calibration(calibration, names, report, warn)
    result = MergeResult(merger, X, test, merged, predictions, halves, statistics, names, warnings,
                         calibration=calibration, command=command, shadow=shadow)
    if out is not None:
        result.paths = result.write(out)
        report("info", "wrote " + ", ".join(p.name for p in result.paths))
    return result


def _fit_and_merge(merger, X, test, left_out, track_test_loss):
    """Fit ``merger`` on the observations X neither held out (``test``) nor ``left_out``
    and merge them: (X in the fit's indexing setting, the merged table)."""
    fitted = ~(test | left_out)
    with caught_warnings(ConvergenceWarning):  # the status line says when max_iter stopped the fit
        merger.fit(take_rows(X, fitted), X_held_out=take_rows(X, test) if track_test_loss and test.any() else None)
    if len(merger.reindexing_operators_) > 1:
        # Everything after the fit (predictions, half datasets, statistics) in the merge's setting.
        X = merger.reindex(X)
    return X, merger.transform(take_rows(X, fitted))


def held_out_rows(rows, fraction, seed):
    """Which observations a test set holds out, given their positions in the observation
    table: row i is held out when the i-th number drawn by
    ``numpy.random.default_rng(seed).random`` is below ``fraction``.

    Only the draws of the rows asked for are made (the generator jumps to each run of
    consecutive rows), so that a store read piece by piece is split as its whole table.

    Parameters
    ----------
    rows : array-like of int
        Positions in the observation table, in any order.
    fraction : float
        The fraction of the observations held out.
    seed : int or None
        None draws the split afresh at each call.

    Returns
    -------
    ndarray of bool

    Examples
    --------
    >>> import numpy as np
    >>> from skmerge.workflow import held_out_rows
    >>> whole = held_out_rows(np.arange(1000), 0.1, seed=0)
    >>> bool(np.array_equal(held_out_rows([999, 5, 6], 0.1, seed=0), whole[[999, 5, 6]]))
    True
    """
    rows = np.asarray(rows, np.int64).ravel()
    start = np.random.PCG64(np.random.SeedSequence() if seed is None else seed).state
    order = np.argsort(rows, kind="stable")
    ordered = rows[order]
    runs = np.flatnonzero(np.diff(ordered, prepend=-2) != 1)  # rows are ≥ 0: the first starts a run
    draws = np.empty(len(rows))
    for begin, end in zip(runs, np.r_[runs[1:], len(rows)]):
        generator = np.random.PCG64()
        generator.state = start
        generator.advance(int(ordered[begin]))
        draws[order[begin:end]] = np.random.Generator(generator).random(end - begin)
    return draws < fraction


def reindexing_summary(merger):
    """One line on the indexing ambiguity a fitted merger resolved: the settings, how
    many images each took, and the least certain image."""
    table = merger.image_reindexing()
    counts = table["operator"].value_counts()
    least = table["probability"].idxmin()
    return (f"indexing ambiguity: {len(merger.reindexing_operators_)} settings; images reindexed by "
            + ", ".join(f"{op}: {n}" for op, n in counts.items())
            + f"; least certain image_id {least} (probability {table.loc[least, 'probability']:.3f})")


def make_merger(merger=None, **params):
    """A VariationalMerger with ``params`` set and every parameter validated, including
    those of the model pieces given as objects (priors, likelihoods).

    Parameters
    ----------
    merger : VariationalMerger, optional
        Cloned, then ``params`` are set on the clone; None starts from the defaults. A
        fitted merger that is to be warm-started (``warm_start``) is copied with its
        fitted state instead.
    **params
        VariationalMerger parameters.

    Raises
    ------
    ParameterError
        For an unknown parameter or a value it cannot take.

    Examples
    --------
    >>> make_merger(max_iter=0)
    Traceback (most recent call last):
    ...
    skmerge.errors.ParameterError: The 'max_iter' parameter of VariationalMerger must be an int in the range [1, inf). Got 0 instead.
    """
    from sklearn.base import clone

    from .merger import VariationalMerger

    if merger is None:
        merger = VariationalMerger()
    elif params.get("warm_start", merger.warm_start) and hasattr(merger, "reflections_"):
        # A warm start continues from the fitted state, which a clone would drop.
        merger = copy.deepcopy(merger)
    else:
        merger = clone(merger)
    try:
        merger.set_params(**params)
    except ValueError as exc:  # a name VariationalMerger does not have
        raise ParameterError(str(exc)) from None
    merger._check_params()
    return merger


def check_options(**options):
    """Validate options of :func:`run_merge` other than the estimator's (half_datasets,
    test_fraction, shells, binning, method); raises ParameterError."""
    try:
        validate_parameter_constraints({k: OPTION_CONSTRAINTS[k] for k in options}, options, "run_merge")
    except InvalidParameterError as exc:
        raise ParameterError(str(exc)) from None


def format_statistics(statistics, names, calibration=None):
    """The statistics tables of several data sets as text, each titled with its number
    and name, and followed by its calibration report when given: what ``skmerge mono``
    and ``skmerge stats`` print."""
    calibration = calibration or [None] * len(statistics)
    return "\n\n".join(
        stats.to_string(title=f"Merging statistics of data set {i}" + (f" ({name})" if name else ""))
        + ("" if calibrated is None else "\n\n" + calibrated.to_string())
        for i, (stats, name, calibrated) in enumerate(zip(statistics, names, calibration))
    )


def statistics_from_outputs(out, *, shells=10, binning="equal-count", method="pearson"):
    """The merging statistics of a finished run, recomputed from its files: ``skmerge
    stats``.

    Reads ``OUT_<i>.mtz``, ``OUT_xval_<i>.mtz`` and ``OUT_predictions_<i>.mtz`` (careless's
    SigF/SigI names too) — for a streamed run the held-out rows of
    ``OUT_predictions.parquet`` instead; when no merged file is left, the tables saved in
    ``OUT_stats.json`` instead (then ``shells``, ``binning`` and ``method`` are those of
    the run).

    Parameters
    ----------
    out : str or Path
        The run's output prefix.
    shells, binning, method
        See :func:`skmerge.merging_statistics`.

    Returns
    -------
    statistics : list of MergingStatistics
    names : list of str
        The data sets' names (their files, when ``OUT_stats.json`` records them).

    Raises
    ------
    InputError
        When there is no run under ``out`` or a file is not readable.
    """
    from .stats import MergingStatistics

    check_options(shells=shells, binning=binning, method=method)
    out = resolve_output_prefix(out)
    indices = _run_indices(out)
    if not indices:
        return _from_saved(out, lambda document: ([MergingStatistics.from_dict(d) for d in document["datasets"]],
                                                  [d.get("name") for d in document["datasets"]]))
    try:
        saved_names, saved_parents = _from_saved(out, lambda document: (
            {d["index"]: d["name"] for d in document["datasets"]}, document.get("parents")))
    except InputError:
        saved_names, saved_parents = {}, None
    statistics = dataset_statistics([_read_mtz(f"{out}_{i}.mtz", merged=True) for i in indices],
                                    [_read_mtz(f"{out}_xval_{i}.mtz", merged=True) for i in indices],
                                    [_run_predictions(out, i, len(indices)) for i in indices],
                                    saved_parents or parent_files(None, len(indices)), shells=shells,
                                    binning=binning, method=method)
    return statistics, [saved_names.get(i) or os.path.basename(f"{out}_{i}.mtz") for i in indices]


def calibration_from_outputs(out, statistics):
    """The calibration reports of a finished run (``skmerge stats``): recomputed from
    ``OUT_predictions_<i>.mtz`` (a streamed run's ``OUT_predictions.parquet``, in passes
    over its row groups) in the shells of ``statistics``
    (:func:`statistics_from_outputs`), or those saved in ``OUT_stats.json`` when the MTZ
    files are gone.

    Returns
    -------
    list of Calibration or None
        One per data set; None where the run left no Z column (careless's outputs,
        older skmerge runs).
    """
    out = resolve_output_prefix(out)
    indices = _run_indices(out)
    if not indices:
        return _from_saved(out, lambda document: [
            Calibration.from_dict(d["calibration"]) if "calibration" in d else None for d in document["datasets"]])
    reports = []
    for i, stats in zip(indices, statistics):
        streamed = _streamed_predictions(out, i, len(indices))
        if streamed is not None:
            from .streamed_merge import file_calibration

            cell = _read_mtz(f"{out}_{i}.mtz", merged=True).cell
            reports.append(file_calibration(*streamed, cell, resolution_shells(stats)))
            continue
        predictions = _read_mtz(f"{out}_predictions_{i}.mtz")
        has_z = predictions is not None and "Z" in predictions.columns
        reports.append(calibration_report(predictions, resolution_shells(stats)) if has_z else None)
    return reports


def _streamed_predictions(out, i, n_sets):
    """(path, file_id) of data set i in a streamed run's ``OUT_predictions.parquet``
    (file_id None when the run has one data set), or None when the run wrote
    ``OUT_predictions_<i>.mtz`` or no predictions."""
    path = Path(f"{out}_predictions.parquet")
    if Path(f"{out}_predictions_{i}.mtz").is_file() or not path.is_file():
        return None
    return path, None if n_sets == 1 else i


def _run_predictions(out, i, n_sets):
    """The predictions of data set i of a run: ``OUT_predictions_<i>.mtz``, or the
    held-out rows of a streamed run's ``OUT_predictions.parquet`` (all CCpred needs), or
    None."""
    streamed = _streamed_predictions(out, i, n_sets)
    if streamed is None:
        return _read_mtz(f"{out}_predictions_{i}.mtz")
    from .streamed_merge import held_out_predictions

    return held_out_predictions(*streamed)


def resolve_output_prefix(out):
    """The output prefix of the run that ``out`` names.

    ``out`` is a prefix when files ``OUT_<i>.mtz`` or ``OUT_stats.json`` exist (the name
    is joined as text, as careless does, so ``merge/`` names ``merge/_0.mtz``), and so
    is ``out`` without a trailing '/' (``hypf/`` for the run ``hypf``); otherwise a
    directory names the one run inside it.

    Parameters
    ----------
    out : str or Path
        A run's output prefix, or the directory holding one run.

    Returns
    -------
    str
        The prefix; ``out`` itself when it names no run and no directory (reading then
        reports what is missing).

    Raises
    ------
    InputError
        When ``out`` is a directory holding no run or several (their prefixes are
        listed).

    Examples
    --------
    >>> import pathlib, tempfile
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> for name in ("hypf_0.mtz", "hypf_xval_0.mtz", "hypf_predictions_0.mtz"):
    ...     _ = (folder / name).write_bytes(b"")
    >>> resolve_output_prefix(f"{folder}/") == str(folder / "hypf")
    True
    """
    out = os.fspath(out)
    # "hypf/" for the prefix "hypf" too: a trailing separator is easily typed.
    for prefix in dict.fromkeys([out, out.rstrip("/" + os.sep) or out]):
        if Path(os.path.dirname(prefix) or ".").is_dir() and (
                _run_indices(prefix) or Path(f"{prefix}_stats.json").is_file()):
            return prefix
    if not Path(out).is_dir():
        return out
    directory = Path(out)
    run = re.compile(r"(.+?)(?:_(\d+)\.mtz|_stats\.json)$")
    prefixes = sorted({m.group(1) for p in directory.iterdir() if (m := run.match(p.name))
                       and not re.search(r"_(predictions|xval)$", m.group(1))})
    if len(prefixes) > 1:
        raise InputError(f"{out}: holds the outputs of {len(prefixes)} runs ({', '.join(prefixes)}); give the "
                         f"prefix of one, e.g. {directory / prefixes[0]}")
    if not prefixes:
        raise InputError(f"{out}: a directory without the outputs of a run (no <prefix>_0.mtz or "
                         "<prefix>_stats.json); give the OUT prefix of a run")
    return str(directory / prefixes[0])


def _run_indices(out, suffix="_{i}.mtz"):
    """The numbers i of the files OUT + ``suffix`` (i in place of {i}) of a run, by
    default its merged files OUT_<i>.mtz (``out`` joined as text)."""
    directory, base = os.path.split(os.fspath(out))
    directory = directory or "."
    if not Path(directory).is_dir():
        raise InputError(f"directory {directory!r} does not exist")
    pattern = re.compile(re.escape(base) + re.escape(suffix).replace(r"\{i\}", r"(\d+)") + "$")
    return sorted(int(m.group(1)) for p in Path(directory).iterdir() if (m := pattern.match(p.name)))


def _from_saved(out, read):
    """``read`` applied to the content of ``OUT_stats.json``; InputError when there is no
    such file or it is not skmerge's."""
    saved = Path(f"{out}_stats.json")
    if not saved.is_file():
        raise InputError(f"no merged file {out}_0.mtz (nor {saved.name}); give the OUT prefix of a run")
    try:
        return read(json.loads(saved.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{saved}: not a skmerge statistics file ({exc})") from exc


def _store(data):
    """The observation store ``data`` names, or None."""
    from .store import store_input

    if isinstance(data, pd.DataFrame) or (isinstance(data, (list, tuple)) and any(
            isinstance(item, pd.DataFrame) for item in data)):
        return None
    return store_input(data)


def _observations(data, anomalous, read_options):
    """The observation table and the names of its files."""
    if isinstance(data, pd.DataFrame) and "asu_index" in data.columns:
        if read_options:
            raise ParameterError(f"{', '.join(read_options)}: read options apply to files, not to a table; "
                                 "pass them to skmerge.read_unmerged")
        n_files = int(data["file_id"].max()) + 1 if "file_id" in data.columns else 1
        return data, [f"file {i}" for i in range(n_files)]
    from .store import read_manifest, store_input
    from .table import read_unmerged

    sources = list(data) if isinstance(data, (list, tuple)) else [data]
    X = read_unmerged(sources, anomalous=anomalous, **read_options)
    stored = store_input(sources)
    if stored is not None:  # the files converted into the store
        return X, [Path(entry["name"]).name for entry in read_manifest(stored)["files"]]
    return X, [Path(s).name if isinstance(s, (str, os.PathLike)) else f"file {i}" for i, s in enumerate(sources)]


def _read_mtz(path, merged=False):
    """An MTZ file of a run, or None when it is absent; InputError for unmerged data
    where a run writes ``merged`` data."""
    import reciprocalspaceship as rs

    if not Path(path).is_file():
        return None
    try:
        table = rs.read_mtz(str(path))
    except (RuntimeError, OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable MTZ file ({exc})") from exc
    if merged and table.merged is False:
        raise InputError(f"{path}: holds unmerged observations (an M/ISYM column); skmerge stats reads the merged "
                         "files a run wrote under OUT")
    return table


def _log_to_logger(level, message):
    _logger.log(logging.WARNING if level == "warning" else logging.INFO, message)
