"""``skmerge mono STORE`` with minibatches: the merge of an observation store that never
holds its observations in memory.

:func:`skmerge.run_merge` hands an observation store here when the merger draws
minibatches (``batch_size``, ``--batch-size``): the fit streams from the store
(:mod:`skmerge.model.streaming`), the merged table comes from a pass over it, and the
predictions are written piece by piece into a Parquet file.

A test set holds out the observations the in-memory merge of the store's table holds
out (:func:`skmerge.workflow.held_out_rows`): the fit's minibatches and passes skip
them, and their predictions (the only ones held in memory) give CCpred and the
calibration report. Half-dataset merges refit the posteriors on the store's
observations of each half of the images, split as in memory
(:func:`skmerge.half_datasets.half_dataset_merges`). Not made: the calibration of
every observation's outliers (only the held-out ones are counted), ``OUT_stats.json``
and the HTML report, which read every prediction at once.
"""

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import reciprocalspaceship as rs

from .errors import ParameterError
from .io import writers
from .model.streaming import StoreSource
from .store import read_manifest

__all__ = ["StreamedMergeResult", "run_streamed_merge", "write_predictions"]


@dataclass
class StreamedMergeResult:
    """What a streamed merge produced (the fields of :class:`skmerge.workflow.MergeResult`
    that it has; ``observations`` is the store's path, ``calibration`` None).

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
    calibration : list of Calibration, optional
        Of the held-out observations (with a test set).
    halves : list of rs.DataSet, optional
        Half-dataset merges.
    held_out : callable, optional
        The test set as a selection of the store (see
        :class:`~skmerge.model.streaming.StoreSource`).
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

    def write(self, out):
        """Write ``OUT_<i>.mtz``, ``OUT_xval_<i>.mtz`` (with half datasets),
        ``OUT_predictions.parquet`` (every observation's prediction in careless's layout,
        written piece by piece), ``OUT_history.csv``, ``OUT.joblib``, ``OUT.npz``,
        ``OUT_stats.csv``, ``OUT_history.png``, ``OUT_cchalf.png`` (with half datasets
        or a test set) and ``OUT_calibration.png`` (with a test set) as a set
        (:func:`skmerge.io.writers.output_set`). Returns the paths written."""
        from .plotting import plot_calibration, plot_history, plot_statistics
        from .workflow import statistics_table, write_merger

        writers.check_output_prefix(out)
        labels = None if len(self.names) == 1 else self.names
        with writers.output_set(out) as staged:
            paths = []
            for i, (merged, half) in enumerate(zip(self.merged, self.halves or [None] * len(self.merged))):
                paths.append(writers.write_mtz(merged, f"{staged}_{i}.mtz"))
                if half is not None:
                    paths.append(writers.write_mtz(writers.careless_layout(half), f"{staged}_xval_{i}.mtz"))
            paths.append(write_predictions(self.merger, self.observations, f"{staged}_predictions.parquet",
                                           held_out=self.held_out))
            history = writers.history_table(self.merger.loss_curve_)
            paths.append(writers.write_csv(history, f"{staged}_history.csv"))
            paths += write_merger(self.merger, staged)
            paths.append(writers.write_csv(statistics_table(self.statistics), f"{staged}_stats.csv"))
            paths.append(writers.write_figure(plot_history(history), f"{staged}_history.png"))
            if self.halves is not None or self.held_out is not None:
                paths.append(writers.write_figure(plot_statistics(self.statistics, labels), f"{staged}_cchalf.png"))
            if self.calibration:
                paths.append(writers.write_figure(plot_calibration(self.calibration, labels),
                                                  f"{staged}_calibration.png"))
        return [Path(out).parent / Path(path).name for path in paths]


def write_predictions(merger, store, path, *, held_out=None):
    """Write every observation's prediction by a fitted merger as a Parquet file, one
    piece of the store at a time (the columns of ``OUT_predictions_<i>.mtz`` in
    careless's layout), into a temporary name renamed at the end.

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
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .workflow import _observation_predictions

    path = Path(path)
    writer = None
    with writers.atomic_path(path) as temporary:
        try:
            for X, rows in StoreSource(store).chunks():
                test = None if held_out is None else held_out(X["image_id"].to_numpy(), rows)
                table = writers.careless_layout(_observation_predictions(merger, X, test)).reset_index()
                table = pa.table({str(c): table[c].to_numpy() for c in table.columns})
                if writer is None:
                    writer = pq.ParquetWriter(temporary, table.schema)
                writer.write_table(table)
        finally:
            if writer is not None:
                writer.close()
    return path


def run_streamed_merge(store, out, merger, *, read_options, half_datasets, test_fraction, shells, binning, method,
                       report, command):
    """The part of :func:`skmerge.run_merge` that runs for an observation store and a
    merger with ``batch_size``: fit, merge, half-dataset merges, test-set predictions
    and statistics streamed from the store (see the module docstring); outputs as
    :meth:`StreamedMergeResult.write` writes them.

    Examples
    --------
    >>> import skmerge
    >>> result = skmerge.run_merge("runs.parquet", "out/runs", batch_size=32, half_datasets=1,  # doctest: +SKIP
    ...                            test_fraction=0.05, random_state=0)
    """
    from .calibration import calibration_report
    from .model.streaming import check_streamable
    from .workflow import _merged_halves, _observation_predictions, _shells_of, _split_seed, _statistics, parent_files

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

    seed = _split_seed(merger.random_state)
    source, held_out = StoreSource(store), _test_set(test_fraction, seed)
    train = source if held_out is None else source.where(lambda image_id, rows: ~held_out(image_id, rows))
    report("info", f"streaming {manifest['observations']:,} observations of {manifest['reflections']:,} reflections "
           f"on {manifest['images']:,} images from {len(manifest['files'])} file(s) in {os.fspath(store)}, "
           f"{merger.batch_size} images per step" + (f"; {test_fraction:.0%} held out for testing" if test_fraction
                                                     else ""))
    merger.fit(train)
    report("info", f"fitted in {merger.n_iter_} steps" + ("" if merger.converged_ else
           " (the maximum; not converged — raise --iterations)"))
    merged = writers.split_by_file(merger.transform(train), n_sets)
    halves = None
    if half_datasets:
        halves = writers.split_by_file(_merged_halves(merger, store, half_datasets, seed, warn), n_sets)
    predictions = [None] * n_sets
    if held_out is not None:
        # Only the held-out observations' predictions are kept: they are what CCpred and calibration read.
        tested = [_observation_predictions(merger, X, np.ones(len(X), bool)) for X, _ in
                  source.where(held_out).chunks()]
        predictions = writers.split_by_file(rs.concat(tested), n_sets)
    statistics = _statistics(merged, halves or [None] * n_sets, predictions, parent_files(merger, n_sets),
                             shells=shells, binning=binning, method=method)
    calibration = None
    if held_out is not None:
        calibration = [calibration_report(p, _shells_of(stats)) for p, stats in zip(predictions, statistics)]
        for calibrated, name in zip(calibration, names):
            report("info", f"{name}: {calibrated.summary()} (outliers among the held-out observations)")
    result = StreamedMergeResult(merger, Path(store), merged, statistics, names, warnings, command=command,
                                 calibration=calibration, halves=halves, held_out=held_out)
    if out is not None:
        result.paths = result.write(out)
        report("info", "wrote " + ", ".join(p.name for p in result.paths))
    return result


def _test_set(fraction, seed):
    """The test set of ``fraction`` of the observations as a selection of the store
    (:func:`skmerge.workflow.held_out_rows`), or None."""
    from .workflow import held_out_rows

    if not fraction:
        return None
    # One split for every pass over the store, also without a random_state.
    seed = int(np.random.SeedSequence().generate_state(1)[0]) if seed is None else seed
    return lambda image_id, rows: held_out_rows(rows, fraction, seed)
