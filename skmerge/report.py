"""The HTML report of a merge: ``OUT_report.html`` and ``skmerge report OUT``.

One self-contained file a crystallographer reads after every merge, as after dials.scale
or AIMLESS: the command and versions, the per-shell table, CC1/2, CCanom, CCpred and
CCdiff, I/σ and completeness, a Wilson plot, the per-image scale, CCpred and outliers
with the listed images marked, the loss curves, the calibration of the held-out
observations and the anomalous signal. Figures are PNG images embedded as ``data:`` URIs
and the style sheet is inline, so the file opens in any browser without a network.

The report is made from a finished merge (:class:`~skmerge.workflow.MergeResult`, what
``skmerge mono`` and ``skmerge poly`` write, or a streamed merge's
:class:`~skmerge.streamed_merge.StreamedMergeResult`, whose per-image numbers were
gathered piece by piece) or from a run's files under its output prefix, skmerge's or
careless's (``OUT_<i>.mtz``, ``OUT_predictions_<i>.mtz``, ``OUT_xval_<i>.mtz``,
``OUT_history.csv``, ``OUT_stats.json``): sections whose inputs are missing say so
instead of a figure.
"""

import base64
import html
import io
import platform
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd

from . import __version__
from .errors import InputError

__all__ = ["RunOutputs", "anomalous_signal", "image_table", "register", "report_html", "run_info",
           "with_image_calibration", "write_report"]
_FIGURE_DPI = 90
# Distributions whose versions the report gives; the first installed name of each entry.
_PACKAGES = {
    "TensorFlow": ("tensorflow", "tensorflow-cpu", "tf-nightly"),
    "TensorFlow Probability": ("tensorflow-probability", "tfp-nightly"),
    "reciprocalspaceship": ("reciprocalspaceship",),
    "gemmi": ("gemmi",),
    "NumPy": ("numpy",),
    "scikit-learn": ("scikit-learn",),
}


def run_info(command=None, merger=None):
    """What the report says of how a run was made: its command line, the estimator and
    the versions of skmerge, Python and the libraries that ran it (saved in
    ``OUT_stats.json`` under ``run``, so that a later report of the files gives them).

    Parameters
    ----------
    command : str, optional
        The command line (None for a run from Python).
    merger : VariationalMerger, optional
        The fitted estimator; its parameters that differ from the defaults are given.

    Returns
    -------
    dict
        ``command``, ``estimator`` (repr of ``merger`` or None), ``versions``
        (name → version, "not installed" when missing) and ``date`` (UTC, ISO 8601).

    Examples
    --------
    >>> from skmerge.report import run_info
    >>> info = run_info("skmerge mono dHKL in.mtz out/x")
    >>> info["command"], sorted(info["versions"])[:3]
    ('skmerge mono dHKL in.mtz out/x', ['NumPy', 'Python', 'TensorFlow'])
    """
    versions = {"skmerge": __version__, "Python": platform.python_version()}
    for name, distributions in _PACKAGES.items():
        versions[name] = next((v for v in map(_installed_version, distributions) if v), "not installed")
    return {"command": command, "estimator": None if merger is None else repr(merger), "versions": versions,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _installed_version(distribution):
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------- inputs
@dataclass
class RunOutputs:
    """What a report shows of a run, one entry per data set in the lists.

    Attributes
    ----------
    names : list of str
        The data sets' names.
    statistics : list of MergingStatistics or None
    calibration : list of Calibration or None
        None for a data set without a ``Z`` column (careless's outputs).
    merged : list of rs.DataSet or None
        The merged data (``OUT_<i>.mtz``).
    predictions : list of DataFrame or None
        Per observation: Iobs, SIGIobs, Ipred, image_id, [Scale, Z, test]
        (``OUT_predictions_<i>.mtz``).
    history : DataFrame or None
        The loss terms per step (``OUT_history.csv``: a ``step`` column and one column
        per term; careless's ``_val`` columns are the validation set's).
    run : dict
        :func:`run_info` of the run; empty when the run did not record it.
    warnings : list of str
        The diagnostics the run gave (saved with ``run`` in ``OUT_stats.json``).
    producer : str
        "skmerge" or "careless" (files without skmerge's ``OUT_stats.json``).
    reindexing : DataFrame or None
        Each image's operator and probability when the indexing was ambiguous
        (:meth:`VariationalMerger.image_reindexing <skmerge.VariationalMerger.image_reindexing>`,
        ``OUT_reindexing.csv``).
    images : list of DataFrame or None
        Per data set, its :func:`image_table` made beforehand (a streamed merge's, whose
        predictions are not in memory); None makes it from ``predictions``.
    """

    names: list
    statistics: list
    calibration: list
    merged: list
    predictions: list
    history: object = None
    run: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
    producer: str = "skmerge"
    reindexing: object = None
    images: list = None

    @classmethod
    def from_result(cls, result):
        """The outputs of a merge (:func:`skmerge.run_merge`): a
        :class:`~skmerge.workflow.MergeResult`, or a
        :class:`~skmerge.streamed_merge.StreamedMergeResult` with its per-image tables
        in place of the predictions."""
        from .io.writers import history_table

        merger = result.merger
        reindexing = merger.image_reindexing() if len(merger.reindexing_operators_) > 1 else None
        images = getattr(result, "images", None)
        predictions = [None] * len(result.names) if images is not None else list(result.predictions)
        return cls(list(result.names), list(result.statistics), list(result.calibration), list(result.merged),
                   predictions, history_table(merger.loss_curve_), run_info(result.command, merger),
                   list(result.warnings), reindexing=reindexing, images=images)

    @classmethod
    def from_files(cls, out):
        """The outputs of a finished run under the prefix ``out``, skmerge's or careless's.

        Raises
        ------
        InputError
            When there is no run's file under ``out``, or one is not readable.
        """
        from .calibration import Calibration
        from .stats import MergingStatistics
        from .workflow import _read_mtz, _run_indices, calibration_from_outputs, statistics_from_outputs

        merged_indices = _run_indices(out)
        prefix = Path(out)
        pattern = re.compile(re.escape(prefix.name) + r"_predictions_(\d+)\.mtz$")
        predicted = {int(m.group(1)) for p in prefix.parent.iterdir() if (m := pattern.match(p.name))}
        document = _saved_document(out)
        history_path = Path(f"{out}_history.csv")
        if not (merged_indices or predicted or document or history_path.is_file()):
            raise InputError(f"no outputs of a run under {str(out)!r} (looked for {prefix.name}_0.mtz, "
                             f"{prefix.name}_predictions_0.mtz, {prefix.name}_history.csv and "
                             f"{prefix.name}_stats.json); give the OUT prefix of a skmerge or careless run")
        saved = document["datasets"] if document else []
        indices = sorted(set(merged_indices) | predicted | set(range(len(saved))))
        if saved:
            statistics = [MergingStatistics.from_dict(d) for d in saved]
            names = [d.get("name") or f"data set {i}" for i, d in enumerate(saved)]
            calibration = [Calibration.from_dict(d["calibration"]) if "calibration" in d else None for d in saved]
        elif merged_indices:
            statistics, names = statistics_from_outputs(out)
            calibration = calibration_from_outputs(out, statistics)
        else:
            statistics, names, calibration = None, [f"{prefix.name}_{i}" for i in indices], [None] * len(indices)
        history = None
        if history_path.is_file():
            try:
                history = pd.read_csv(history_path)
            except (OSError, ValueError) as exc:
                raise InputError(f"{history_path}: not a readable history table ({exc})") from exc
        run = (document or {}).get("run") or {}
        reindexing_path = Path(f"{out}_reindexing.csv")
        reindexing = None
        if reindexing_path.is_file():
            try:
                reindexing = pd.read_csv(reindexing_path, index_col="image_id")
            except (OSError, ValueError) as exc:
                raise InputError(f"{reindexing_path}: not a readable reindexing table ({exc})") from exc
        return cls(names, statistics, calibration, [_read_mtz(f"{out}_{i}.mtz", merged=True) for i in indices],
                   [_read_mtz(f"{out}_predictions_{i}.mtz") for i in indices], history, run,
                   list(run.get("warnings", [])), producer="skmerge" if document else "careless",
                   reindexing=reindexing)


def _saved_document(out):
    """The content of ``OUT_stats.json``, or None when the run left none."""
    from .workflow import _from_saved

    if not Path(f"{out}_stats.json").is_file():
        return None
    return _from_saved(out, lambda document: {**document, "datasets": list(document["datasets"])})


# --------------------------------------------------------------------- the report
def report_html(source, *, title=None):
    """The HTML report of a merge.

    Parameters
    ----------
    source : MergeResult, RunOutputs, str or Path
        A merge in memory, its outputs, or the output prefix OUT of a finished run
        (skmerge's or careless's files, :meth:`RunOutputs.from_files`).
    title : str, optional
        The page's title (default: the prefix's name, or "skmerge report").

    Returns
    -------
    str
        A complete HTML document with every figure embedded.

    Examples
    --------
    >>> from skmerge.report import report_html
    >>> page = report_html("out/hypf")  # doctest: +SKIP
    """
    if isinstance(source, (str, Path)):
        title = title or Path(source).name
        source = RunOutputs.from_files(source)
    elif not isinstance(source, RunOutputs):
        source = RunOutputs.from_result(source)
    sections = [
        ("run", "Run", _run_section(source)),
        ("statistics", "Merging statistics", _statistics_section(source)),
        ("correlations", "CC1/2, CCanom, CCpred and CCdiff", _correlation_section(source)),
        ("signal", "I/σ(I) and completeness", _signal_section(source)),
        ("wilson", "Wilson plot", _wilson_section(source)),
        ("images", "Per-image scale, CCpred and outliers", _image_section(source)),
        ("history", "Loss curves", _history_section(source)),
        ("calibration", "Calibration of held-out observations", _calibration_section(source)),
        ("anomalous", "Anomalous signal", _anomalous_section(source)),
    ]
    if source.reindexing is not None:
        sections.append(("reindexing", "Indexing ambiguity", _reindexing_section(source.reindexing)))
    title = html.escape(f"skmerge report: {title}" if title else "skmerge report")
    body = "\n".join(f'<section id="{key}"><h2>{html.escape(name)}</h2>\n{content}\n</section>'
                     for key, name, content in sections)
    contents = " · ".join(f'<a href="#{key}">{html.escape(name)}</a>' for key, name, _ in sections)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{title}</title>\n'
            f"<style>{_STYLE}</style>\n</head>\n<body>\n<h1>{title}</h1>\n<nav>{contents}</nav>\n{body}\n"
            "</body>\n</html>\n")


def write_report(source, path, *, title=None):
    """Write :func:`report_html` of ``source`` to ``path``, atomically.

    Returns
    -------
    Path

    Examples
    --------
    >>> from skmerge.report import write_report
    >>> write_report("out/hypf", "out/hypf_report.html")  # doctest: +SKIP
    PosixPath('out/hypf_report.html')
    """
    from .io.writers import write_text

    return write_text(report_html(source, title=title), path)


_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:72em;margin:1em auto;padding:0 1em;
color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
nav{font-size:.9em;line-height:1.6}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
th,td{padding:.15em .6em;text-align:right;border-bottom:1px solid #e4e4e4}
th{background:#f2f2f2}tr.overall td{font-weight:bold;border-top:2px solid #999}
td.text,th.text{text-align:left}
pre{background:#f7f7f7;padding:.5em;overflow-x:auto;font-size:.85em}
p.note{color:#555;font-style:italic}p.warning{color:#8a4b00}
img{max-width:100%;height:auto}
"""


def _note(text):
    return f'<p class="note">{html.escape(text)}</p>'


def _figure(figure, alt):
    """A matplotlib Figure as an <img> with the PNG embedded."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=_FIGURE_DPI)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _table(frame, formats, index_name=None):
    """A DataFrame as an HTML table, with ``formats`` (column → format string) and an
    ``overall`` row set apart."""
    columns = [c for c in frame.columns if c in formats]
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in ([index_name] if index_name else []) + columns)
    rows = []
    for label, row in frame.iterrows():
        cells = [f"<td>{html.escape(str(label))}</td>"] if index_name else []
        for c in columns:
            value = row[c]
            if isinstance(value, str):
                cells.append(f'<td class="text">{html.escape(value)}</td>')
            elif value is None or np.isnan(value):
                cells.append("<td>–</td>")
            elif np.isinf(value):
                cells.append("<td>∞</td>")
            else:
                cells.append(f"<td>{formats.get(c, '{}').format(value)}</td>")
        rows.append(f'<tr{" class=overall" if label == "overall" else ""}>{"".join(cells)}</tr>')
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _labels(outputs):
    return None if len(outputs.names) == 1 else list(outputs.names)


# ------------------------------------------------------------------------- sections
def _run_section(outputs):
    run = outputs.run
    parts = []
    if run.get("command"):
        parts.append(f"<p>Command:</p><pre>{html.escape(run['command'])}</pre>")
    elif run.get("estimator"):
        parts.append(f"<p>Run from Python (<code>skmerge.run_merge</code>) with</p><pre>"
                     f"{html.escape(run['estimator'])}</pre>")
    else:
        parts.append(_note(f"The run did not record its command line ({outputs.producer} outputs)."))
    if run.get("versions"):
        versions = pd.DataFrame({"version": list(run["versions"].values())}, index=list(run["versions"]))
        parts.append(f"<p>Versions{' (run on ' + html.escape(run['date']) + ')' if run.get('date') else ''}:</p>"
                     + _table(versions, {"version": "{}"}, "package"))
    else:
        parts.append(_note(f"The run did not record its versions; this report was made with skmerge {__version__}."))
    parts.append("<p>Data sets: " + ", ".join(f"{i}: {html.escape(str(n))}" for i, n in enumerate(outputs.names))
                 + "</p>")
    parts.extend(f'<p class="warning">warning: {html.escape(w)}</p>' for w in outputs.warnings)
    return "\n".join(parts)


# The statistics table's columns: heading and format.
_STATISTICS_COLUMNS = {
    "d_max": ("d_max (Å)", "{:.2f}"), "d_min": ("d_min (Å)", "{:.2f}"), "n_obs": ("#obs", "{:,.0f}"),
    "n_unique": ("#unique", "{:,.0f}"), "multiplicity": ("mult.", "{:.1f}"),
    "completeness": ("compl. %", "{:.1%}"), "anom_completeness": ("anom. compl. %", "{:.1%}"),
    "mean_isigi": ("⟨I/σI⟩", "{:.1f}"), "cc_half": ("CC1/2", "{:.3f}"), "cc_anom": ("CCanom", "{:.3f}"),
    "cc_diff": ("CCdiff", "{:.3f}"), "cc_pred": ("CCpred", "{:.3f}"),
}


def _statistics_section(outputs):
    if not outputs.statistics:
        return _note("No merged data set (OUT_<i>.mtz) nor OUT_stats.json: no statistics table.")
    parts = []
    for i, (stats, name) in enumerate(zip(outputs.statistics, outputs.names)):
        table = stats.table[[c for c in _STATISTICS_COLUMNS if c in stats.table.columns]]
        table = table.rename(columns={c: heading for c, (heading, _) in _STATISTICS_COLUMNS.items()})
        formats = dict(_STATISTICS_COLUMNS.values())
        parts.append(f"<h3>Data set {i}: {html.escape(str(name))}</h3><p>{html.escape(stats.header())}</p>"
                     + _table(table, formats, "shell"))
        parts.extend(_note(n) for n in stats.notes)
    return "\n".join(parts)


def _correlation_section(outputs):
    from .plotting import plot_statistics

    if not outputs.statistics or not any(
            c in s.table.columns for s in outputs.statistics for c in ("cc_half", "cc_anom", "cc_pred", "cc_diff")):
        return _note("No half-dataset merges (OUT_xval_<i>.mtz, --merge-half-datasets) nor held-out observations "
                     "(--test-fraction): no CC1/2, CCanom, CCdiff or CCpred.")
    text = ("<p>CC1/2 and CCanom: correlation between half-dataset merges; CCpred: of the held-out observations "
            "with their predictions; CCdiff: of the difference from the parent data set between halves.</p>")
    return text + _figure(plot_statistics(outputs.statistics, _labels(outputs)), "CC against resolution")


def _signal_section(outputs):
    from .plotting import plot_signal

    if not outputs.statistics:
        return _note("No statistics table: no I/σ(I) or completeness.")
    return _figure(plot_signal(outputs.statistics, _labels(outputs)), "I/sigma and completeness against resolution")


def _wilson_section(outputs):
    from .analysis import WILSON_D_MAX, wilson_b
    from .plotting import plot_wilson

    fits, notes = {}, []
    for name, merged in zip(outputs.names, outputs.merged):
        if merged is None:
            continue
        try:
            fits[name] = wilson_b(merged)
        except InputError as exc:
            notes.append(f"{name}: {exc}")
    if not fits:
        return _note("No Wilson plot: " + ("; ".join(notes) or "no merged data set (OUT_<i>.mtz)") + ".")
    text = ("<p>ln⟨I/ε⟩ against 1/d² in equal-count shells (skmerge bfactor); the line is fitted at d &lt; "
            f"{WILSON_D_MAX:g} Å and gives the apparent B (Å²) on the merged, unscaled-to-absolute intensities.</p>")
    return text + "".join(_note(n) for n in notes) + _figure(plot_wilson(fits), "Wilson plot")


def image_table(predictions, calibration=None):
    """Per-image numbers of a data set: observations, scale, CCpred and outliers.

    Parameters
    ----------
    predictions : DataFrame
        Per observation: Iobs, SIGIobs (or careless's SigIobs), Ipred, image_id, and
        Scale when the run wrote it.
    calibration : Calibration, optional
        Its per-image outlier counts and the images it lists.

    Returns
    -------
    DataFrame
        Indexed by image_id: n_obs, cc_pred (the 1/σ²-weighted correlation of Iobs with
        Ipred over every observation of the image, fitted and held out), [scale,
        n_outliers], reason (why the run lists the image; "" if it does not).

    Examples
    --------
    >>> import pandas as pd
    >>> from skmerge.report import image_table
    >>> predictions = pd.DataFrame({"Iobs": [1.0, 2, 3, 3, 2, 1], "SIGIobs": 1.0, "Ipred": [1.0, 2, 3, 1, 2, 3],
    ...                             "image_id": [0, 0, 0, 1, 1, 1]})
    >>> image_table(predictions)["cc_pred"].round(3).tolist()
    [1.0, -1.0]
    """
    from .shells import correlation
    from .stats import standardise_columns

    predictions, _ = standardise_columns(predictions, "predictions")
    for needed in ("Iobs", "Ipred", "image_id"):
        if needed not in predictions.columns:
            raise InputError(f"the predictions table has no column {needed!r}; per-image CCpred needs Iobs, Ipred "
                             "and image_id")
    image = predictions["image_id"].to_numpy(np.int64)
    iobs, ipred = predictions["Iobs"].to_numpy(np.float64), predictions["Ipred"].to_numpy(np.float64)
    weight = (predictions["SIGIobs"].to_numpy(np.float64) ** -2.0 if "SIGIobs" in predictions.columns
              else np.ones(len(image)))
    rows = pd.Series(image).groupby(image, sort=True).indices
    table = pd.DataFrame({
        "n_obs": [len(r) for r in rows.values()],
        "cc_pred": [correlation(iobs[r], ipred[r], "pearson", weight[r]) for r in rows.values()],
    }, index=pd.Index(list(rows), name="image_id"))
    if "Scale" in predictions.columns:
        table["scale"] = pd.Series(predictions["Scale"].to_numpy(np.float64)).groupby(image).median()
    return with_image_calibration(table, calibration)


def with_image_calibration(table, calibration=None):
    """An :func:`image_table` (made, say, piece by piece of a data set's images and put
    together) with the scale, outlier counts and listed images of the data set's
    calibration; without one, its ``reason`` column empty.

    Examples
    --------
    >>> import pandas as pd
    >>> from skmerge.report import with_image_calibration
    >>> table = pd.DataFrame({"n_obs": [3], "cc_pred": [0.5]}, index=pd.Index([7], name="image_id"))
    >>> with_image_calibration(table)["reason"].tolist()
    ['']
    """
    table = table.copy()
    if calibration is not None:
        images = calibration.images.reindex(table.index)
        table["scale"] = images["scale"]
        table["n_outliers"] = images["n_outliers"]
        table["reason"] = images["reason"].fillna("")
    if "reason" not in table.columns:
        table["reason"] = ""
    return table


_IMAGE_HEADINGS = {"n_obs": "#obs", "cc_pred": "CCpred", "scale": "scale", "n_outliers": "#outliers",
                   "reason": "why listed"}
_IMAGE_FORMATS = dict(zip(_IMAGE_HEADINGS.values(), ("{:,.0f}", "{:.3f}", "{:.3g}", "{:,.0f}", "{}")))


def _image_section(outputs):
    from .plotting import plot_images

    tables, notes = {}, []
    made = outputs.images or [None] * len(outputs.names)
    for name, predictions, calibration, table in zip(outputs.names, outputs.predictions, outputs.calibration, made):
        if table is not None:
            tables[name] = table
        elif predictions is not None:
            tables[name] = image_table(predictions, calibration)
        elif calibration is not None:
            tables[name] = calibration.images.assign(cc_pred=np.nan)
            notes.append(f"{name}: no predictions file (OUT_predictions_<i>.mtz): no per-image CCpred.")
    if not tables:
        return _note("No predictions file (OUT_predictions_<i>.mtz) nor OUT_stats.json: no per-image numbers.")
    if all(c is None for c in outputs.calibration):
        notes.append("The predictions have no Z column (careless's outputs): no scale, outlier counts or listed "
                     "images, only the per-image CCpred.")
    parts = [_figure(plot_images(tables), "per-image scale, CCpred and outliers"), *map(_note, notes)]
    for name, table in tables.items():
        listed = table[table["reason"] != ""]
        prefix = f"{html.escape(str(name))}: " if len(tables) > 1 else ""
        if len(listed):
            parts.append(f"<p>{prefix}{len(listed)} of {len(table)} images listed (marked × above):</p>"
                         + _table(listed.rename(columns=_IMAGE_HEADINGS), _IMAGE_FORMATS, "image_id"))
        elif "n_outliers" in table.columns:
            parts.append(f"<p>{prefix}no image listed of {len(table)}.</p>")
    return "\n".join(parts)


def _history_section(outputs):
    from .plotting import plot_history

    if outputs.history is None:
        return _note("No training history (OUT_history.csv).")
    return _figure(plot_history(outputs.history), "loss curves")


def _calibration_section(outputs):
    from .plotting import plot_calibration, plot_coverage

    held_out = [(name, c) for name, c in zip(outputs.names, outputs.calibration) if c is not None and c.n_test]
    if not held_out:
        return _note("No observations were held out of the fit (--test-fraction), or the predictions have no Z "
                     "column: no calibration.")
    names = [name for name, _ in held_out]
    reports = [c for _, c in held_out]
    labels = names if len(names) > 1 else None
    headings = {"n_test": "#held out", "z_mean": "⟨z⟩", "z_sd": "SD(z)", "coverage_68": "in 68 % interval",
                "coverage_95": "in 95 % interval"}
    overall = pd.DataFrame([c.shells.loc["overall", list(headings)] for c in reports], index=names)
    formats = dict(zip(headings.values(), ("{:,.0f}", "{:.2f}", "{:.2f}", "{:.1%}", "{:.1%}")))
    text = ("<p>z = (Iobs − Ipred)/σpred of the observations held out of the fit: with honest uncertainties "
            "its SD is 1 and the intervals Ipred ± σpred and ± 1.96 σpred hold 68 % and 95 % of them.</p>")
    return (text + _table(overall.rename(columns=headings), formats, "data set")
            + _figure(plot_calibration(reports, labels), "z histogram")
            + _figure(plot_coverage(reports, labels), "interval coverage against resolution")
            + "".join(f"<pre>{html.escape(c.to_string(title=str(name)))}</pre>" for name, c in held_out))


def anomalous_signal(merged, statistics):
    """Mean ``|ΔF|/σ(ΔF)`` per resolution shell of an anomalous merged data set, over the
    acentric reflections with both Friedel mates, in the shells of its statistics table
    (DANO and SIGDANO of a variational merge are the posterior's mean and SD, so pure
    noise gives less than the 0.8 of unbiased differences: compare the shells with one
    another, where the signal fades towards high resolution).

    Parameters
    ----------
    merged : rs.DataSet
        With DANO and SIGDANO, or Friedel columns F(±), SIGF(±) (careless's layout).
    statistics : MergingStatistics
        The data set's table, for the shells.

    Returns
    -------
    DataFrame or None
        One row per shell (then ``overall``): d_max, d_min, n, dano_sigma. None when
        ``merged`` holds no anomalous differences.

    Examples
    --------
    >>> import gemmi
    >>> import reciprocalspaceship as rs
    >>> from skmerge.report import anomalous_signal
    >>> from skmerge.stats import merging_statistics
    >>> cell, sg = gemmi.UnitCell(30, 30, 30, 90, 90, 90), gemmi.SpaceGroup("P 1")
    >>> hkl = rs.utils.generate_reciprocal_asu(cell, sg, 4.0)
    >>> merged = rs.DataSet({"H": hkl[:, 0], "K": hkl[:, 1], "L": hkl[:, 2], "I": 100.0, "SIGI": 10.0, "N": 2,
    ...                      "DANO": 3.0, "SIGDANO": 1.5}, cell=cell, spacegroup=sg).set_index(["H", "K", "L"])
    >>> anomalous_signal(merged, merging_statistics(merged, shells=2))["dano_sigma"].tolist()
    [2.0, 2.0, 2.0]
    """
    from .merge_outputs import resolution_shells
    from .stats import standardise_columns

    merged, _ = standardise_columns(merged, "merged")
    if "DANO" not in merged.columns or "SIGDANO" not in merged.columns:
        return None
    dano = merged["DANO"].to_numpy(np.float64, na_value=np.nan)
    sigma = merged["SIGDANO"].to_numpy(np.float64, na_value=np.nan)
    d = merged.cell.calculate_d_array(merged.reset_index()[["H", "K", "L"]].to_numpy(np.int32))
    keep = np.isfinite(dano) & (sigma > 0)
    ratio, d = np.abs(dano[keep]) / sigma[keep], d[keep]
    shells = resolution_shells(statistics)
    shell = shells.assign(d)
    rows = [ratio[shell == i] for i in range(shells.n)] + [ratio[shell >= 0]]
    return pd.DataFrame({
        "d_max": [*shells.d_max, shells.d_max[0]], "d_min": [*shells.d_min, shells.d_min[-1]],
        "n": [len(r) for r in rows], "dano_sigma": [float(np.mean(r)) if len(r) else np.nan for r in rows],
    }, index=[*range(1, shells.n + 1), "overall"])


def _anomalous_section(outputs):
    from .plotting import plot_anomalous_signal

    if not outputs.statistics:
        return _note("No merged data set: no anomalous signal.")
    tables = {}
    for name, merged, stats in zip(outputs.names, outputs.merged, outputs.statistics):
        signal = None if merged is None else anomalous_signal(merged, stats)
        if signal is not None:
            tables[name] = signal
    if not tables:
        return _note("Not an anomalous run (no DANO or Friedel columns in OUT_<i>.mtz): no anomalous signal.")
    text = ("<p>Mean |ΔF|/σ(ΔF) over acentric reflections with both Friedel mates, per shell of the statistics "
            "table (the posterior's mean and SD of ΔF: shrunk towards zero where the data are weak, so compare the "
            "shells with one another). CCanom is with the correlations above.</p>")
    headings = {"d_max": "d_max (Å)", "d_min": "d_min (Å)", "n": "#pairs", "dano_sigma": "⟨|ΔF|/σ(ΔF)⟩"}
    formats = dict(zip(headings.values(), ("{:.2f}", "{:.2f}", "{:,.0f}", "{:.2f}")))
    return (text + _figure(plot_anomalous_signal(tables, outputs.statistics[0]), "anomalous signal")
            + "".join((f"<h3>{html.escape(str(name))}</h3>" if len(tables) > 1 else "")
                      + _table(t.rename(columns=headings), formats, "shell") for name, t in tables.items()))


# Images whose operator is less probable than this are listed.
_CERTAIN = 0.99


def _reindexing_section(table):
    counts = table["operator"].value_counts().rename("images").to_frame()
    counts["least probability"] = table.groupby("operator")["probability"].min()
    text = ("<p>Each image was brought into the merge's setting by the operator below (OUT_reindexing.csv lists "
            "every image); the probability is the posterior probability of that operator under the fitted model.</p>")
    uncertain = table[table["probability"] < _CERTAIN].sort_values("probability")
    listing = (_note(f"Every image's operator has probability ≥ {_CERTAIN}.") if uncertain.empty else
               f"<h3>Images with probability &lt; {_CERTAIN}</h3>"
               + _table(uncertain.head(50), {"operator": "{}", "probability": "{:.3f}"}, "image_id"))
    return text + _table(counts, {"images": "{:,.0f}", "least probability": "{:.3f}"}, "operator") + listing


# ---------------------------------------------------------------------- the command
def register(commands):
    """Add ``skmerge report`` to the subcommands of the ``skmerge`` parser.

    Parameters
    ----------
    commands : argparse._SubParsersAction
        ``parser.add_subparsers()`` of the command line.
    """
    report = commands.add_parser(
        "report", help="write the HTML report of a finished run (skmerge's or careless's)",
        description="Write one self-contained HTML file (figures embedded, nothing fetched from the network) with "
        "the run's command and versions, the merging statistics, CC1/2, CCanom, CCpred and CCdiff, I/σ and "
        "completeness, a Wilson plot, the per-image scale, CCpred and outliers, the loss curves, the calibration "
        "of held-out observations and the anomalous signal, from the files of a run under OUT (skmerge's, or "
        "careless's OUT_0.mtz, OUT_predictions_0.mtz, OUT_xval_0.mtz, OUT_history.csv). Sections whose files "
        "are missing say so.")
    report.add_argument("out", metavar="OUT", help="the output prefix of the run, e.g. out/hypf")
    report.add_argument("-o", "--output", metavar="HTML", help="the report's file (default: OUT_report.html)")
    report.set_defaults(run=_report_command)


def _report_command(args):
    from .io.writers import check_output_prefix

    path = args.output or f"{args.out}_report.html"
    check_output_prefix(path)
    print(write_report(args.out, path))
    return 0
