"""``skmerge mono STORE`` with minibatches: the merge of an observation store that never
holds its observations in memory.

:func:`skmerge.run_merge` hands an observation store here when the merger draws
minibatches (``batch_size``, ``--batch-size``): the fit streams from the store
(:mod:`skmerge.model.streaming`), the merged table comes from a pass over it, and the
predictions are written piece by piece into a Parquet file. Half-dataset merges and a
test set are not streamed (they refit or hold out parts of the table), nor are the
calibration report and the HTML report, which read every prediction at once.
"""

import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ParameterError
from .io import writers
from .store import iter_store_chunks, read_manifest

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
        Without CC1/2, CCanom and CCpred (no half datasets, no test set).
    names : list of str
    warnings : list of str
    command : str, optional
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

    def write(self, out):
        """Write ``OUT_<i>.mtz``, ``OUT_predictions.parquet`` (every observation's
        prediction in careless's layout, written piece by piece), ``OUT_history.csv``,
        ``OUT.joblib``, ``OUT.npz``, ``OUT_stats.csv`` and ``OUT_history.png`` as a set
        (:func:`skmerge.io.writers.output_set`). Returns the paths written."""
        from .plotting import plot_history
        from .workflow import statistics_table, write_merger

        writers.check_output_prefix(out)
        with writers.output_set(out) as staged:
            paths = [writers.write_mtz(merged, f"{staged}_{i}.mtz") for i, merged in enumerate(self.merged)]
            paths.append(write_predictions(self.merger, self.observations, f"{staged}_predictions.parquet"))
            history = writers.history_table(self.merger.loss_curve_)
            paths.append(writers.write_csv(history, f"{staged}_history.csv"))
            paths += write_merger(self.merger, staged)
            paths.append(writers.write_csv(statistics_table(self.statistics), f"{staged}_stats.csv"))
            paths.append(writers.write_figure(plot_history(history), f"{staged}_history.png"))
        return [Path(out).parent / Path(path).name for path in paths]


def write_predictions(merger, store, path):
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

    from .calibration import observation_scores

    path = Path(path)
    writer = None
    with writers.atomic_path(path) as temporary:
        try:
            for X, _ in iter_store_chunks(store, mtz_dtypes=False):
                ipred, ipred_sd, scale, scale_sd = merger.predict(X, return_std=True, return_scale=True)
                table = writers.careless_layout(writers.predictions_table(
                    X, ipred, ipred_sd, *observation_scores(merger, X, ipred, ipred_sd), scale, scale_sd))
                table = table.reset_index()
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
    merger with ``batch_size``: fit, merge and statistics streamed from the store;
    outputs as :meth:`StreamedMergeResult.write` writes them."""
    from .model.streaming import check_streamable
    from .stats import merging_statistics

    for name, given, flag in (("half_datasets", half_datasets, "--merge-half-datasets"),
                              ("test_fraction", test_fraction, "--test-fraction")):
        if given:
            raise ParameterError(f"{name} ({flag}) is not streamed from an observation store: merge the store in "
                                 "memory (without batch_size, --batch-size) or leave it out.")
    if read_options:
        raise ParameterError(f"{', '.join(read_options)}: the observation store {store} was written with its own "
                             "read options; convert the reflection files again to change them.")
    check_streamable(merger)
    manifest = read_manifest(store)
    names = [Path(entry["name"]).name for entry in manifest["files"]]
    n_sets = len(names) if merger.separate_files else 1
    if n_sets == 1:
        names = [", ".join(names)]
    report("info", f"streaming {manifest['observations']:,} observations of {manifest['reflections']:,} reflections "
           f"on {manifest['images']:,} images from {len(manifest['files'])} file(s) in {os.fspath(store)}, "
           f"{merger.batch_size} images per step")
    merger.fit(store)
    report("info", f"fitted in {merger.n_iter_} steps" + ("" if merger.converged_ else
           " (the maximum; not converged — raise --iterations)"))
    merged = writers.split_by_file(merger.transform(store), n_sets)
    statistics = [merging_statistics(m, shells=shells, binning=binning, method=method) for m in merged]
    result = StreamedMergeResult(merger, Path(store), merged, statistics, names, command=command)
    if out is not None:
        result.paths = result.write(out)
        report("info", "wrote " + ", ".join(p.name for p in result.paths))
    return result
