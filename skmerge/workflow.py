"""The merging workflow of ``skmerge mono`` and ``skmerge poly`` as library calls.

:func:`run_merge` reads the data, fits a :class:`~skmerge.VariationalMerger`, predicts
every observation, merges half datasets, computes the merging statistics and, given an
output prefix, writes the command line's files; :func:`statistics_from_outputs` is
``skmerge stats``.
"""

import contextlib
import copy
import json
import logging
import os
import re
import warnings as python_warnings
from dataclasses import dataclass, field
from numbers import Integral, Real
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils._param_validation import Interval, InvalidParameterError, StrOptions, validate_parameter_constraints

from . import __version__
from .calibration import Calibration, calibration_report, observation_scores
from .diagnostics import check_metadata_keys, partiality_warning, sigma_scatter_warning
from .errors import DataWarning, InputError, NotSerializableError, ParameterError
from .shells import ResolutionShells
from .io import writers
from .model.fitted import learned_likelihood, prior_of

# The workflow's own options (the estimator validates its parameters itself).
OPTION_CONSTRAINTS = {
    "half_datasets": [Interval(Integral, 0, None, closed="left")],
    "test_fraction": [Interval(Real, 0, 1, closed="left")],
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

    @property
    def error_model(self):
        """The fitted error model as ``{"sdfac": ..., "sdadd": ...}``, or None."""
        return _fitted_error_model(self.merger)

    def write(self, out):
        """Write the outputs of ``skmerge mono`` under the prefix ``out``, as a set: all of
        them or none (:func:`skmerge.io.writers.output_set`), replacing every file an
        earlier run wrote under the same prefix.

        ``OUT_<i>.mtz``, ``OUT_predictions_<i>.mtz``, ``OUT_xval_<i>.mtz`` (with half
        datasets), ``OUT_history.csv``, ``OUT.joblib``, ``OUT.npz`` (the merger in the safe
        format, unless it holds what only joblib stores), ``OUT_stats.csv``,
        ``OUT_stats.json``, ``OUT_reindexing.csv`` (when the indexing was ambiguous: each
        image's operator and probability), ``OUT_history.png``, ``OUT_cchalf.png`` (with half
        datasets or a test set), ``OUT_calibration.png`` and ``OUT_report.html``
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
        from .plotting import plot_calibration, plot_history, plot_statistics
        from .report import report_html

        paths = []
        halves = self.halves or [None] * len(self.merged)
        for i, (merged, predictions, half) in enumerate(zip(self.merged, self.predictions, halves)):
            paths.append(writers.write_mtz(merged, f"{out}_{i}.mtz"))
            # The analysis files in careless's layout, so that careless's tools read them.
            paths.append(writers.write_mtz(writers.careless_layout(predictions), f"{out}_predictions_{i}.mtz"))
            if half is not None:
                paths.append(writers.write_mtz(writers.careless_layout(half), f"{out}_xval_{i}.mtz"))
        history = writers.history_table(self.merger.loss_curve_, getattr(self.merger, "held_out_loss_curve_", None))
        paths.append(writers.write_csv(history, f"{out}_history.csv"))
        if len(self.merger.reindexing_operators_) > 1:
            paths.append(writers.write_csv(self.merger.image_reindexing().reset_index(), f"{out}_reindexing.csv"))
        paths += write_merger(self.merger, out)
        paths.append(writers.write_csv(statistics_table(self.statistics), f"{out}_stats.csv"))
        paths.append(writers.write_json(self._statistics_document(), f"{out}_stats.json"))
        paths.append(writers.write_figure(plot_history(history), f"{out}_history.png"))
        labels = None if len(self.names) == 1 else self.names
        if self.halves is not None or self.test.any():
            paths.append(writers.write_figure(plot_statistics(self.statistics, labels), f"{out}_cchalf.png"))
        paths.append(writers.write_figure(plot_calibration(self.calibration, labels), f"{out}_calibration.png"))
        try:
            page = report_html(self, title=Path(out).name)
        except Exception as exc:  # a figure that cannot be drawn must not cost the merge
            python_warnings.warn(f"the report could not be made ({type(exc).__name__}: {exc}); "
                                 f"{Path(out).name}_report.html not written", UserWarning, stacklevel=3)
        else:
            paths.append(writers.write_text(page, f"{out}_report.html"))
        return paths

    def _statistics_document(self):
        from .report import run_info

        document = {
            "skmerge_version": __version__,
            "run": {**run_info(self.command, self.merger), "warnings": list(self.warnings)},
            "datasets": [{"index": i, "name": name, **s.to_dict(), "calibration": c.to_dict()}
                         for i, (s, name, c) in enumerate(zip(self.statistics, self.names, self.calibration))],
        }
        if self.error_model is not None:
            document["error_model"] = self.error_model
        if len(self.statistics) > 1:
            document["parents"] = parent_files(self.merger, len(self.statistics))
        learned = learned_likelihood(self.merger)
        if learned:
            document["likelihood"] = learned
        prior_r = getattr(self.merger, "prior_r_", None)
        if prior_r is not None and np.isfinite(prior_r).any():
            document["prior_r"] = [[None if np.isnan(v) else float(v) for v in row] for row in prior_r]
        return document


def run_merge(data, out=None, *, merger=None, spacegroup=None, cell=None, dmin=None, isigi_cutoff=None,
              intensity_key=None, sigma_key=None, image_key=None, drop_invalid=None, half_datasets=0, test_fraction=0.0,
              track_test_loss=False, shells=10, binning="equal-count", method="pearson", log=None, command=None,
              **params):
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
    check_options(half_datasets=half_datasets, test_fraction=test_fraction, shells=shells, binning=binning,
                  method=method)
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
    with _caught(DataWarning) as data_warnings:
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
    seed = _split_seed(merger.random_state)
    test = held_out_rows(np.arange(len(X)), test_fraction, seed)
    if test.all():
        raise ParameterError(f"test_fraction={test_fraction} leaves no observation to fit")
    X_train = X.iloc[np.flatnonzero(~test)] if test.any() else X
    report("info", f"read {len(X):,} observations of {X['asu_index'].nunique():,} reflections"
           + (" (Friedel mates apart)" if merger.anomalous else "") + f" on "
           f"{X['image_id'].nunique():,} images from {X['file_id'].nunique()} file(s)"
           + (f"; {int(test.sum()):,} held out for testing" if test.any() else ""))

    with _caught(ConvergenceWarning):  # the status line says when max_iter stopped the fit
        merger.fit(X_train, X_held_out=X.iloc[np.flatnonzero(test)] if track_test_loss and test.any() else None)
    merged = merger.transform(X_train)
    error_model = _fitted_error_model(merger)
    report("info", f"fitted in {merger.n_iter_} steps" + ("" if merger.converged_ else
           " (the maximum; not converged — raise --iterations)")
           + (f"; error model SdFac {error_model['sdfac']:.3g}, SdAdd {error_model['sdadd']:.3g}"
              if error_model else ""))
    learned = learned_likelihood(merger)
    if "outlier_fraction" in learned:
        report("info", f"mixture likelihood: {learned['outlier_fraction']:.2%} of the observations as outliers, "
               f"{learned['outlier_scale']:.3g} times as wide"
               + (f", Student-t core with {learned['dof']:.3g} degrees of freedom" if "dof" in learned else "")
               + " (learned)")
    elif learned:
        report("info", f"Student-t likelihood: {learned['dof']:.3g} degrees of freedom (learned)")
    prior_r = getattr(merger, "prior_r_", None)
    if prior_r is not None and np.isfinite(prior_r).any():
        report("info", "double-Wilson prior: r " + "; ".join(
            f"file {k} " + " ".join(f"{v:.3f}" for v in row) for k, row in enumerate(prior_r)
            if np.isfinite(row).any()) + (" (learned)" if prior_of(merger).learn_r else " (fixed)"))
    if len(merger.reindexing_operators_) > 1:
        report("info", reindexing_summary(merger))
        # Everything after the fit (predictions, half datasets, statistics) in the merge's setting.
        X = merger.reindex(X)
        X_train = X.iloc[np.flatnonzero(~test)] if test.any() else X
        merged = merger.transform(X_train)
    predictions = _observation_predictions(merger, X, test)
    if error_model is None:
        warn(sigma_scatter_warning(predictions))
    halves = _merged_halves(merger, X, half_datasets, seed, warn) if half_datasets else None
    merged, predictions = writers.split_by_file(merged, n_sets), writers.split_by_file(predictions, n_sets)
    halves = None if halves is None else writers.split_by_file(halves, n_sets)
    statistics = _statistics(merged, halves or [None] * n_sets, predictions, parent_files(merger, n_sets),
                             shells=shells, binning=binning, method=method)
    calibration = [calibration_report(p, _shells_of(stats)) for p, stats in zip(predictions, statistics)]
    for calibrated, name in zip(calibration, names):
        report("info", f"{name}: {calibrated.summary()}")
        for image_id, row in calibrated.flagged.iterrows():
            warn(f"{name}: image_id {image_id} ({row['n_obs']} observations) looks bad: {row['reason']}")
    result = MergeResult(merger, X, test, merged, predictions, halves, statistics, names, warnings,
                         calibration=calibration, command=command)
    if out is not None:
        result.paths = result.write(out)
        report("info", "wrote " + ", ".join(p.name for p in result.paths))
    return result


def _observation_predictions(merger, X, test=None):
    """The predictions table of the observations X by a fitted merger
    (:func:`skmerge.io.writers.predictions_table`: Ipred, its σ, Z, Weight, the scale and
    its σ), with ``test`` flagging those held out of the fit."""
    ipred, ipred_sd, scale, scale_sd = merger.predict(X, return_std=True, return_scale=True)
    return writers.predictions_table(X, ipred, ipred_sd, *observation_scores(merger, X, ipred, ipred_sd), scale,
                                     scale_sd, test=test)


def _merged_halves(merger, X, n_repeats, seed, warn):
    """:func:`skmerge.half_datasets.half_dataset_merges` of the fitted merger's data X (a
    table or a store), calling ``warn(message)`` when some stopped before converging."""
    from .half_datasets import half_dataset_merges

    with _caught(ConvergenceWarning) as stopped:
        halves = half_dataset_merges(merger, X, n_repeats=n_repeats, random_state=seed, verbose=merger.verbose)
    if stopped:
        warn(f"{len(stopped)} of {2 * n_repeats} half-dataset merges stopped at max_iter={merger.max_iter} "
             "before converging, so CC1/2 and CCanom describe unconverged merges: raise --iterations")
    return halves


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


def write_merger(merger, out):
    """Write a fitted merger as ``OUT.joblib`` and, unless it holds what only joblib
    stores (a transformer of the user's: a warning says so), ``OUT.npz``; returns the
    paths written."""
    paths = [writers.write_joblib(merger, f"{out}.joblib")]
    try:
        paths.append(merger.save(f"{out}.npz"))
    except NotSerializableError as exc:
        python_warnings.warn(f"{exc} ({Path(out).name}.npz not written)", UserWarning, stacklevel=4)
    return paths


def reindexing_summary(merger):
    """One line on the indexing ambiguity a fitted merger resolved: the settings, how
    many images each took, and the least certain image."""
    table = merger.image_reindexing()
    counts = table["operator"].value_counts()
    least = table["probability"].idxmin()
    return (f"indexing ambiguity: {len(merger.reindexing_operators_)} settings; images reindexed by "
            + ", ".join(f"{op}: {n}" for op, n in counts.items())
            + f"; least certain image_id {least} (probability {table.loc[least, 'probability']:.3f})")


def _fitted_error_model(merger):
    if not merger.error_model:
        return None
    return {"sdfac": float(merger.sdfac_), "sdadd": float(merger.sdadd_)}


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


def statistics_table(statistics):
    """The statistics tables of several data sets stacked, with a ``data_set`` column:
    the content of ``OUT_stats.csv``."""
    tables = []
    for i, stats in enumerate(statistics):
        table = stats.table.reset_index()
        table.insert(0, "data_set", i)
        tables.append(table)
    return pd.concat(tables, ignore_index=True)


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
    SigF/SigI names too); when no merged file is left, the tables saved in
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
    statistics = _statistics([_read_mtz(f"{out}_{i}.mtz", merged=True) for i in indices],
                             [_read_mtz(f"{out}_xval_{i}.mtz", merged=True) for i in indices],
                             [_read_mtz(f"{out}_predictions_{i}.mtz") for i in indices],
                             saved_parents or parent_files(None, len(indices)), shells=shells, binning=binning,
                             method=method)
    return statistics, [saved_names.get(i) or os.path.basename(f"{out}_{i}.mtz") for i in indices]


def calibration_from_outputs(out, statistics):
    """The calibration reports of a finished run (``skmerge stats``): recomputed from
    ``OUT_predictions_<i>.mtz`` in the shells of ``statistics``
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
        predictions = _read_mtz(f"{out}_predictions_{i}.mtz")
        has_z = predictions is not None and "Z" in predictions.columns
        reports.append(calibration_report(predictions, _shells_of(stats)) if has_z else None)
    return reports


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


def _shells_of(statistics):
    """The resolution shells of a statistics table, so that calibration is reported per
    shell of the merging-statistics table."""
    table = statistics.table.drop(index="overall")
    limits = np.r_[table["d_max"].to_numpy(np.float64)[:1], table["d_min"].to_numpy(np.float64)]
    return ResolutionShells(limits**-2.0)


def _statistics(merged, halves, predictions, parents, **options):
    from .stats import merging_statistics

    return [merging_statistics(m, h, p, parent_halves=None if parent is None or h is None else halves[parent],
                               **options)
            for m, h, p, parent in zip(merged, halves, predictions, parents)]


def parent_files(merger, n_sets):
    """The data set each of ``n_sets`` separately merged files is compared with by
    CCdiff: its double-Wilson parent, else the first file (None for the first)."""
    parents = getattr(prior_of(merger), "parents", None) if merger is not None else None
    if parents is None:
        return [None] + [0] * (n_sets - 1)
    return [p if p is not None and p < n_sets else None for p in list(parents)[:n_sets]] + [None] * (
        n_sets - len(parents))


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


def _split_seed(random_state):
    """The seed of the test and half-dataset splits for an estimator's random_state."""
    if random_state is None or isinstance(random_state, Integral):
        return random_state
    return int(random_state.randint(2**31 - 1))


@contextlib.contextmanager
def _caught(category):
    """Collect the warnings of ``category`` raised inside the block (their messages, in
    the list it yields) instead of showing them; other warnings pass on."""
    caught = []
    with python_warnings.catch_warnings(record=True) as raised:
        python_warnings.simplefilter("always", category)
        yield caught
    for w in raised:
        if issubclass(w.category, category):
            caught.append(str(w.message))
        else:
            python_warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)


def _log_to_logger(level, message):
    _logger.log(logging.WARNING if level == "warning" else logging.INFO, message)
