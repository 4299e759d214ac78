"""What a merge computes and writes after its fit, whether its observations are in
memory (:func:`skmerge.run_merge`) or streamed from a store
(:func:`skmerge.streamed_merge.run_streamed_merge`).

The fitted merger's predictions of observations, its half-dataset merges, the merging
statistics of each data set and the CCdiff parents, the status lines of a fit and of
its calibration, the statistics document ``OUT_stats.json`` and the files every run
writes beside its data files (:func:`write_run_files`: history, merger, statistics,
figures and the HTML report). Both merges call these, so that they report and write
the same things.
"""

import contextlib
import warnings as python_warnings
from numbers import Integral
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.exceptions import ConvergenceWarning

from . import __version__
from .calibration import observation_scores
from .errors import NotSerializableError
from .io import writers
from .model.fitted import MLP_LAYERS, learned_likelihood, prior_of
from .shells import ResolutionShells

__all__ = ["caught_warnings", "dataset_statistics", "fit_messages", "fitted_error_model", "merged_halves",
           "observation_predictions", "parent_files", "report_calibration", "resolution_shells", "split_seed",
           "statistics_document", "statistics_table", "write_merger", "write_run_files"]


def observation_predictions(merger, X, test=None, shadowed=None):
    """The predictions table of the observations X by a fitted merger
    (:func:`skmerge.io.writers.predictions_table`: Ipred, its σ, Z, Weight, the scale and
    its σ), with ``test`` flagging those held out of the fit and ``shadowed`` those left
    out of it for a detector shadow.

    Examples
    --------
    >>> from skmerge.merge_outputs import observation_predictions
    >>> observation_predictions(merger, X)[["Iobs", "Ipred", "Z"]]  # doctest: +SKIP
    """
    ipred, ipred_sd, scale, scale_sd = merger.predict(X, return_std=True, return_scale=True)
    return writers.predictions_table(X, ipred, ipred_sd, *observation_scores(merger, X, ipred, ipred_sd), scale,
                                     scale_sd, test=test, shadowed=shadowed)


def merged_halves(merger, X, n_repeats, seed, warn):
    """:func:`skmerge.half_datasets.half_dataset_merges` of the fitted merger's data X (a
    table or a store), calling ``warn(message)`` when some stopped before converging.

    Examples
    --------
    >>> from skmerge.merge_outputs import merged_halves
    >>> halves = merged_halves(merger, X, 1, 0, print)  # doctest: +SKIP
    """
    from .half_datasets import half_dataset_merges

    with caught_warnings(ConvergenceWarning) as stopped:
        halves = half_dataset_merges(merger, X, n_repeats=n_repeats, random_state=seed, verbose=merger.verbose)
    if stopped:
        warn(f"{len(stopped)} of {2 * n_repeats} half-dataset merges stopped at max_iter={merger.max_iter} "
             "before converging, so CC1/2 and CCanom describe unconverged merges: raise --iterations")
    return halves


def split_seed(random_state):
    """The seed of the test and half-dataset splits for an estimator's random_state.

    Examples
    --------
    >>> from skmerge.merge_outputs import split_seed
    >>> split_seed(3), split_seed(None)
    (3, None)
    """
    if random_state is None or isinstance(random_state, Integral):
        return random_state
    return int(random_state.randint(2**31 - 1))


def resolution_shells(statistics):
    """The resolution shells of a statistics table, so that calibration (and the
    anomalous signal of the report) is given per shell of the merging-statistics table.

    Examples
    --------
    >>> from skmerge.merge_outputs import resolution_shells
    >>> resolution_shells(result.statistics[0]).d_min  # doctest: +SKIP
    """
    table = statistics.table.drop(index="overall")
    limits = np.r_[table["d_max"].to_numpy(np.float64)[:1], table["d_min"].to_numpy(np.float64)]
    return ResolutionShells(limits**-2.0)


def dataset_statistics(merged, halves, predictions, parents, **options):
    """:func:`skmerge.merging_statistics` of each data set, with the half-dataset merges
    of its CCdiff parent (``parents``, :func:`parent_files`).

    Parameters
    ----------
    merged, halves, predictions : list
        One entry per data set (None where there is none).
    parents : list of int or None
    **options
        ``shells``, ``binning``, ``method``.

    Returns
    -------
    list of MergingStatistics

    Examples
    --------
    >>> from skmerge.merge_outputs import dataset_statistics
    >>> statistics = dataset_statistics(merged, halves, predictions, [None], shells=10)  # doctest: +SKIP
    """
    from .stats import merging_statistics

    return [merging_statistics(m, h, p, parent_halves=None if parent is None or h is None else halves[parent],
                               **options)
            for m, h, p, parent in zip(merged, halves, predictions, parents)]


def parent_files(merger, n_sets):
    """The data set each of ``n_sets`` separately merged files is compared with by
    CCdiff: its double-Wilson parent, else the first file (None for the first).

    Examples
    --------
    >>> from skmerge.merge_outputs import parent_files
    >>> parent_files(None, 3)
    [None, 0, 0]
    """
    parents = getattr(prior_of(merger), "parents", None) if merger is not None else None
    if parents is None:
        return [None] + [0] * (n_sets - 1)
    return [p if p is not None and p < n_sets else None for p in list(parents)[:n_sets]] + [None] * (
        n_sets - len(parents))


def fitted_error_model(merger):
    """The fitted error model as ``{"sdfac": ..., "sdadd": ...}``, or None.

    Examples
    --------
    >>> from skmerge.merge_outputs import fitted_error_model
    >>> fitted_error_model(merger)  # doctest: +SKIP
    {'sdfac': 1.12, 'sdadd': 0.03}
    """
    if not merger.error_model:
        return None
    return {"sdfac": float(merger.sdfac_), "sdadd": float(merger.sdadd_)}


def fit_messages(merger):
    """The status lines on a finished fit: its steps and error model, the learned
    likelihood, the scale network's shape, the frame of a rotation series' amplitudes,
    the sandwich ratio of SIGF and its images' scale weights' factors, and the
    double-Wilson r.

    Examples
    --------
    >>> from skmerge.merge_outputs import fit_messages
    >>> fit_messages(merger)[0]  # doctest: +SKIP
    'fitted in 2000 steps'
    """
    error_model = fitted_error_model(merger)
    messages = [f"fitted in {merger.n_iter_} steps" + ("" if merger.converged_ else
                " (the maximum; not converged — raise --iterations)")
                + (f"; error model SdFac {error_model['sdfac']:.3g}, SdAdd {error_model['sdadd']:.3g}"
                   if error_model else "")]
    learned = learned_likelihood(merger)
    if "outlier_fraction" in learned:
        messages.append(f"mixture likelihood: {learned['outlier_fraction']:.2%} of the observations as outliers, "
                        f"{learned['outlier_scale']:.3g} times as wide"
                        + (f", Student-t core with {learned['dof']:.3g} degrees of freedom" if "dof" in learned
                           else "") + " (learned)")
    elif "dof_below" in learned:
        messages.append(f"two-piece Student-t likelihood: {learned['dof_below']:.3g} degrees of freedom below the "
                        f"prediction, {learned['dof_above']:.3g} above (learned)")
    elif learned:
        messages.append(f"Student-t likelihood: {learned['dof']:.3g} degrees of freedom (learned)")
    if merger.mlp_layers == "auto" and getattr(merger, "mlp_layers_", MLP_LAYERS) != MLP_LAYERS:
        messages.append(f"scale network: {merger.mlp_layers_} layers deep (the images are stills)")
    if getattr(merger, "image_layers_", 0):
        messages.append(f"image layers: {merger.image_layers_} of each image's own bend its scale"
                        + (" (the images are stills)" if merger.image_layers == "auto" else ""))
    if getattr(merger, "image_heads_", False):
        messages.append("image heads: each image bends its scale its own way"
                        + (" (the images are stills)" if merger.image_heads == "auto" else ""))
    reference_b = getattr(merger, "reference_b_", 0.0)
    if reference_b:
        messages.append(f"decay: F and I are as the least-decayed images record them, whose scales fall off "
                        f"with B {reference_b:+.3g} Å² against the fit's amplitudes")
    ratio = getattr(merger, "sandwich_ratio_", None)
    if ratio is not None:
        messages.append(f"SIGF: the likelihood's score varies {ratio:.3g} times its curvature (J/H), "
                        + (f"so SIGF is the posterior's SD times {ratio ** 0.5:.3g}" if ratio > 1
                           else "so SIGF is the posterior's SD"))
    own = getattr(merger, "image_weight_ratio_", None)
    if own is not None and len(own):
        median, high = np.quantile(own, [0.5, 0.9])
        messages.append(f"SIGF: the images' own scale weights are uncertain too; the posterior variances are "
                        f"multiplied by {median:.3g} (median) to {high:.3g} (90th percentile) for it, the most "
                        "precisely measured reflections' most")
    prior_r = getattr(merger, "prior_r_", None)
    if prior_r is not None and np.isfinite(prior_r).any():
        messages.append("double-Wilson prior: r " + "; ".join(
            f"file {k} " + " ".join(f"{v:.3f}" for v in row) for k, row in enumerate(prior_r)
            if np.isfinite(row).any()) + (" (learned)" if prior_of(merger).learn_r else " (fixed)"))
    return messages


def report_calibration(calibration, names, report, warn):
    """Give the status line on each data set's calibration as ``report("info", line)``
    and a warning on each image it lists as ``warn(message)``.

    Examples
    --------
    >>> from skmerge.merge_outputs import report_calibration
    >>> report_calibration(result.calibration, result.names, print, print)  # doctest: +SKIP
    """
    for calibrated, name in zip(calibration, names):
        report("info", f"{name}: {calibrated.summary()}")
        for image_id, row in calibrated.flagged.iterrows():
            warn(f"{name}: image_id {image_id} ({row['n_obs']} observations) looks bad: {row['reason']}")


def statistics_table(statistics):
    """The statistics tables of several data sets stacked, with a ``data_set`` column:
    the content of ``OUT_stats.csv``.

    Examples
    --------
    >>> from skmerge.merge_outputs import statistics_table
    >>> statistics_table(result.statistics).columns[:3].tolist()  # doctest: +SKIP
    ['data_set', 'shell', 'd_max']
    """
    tables = []
    for i, stats in enumerate(statistics):
        table = stats.table.reset_index()
        table.insert(0, "data_set", i)
        tables.append(table)
    return pd.concat(tables, ignore_index=True)


def statistics_document(result):
    """The content of ``OUT_stats.json`` for a merge's result (a
    :class:`~skmerge.workflow.MergeResult` or
    :class:`~skmerge.streamed_merge.StreamedMergeResult`): the run, and each data set's
    statistics and calibration, the error model, the CCdiff parents, the learned
    likelihood, whether the images had heads, the scale network's shape, the sandwich
    ratio of SIGF, the median and 90th percentile of its images' scale weights'
    factors, and the double-Wilson r.

    Examples
    --------
    >>> from skmerge.merge_outputs import statistics_document
    >>> statistics_document(result)["datasets"][0]["name"]  # doctest: +SKIP
    'hypf_unmerged.mtz'
    """
    from .report import run_info

    merger = result.merger
    document = {
        "skmerge_version": __version__,
        "run": {**run_info(result.command, merger), "warnings": list(result.warnings)},
        "datasets": [{"index": i, "name": name, **s.to_dict(), "calibration": c.to_dict()}
                     for i, (s, name, c) in enumerate(zip(result.statistics, result.names, result.calibration))],
    }
    error_model = fitted_error_model(merger)
    if error_model is not None:
        document["error_model"] = error_model
    if getattr(result, "shadow", None) is not None:
        document["shadow"] = result.shadow.to_dict()
    if len(result.statistics) > 1:
        document["parents"] = parent_files(merger, len(result.statistics))
    learned = learned_likelihood(merger)
    if learned:
        document["likelihood"] = learned
    if hasattr(merger, "image_heads_"):
        document["image_heads"] = bool(merger.image_heads_)
    for name in ("mlp_layers", "image_layers"):
        if hasattr(merger, f"{name}_"):
            document[name] = int(getattr(merger, f"{name}_"))
    if hasattr(merger, "sandwich_ratio_"):
        document["sandwich_ratio"] = float(merger.sandwich_ratio_)
    if getattr(merger, "reference_b_", 0.0):
        document["reference_b"] = float(merger.reference_b_)
    for name in ("image_weight_ratio", "image_scale_variance"):
        values = getattr(merger, f"{name}_", None)
        if values is not None and len(values):
            document[name] = {"median": float(np.median(values)), "p90": float(np.quantile(values, 0.9))}
    prior_r = getattr(merger, "prior_r_", None)
    if prior_r is not None and np.isfinite(prior_r).any():
        document["prior_r"] = [[None if np.isnan(v) else float(v) for v in row] for row in prior_r]
    return document


def write_merger(merger, out):
    """Write a fitted merger as ``OUT.joblib`` and, unless it holds what only joblib
    stores (a transformer of the user's: a warning says so), ``OUT.npz``; returns the
    paths written.

    Examples
    --------
    >>> from skmerge.merge_outputs import write_merger
    >>> write_merger(merger, "out/hypf")  # doctest: +SKIP
    [PosixPath('out/hypf.joblib'), PosixPath('out/hypf.npz')]
    """
    paths = [writers.write_joblib(merger, f"{out}.joblib")]
    try:
        paths.append(merger.save(f"{out}.npz"))
    except NotSerializableError as exc:
        python_warnings.warn(f"{exc} ({Path(out).name}.npz not written)", UserWarning, stacklevel=5)
    return paths


def write_run_files(result, out, *, correlations):
    """Write the files of a merge's result that do not hold its data under the prefix
    ``out``: ``OUT_history.csv``, ``OUT_reindexing.csv`` (when the indexing was
    ambiguous), ``OUT.joblib``, ``OUT.npz``, ``OUT_stats.csv``, ``OUT_stats.json``,
    ``OUT_history.png``, ``OUT_cchalf.png`` (when ``correlations``: half datasets or a
    test set), ``OUT_calibration.png``, ``OUT_shadow.png`` (when the merge left out a
    detector shadow: :func:`skmerge.plotting.plot_shadow`) and ``OUT_report.html``
    (:mod:`skmerge.report`; a warning replaces it when it cannot be made). Returns the
    paths written, in that order.

    Examples
    --------
    >>> from skmerge.merge_outputs import write_run_files
    >>> paths = write_run_files(result, "out/hypf", correlations=True)  # doctest: +SKIP
    """
    from .plotting import plot_calibration, plot_history, plot_shadow, plot_statistics
    from .report import report_html

    merger = result.merger
    paths = []
    history = writers.history_table(merger.loss_curve_, getattr(merger, "held_out_loss_curve_", None))
    paths.append(writers.write_csv(history, f"{out}_history.csv"))
    if len(merger.reindexing_operators_) > 1:
        paths.append(writers.write_csv(merger.image_reindexing().reset_index(), f"{out}_reindexing.csv"))
    paths += write_merger(merger, out)
    paths.append(writers.write_csv(statistics_table(result.statistics), f"{out}_stats.csv"))
    paths.append(writers.write_json(statistics_document(result), f"{out}_stats.json"))
    paths.append(writers.write_figure(plot_history(history), f"{out}_history.png"))
    labels = None if len(result.names) == 1 else result.names
    if correlations:
        paths.append(writers.write_figure(plot_statistics(result.statistics, labels), f"{out}_cchalf.png"))
    paths.append(writers.write_figure(plot_calibration(result.calibration, labels), f"{out}_calibration.png"))
    if getattr(result, "shadow", None) is not None:
        observations = writers.split_by_file(result.observations, len(result.predictions))
        ipred = np.concatenate([p["Ipred"].to_numpy(np.float64) for p in result.predictions])
        paths.append(writers.write_figure(plot_shadow(result.shadow, pd.concat(observations), ipred),
                                          f"{out}_shadow.png"))
    try:
        page = report_html(result, title=Path(out).name)
    except Exception as exc:  # a figure that cannot be drawn must not cost the merge
        python_warnings.warn(f"the report could not be made ({type(exc).__name__}: {exc}); "
                             f"{Path(out).name}_report.html not written", UserWarning, stacklevel=4)
    else:
        paths.append(writers.write_text(page, f"{out}_report.html"))
    return paths


@contextlib.contextmanager
def caught_warnings(category):
    """Collect the warnings of ``category`` raised inside the block (their messages, in
    the list it yields) instead of showing them; other warnings pass on.

    Examples
    --------
    >>> import warnings
    >>> from skmerge.merge_outputs import caught_warnings
    >>> with caught_warnings(UserWarning) as caught:
    ...     warnings.warn("look")
    >>> caught
    ['look']
    """
    caught = []
    with python_warnings.catch_warnings(record=True) as raised:
        python_warnings.simplefilter("always", category)
        yield caught
    for w in raised:
        if issubclass(w.category, category):
            caught.append(str(w.message))
        else:
            python_warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
