"""``skmerge mono STORE`` with minibatches: the merge of an observation store that never
holds its observations in memory.

:func:`skmerge.run_merge` hands an observation store here when the merger draws
minibatches (``batch_size``, ``--batch-size``): the fit streams from the store
(:mod:`skmerge.model.streaming`), the merged table comes from a pass over it, and one
more pass predicts every observation and writes the predictions piece by piece into a
Parquet file (``OUT_predictions.parquet``; into a temporary directory without an
output prefix).

A test set holds out the observations the in-memory merge of the store's table holds
out (:func:`skmerge.workflow.held_out_rows`): the fit's minibatches and passes skip
them, and their predictions (the only ones held in memory) give CCpred. Half-dataset
merges refit the posteriors on the store's observations of each half of the images,
split as in memory (:func:`skmerge.half_datasets.half_dataset_merges`). The calibration
of each data set, its outliers among every observation and its per-image numbers are
those of the in-memory merge, gathered in passes over the predictions file
(:func:`skmerge.calibration.streamed_calibration`); the statistics, ``OUT_stats.json``,
the figures and the HTML report are written by the code the in-memory merge writes
them with (:mod:`skmerge.merge_outputs`), and without an error model the warning on the
scatter of σ comes from the exact median of the fitted observations' z² in the same file.
"""

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import reciprocalspaceship as rs
from sklearn.exceptions import ConvergenceWarning

from .calibration import order_statistics, streamed_calibration
from .diagnostics import fitted_square_residuals, scatter_factor, sigma_scatter_warning
from .errors import ParameterError
from .io import writers
from .merge_outputs import (caught_warnings, dataset_statistics, fit_messages, fitted_error_model, merged_halves,
                            observation_predictions, parent_files, report_calibration, resolution_shells, split_seed,
                            write_run_files)
from .model.streaming import StoreSource
from .store import read_manifest
from .workflow import held_out_rows

__all__ = ["StreamedMergeResult", "file_calibration", "held_out_predictions", "run_streamed_merge",
           "write_predictions"]


@dataclass
class StreamedMergeResult:
    """What a streamed merge produced (the fields of :class:`skmerge.workflow.MergeResult`
    that it has; ``observations`` is the store's path, and per-image tables stand for
    the predictions).

    Attributes
    ----------
    merger : VariationalMerger
    observations : Path
        The observation store.
    merged : list of rs.DataSet
    statistics : list of MergingStatistics
        With CC1/2 and CCanom from half datasets, CCpred from a test set.
    names : list of str
    warnings : list of str
    command : str, optional
    calibration : list of Calibration
        Of the held-out observations (with a test set), and the outliers among every
        observation and the listed images (:func:`skmerge.calibration.calibration_report`).
    paths : list of Path
        The files written (empty without ``out``).
    halves : list of rs.DataSet, optional
        Half-dataset merges.
    held_out : callable, optional
        The test set as a selection of the store (see
        :class:`~skmerge.model.streaming.StoreSource`).
    images : list of DataFrame
        Per data set, every image's :func:`skmerge.report.image_table` (observations,
        CCpred, scale, outliers, why it is listed).
    """

    merger: object
    observations: Path
    merged: list
    statistics: list
    names: list
    warnings: list = field(default_factory=list)
    command: str = None
    calibration: list = None
    paths: list = field(default_factory=list)
    halves: list = None
    held_out: object = None
    images: list = None

    def write(self, out):
        """Write ``OUT_<i>.mtz``, ``OUT_xval_<i>.mtz`` (with half datasets),
        ``OUT_predictions.parquet`` (every observation's prediction in careless's layout,
        written piece by piece) and the files every merge writes
        (:func:`skmerge.merge_outputs.write_run_files`: ``OUT_history.csv``,
        ``OUT.joblib``, ``OUT.npz``, ``OUT_stats.csv``, ``OUT_stats.json``, the figures
        and ``OUT_report.html``) as a set (:func:`skmerge.io.writers.output_set`).
        Returns the paths written."""
        return self._write(out)

    def _write(self, out, predictions=None):
        """:meth:`write`, moving in the predictions file ``predictions`` when the merge
        has written one already."""
        writers.check_output_prefix(out)
        with writers.output_set(out) as staged:
            paths = []
            for i, (merged, half) in enumerate(zip(self.merged, self.halves or [None] * len(self.merged))):
                paths.append(writers.write_mtz(merged, f"{staged}_{i}.mtz"))
                if half is not None:
                    paths.append(writers.write_mtz(writers.careless_layout(half), f"{staged}_xval_{i}.mtz"))
            target = Path(f"{staged}_predictions.parquet")
            if predictions is None:
                paths.append(write_predictions(self.merger, self.observations, target, held_out=self.held_out))
            else:
                paths.append(Path(shutil.move(predictions, target)))
            paths += write_run_files(self, staged, correlations=self.halves is not None or self.held_out is not None)
        return [Path(out).parent / Path(path).name for path in paths]


def write_predictions(merger, store, path, *, held_out=None):
    """Write every observation's prediction by a fitted merger as a Parquet file, one
    piece of the store at a time (the columns of ``OUT_predictions_<i>.mtz`` in
    careless's layout, a row group per piece of whole images), into a temporary name
    renamed at the end.

    Parameters
    ----------
    merger : VariationalMerger
        Fitted.
    store : path
        An observation store of data the merger can evaluate.
    path : path
        The Parquet file to write.
    held_out : callable, optional
        The observations held out of the fit, as a selection of the store
        (:class:`~skmerge.model.streaming.StoreSource`): their ``test`` column is 1.

    Returns
    -------
    pathlib.Path

    Examples
    --------
    >>> from skmerge.streamed_merge import write_predictions
    >>> write_predictions(merger, "runs.parquet", "out_predictions.parquet")  # doctest: +SKIP
    """
    return _write_pieces(_predicted_pieces(merger, store, held_out), path)


def _predicted_pieces(merger, store, held_out):
    """The predictions table of each piece of the store, in order."""
    for X, rows in StoreSource(store).chunks():
        test = None if held_out is None else held_out(X["image_id"].to_numpy(), rows)
        yield observation_predictions(merger, X, test)


def _write_pieces(pieces, path):
    """Write predictions tables as the row groups of one Parquet file, atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    writer = None
    with writers.atomic_path(path) as temporary:
        try:
            for predictions in pieces:
                table = writers.careless_layout(predictions).reset_index()
                table = pa.table({str(c): table[c].to_numpy() for c in table.columns})
                if writer is None:
                    writer = pq.ParquetWriter(temporary, table.schema)
                # One row group per piece, so that each holds whole images.
                writer.write_table(table, row_group_size=max(1, len(table)))
        finally:
            if writer is not None:
                writer.close()
    return path


def run_streamed_merge(store, out, merger, *, read_options, half_datasets, test_fraction, shells, binning, method,
                       report, command):
    """The part of :func:`skmerge.run_merge` that runs for an observation store and a
    merger with ``batch_size``: fit, merge, half-dataset merges, predictions,
    statistics and calibration streamed from the store (see the module docstring);
    outputs as :meth:`StreamedMergeResult.write` writes them.

    Examples
    --------
    >>> import skmerge
    >>> result = skmerge.run_merge("runs.parquet", "out/runs", batch_size=32, half_datasets=1,  # doctest: +SKIP
    ...                            test_fraction=0.05, random_state=0)
    """
    from .model.streaming import check_streamable

    if read_options:
        raise ParameterError(f"{', '.join(read_options)}: the observation store {store} was written with its own "
                             "read options; convert the reflection files again to change them.")
    check_streamable(merger)
    manifest = read_manifest(store)
    names = [Path(entry["name"]).name for entry in manifest["files"]]
    n_sets = len(names) if merger.separate_files else 1
    if n_sets == 1:
        names = [", ".join(names)]
    if half_datasets and manifest["images"] < 2:
        raise ParameterError("half_datasets (--merge-half-datasets) needs at least two images; the data have one")
    warnings = []

    def warn(message):
        warnings.append(message)
        report("warning", message)

    seed = split_seed(merger.random_state)
    source, held_out = StoreSource(store), _test_set(test_fraction, seed)
    train = source if held_out is None else source.where(lambda image_id, rows: ~held_out(image_id, rows))
    report("info", f"streaming {manifest['observations']:,} observations of {manifest['reflections']:,} reflections "
           f"on {manifest['images']:,} images from {len(manifest['files'])} file(s) in {os.fspath(store)}, "
           f"{merger.batch_size} images per step" + (f"; {test_fraction:.0%} held out for testing" if test_fraction
                                                     else ""))
    with caught_warnings(ConvergenceWarning):  # the status line says when max_iter stopped the fit
        merger.fit(train)
    for message in fit_messages(merger):
        report("info", message)
    merged = writers.split_by_file(merger.transform(train), n_sets)
    halves = None
    if half_datasets:
        halves = writers.split_by_file(merged_halves(merger, store, half_datasets, seed, warn), n_sets)
    # Beside the outputs, so that writing them moves the predictions file in.
    with tempfile.TemporaryDirectory(prefix=".skmerge-predictions.", dir=None if out is None else
                                     Path(out).parent) as scratch:
        gathered = _Gathered(n_sets)
        predictions_file = _write_pieces(gathered.tap(_predicted_pieces(merger, store, held_out)),
                                         Path(scratch) / "predictions.parquet")
        statistics = dataset_statistics(merged, halves or [None] * n_sets, gathered.held_out(held_out is not None),
                                        parent_files(merger, n_sets), shells=shells, binning=binning, method=method)
        calibration = [file_calibration(predictions_file, None if n_sets == 1 else i, gathered.cell,
                                        resolution_shells(stats)) for i, stats in enumerate(statistics)]
        report_calibration(calibration, names, report, warn)
        if fitted_error_model(merger) is None:
            warn(sigma_scatter_warning(_sigma_scatter(predictions_file)))
        result = StreamedMergeResult(merger, Path(store), merged, statistics, names, warnings, command=command,
                                     calibration=calibration, halves=halves, held_out=held_out,
                                     images=gathered.images(calibration))
        if out is not None:
            result.paths = result._write(out, predictions_file)
            report("info", "wrote " + ", ".join(p.name for p in result.paths))
    return result


class _Gathered:
    """What the pass that predicts every observation keeps: the held-out observations'
    predictions, each data set's per-image table and the cell."""

    def __init__(self, n_sets):
        self.n_sets, self.tested, self.tables, self.cell = n_sets, [], [[] for _ in range(n_sets)], None

    def tap(self, pieces):
        """The predictions tables ``pieces``, passed on after their share is kept."""
        from .report import image_table

        for predictions in pieces:
            self.cell = predictions.cell
            test = predictions["test"].to_numpy() > 0
            if test.any():
                self.tested.append(predictions.iloc[np.flatnonzero(test)])
            for tables, part in zip(self.tables, writers.split_by_file(predictions, self.n_sets)):
                if len(part):
                    tables.append(image_table(part))
            yield predictions

    def held_out(self, any_held_out):
        """Each data set's held-out predictions (None for each without a test set or
        without held-out observations)."""
        if not (any_held_out and self.tested):
            return [None] * self.n_sets
        return writers.split_by_file(rs.concat(self.tested), self.n_sets)

    def images(self, calibration):
        """Each data set's per-image table with its calibration's outliers and listed images."""
        from .report import with_image_calibration

        return [with_image_calibration(pd.concat(tables).sort_index(), calibrated)
                for tables, calibrated in zip(self.tables, calibration)]


# What calibration reads of the predictions file (H, K, L for the resolution).
_CALIBRATION_COLUMNS = ["Z", "Ipred", "test", "image_id", "file_id", "Scale", "H", "K", "L"]


def _row_groups(path, columns):
    """The row groups of a predictions file (:func:`write_predictions`) one after the
    other, as DataFrames of ``columns``."""
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    for group in range(parquet.num_row_groups):
        yield parquet.read_row_group(group, columns=columns).to_pandas()


def _parquet_pieces(path, file_id, cell):
    """The pieces of a predictions file as
    :func:`~skmerge.calibration.streamed_calibration` reads them: its row groups,
    only the rows of ``file_id`` unless it is None."""

    def pieces(columns):
        wanted = _CALIBRATION_COLUMNS if columns is None else list(dict.fromkeys([*columns, "file_id"]))
        for frame in _row_groups(path, wanted):
            if file_id is not None:
                frame = frame[frame["file_id"].to_numpy() == file_id]
            if columns is None:
                frame = frame.assign(dHKL=cell.calculate_d_array(frame[["H", "K", "L"]].to_numpy(np.int32)))
            if len(frame):
                yield frame
    return pieces


def held_out_predictions(path, file_id=None):
    """The held-out rows (``test`` > 0) of a predictions file (:func:`write_predictions`),
    of the data set ``file_id`` unless it is None: what CCpred reads. Row groups without
    held-out rows are skipped by their column statistics, unread. None when the file
    holds none."""
    import pyarrow.parquet as pq

    filters = [("test", ">", 0)] + ([] if file_id is None else [("file_id", "=", file_id)])
    table = pq.read_table(path, filters=filters).to_pandas()
    return table if len(table) else None


def file_calibration(path, file_id, cell, shells):
    """The calibration of the data set ``file_id`` (None: every row) of a predictions
    file, gathered in passes over its row groups as a streamed merge gathers it."""
    return streamed_calibration(_parquet_pieces(path, file_id, cell), shells)


def _sigma_scatter(path):
    """:func:`skmerge.diagnostics.sigma_scatter` of a predictions file, its median taken
    exactly over the row groups (:func:`~skmerge.calibration.order_statistics`)."""

    def batches():
        for piece in _row_groups(path, ["Iobs", "SigIobs", "Ipred", "test"]):
            yield fitted_square_residuals(piece.rename(columns={"SigIobs": "SIGIobs"}))

    n = sum(int(np.isfinite(square).sum()) for square in batches())
    if n == 0:
        return np.nan
    return scatter_factor(order_statistics(batches, [(n - 1) // 2, n // 2]).mean())


def _test_set(fraction, seed):
    """The test set of ``fraction`` of the observations as a selection of the store
    (:func:`skmerge.workflow.held_out_rows`), or None."""
    if not fraction:
        return None
    # One split for every pass over the store, also without a random_state.
    seed = int(np.random.SeedSequence().generate_state(1)[0]) if seed is None else seed
    return lambda image_id, rows: held_out_rows(rows, fraction, seed)
