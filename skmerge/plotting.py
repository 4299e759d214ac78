"""Plots of merging statistics, calibration and training history (matplotlib, no pyplot state).

The functions return ``matplotlib.figure.Figure`` objects that are not registered with
pyplot, so they work without a display and never pile up in a long session; save them
with ``figure.savefig`` or :func:`skmerge.io.writers.write_figure`.
"""

import numpy as np

_CC_COLUMNS = (("cc_half", "CC1/2", "-"), ("cc_anom", "CCanom", "--"), ("cc_pred", "CCpred (test)", ":"))


def plot_statistics(statistics, labels=None):
    """CC1/2, CCanom and CCpred against resolution.

    Parameters
    ----------
    statistics : MergingStatistics or list of them
        One per data set (``skmerge.merging_statistics``).
    labels : list of str, optional
        Legend names of the data sets.

    Returns
    -------
    matplotlib.figure.Figure
        The x axis is 1/d² (labelled in Å), each shell drawn at its middle.
    """
    from matplotlib.figure import Figure

    if not isinstance(statistics, (list, tuple)):
        statistics = [statistics]
    labels = labels or ([None] if len(statistics) == 1 else [f"data set {i}" for i in range(len(statistics))])
    figure = Figure(figsize=(6.4, 4.2))
    axes = figure.add_subplot()
    drawn = False
    for index, (stats, label) in enumerate(zip(statistics, labels)):
        shells = stats.table.drop(index="overall")
        centre = (shells["d_max"].to_numpy() ** -2.0 + shells["d_min"].to_numpy() ** -2.0) / 2
        colour = f"C{index}"
        for column, name, style in _CC_COLUMNS:
            if column in shells and np.isfinite(shells[column].to_numpy(dtype=float)).any():
                text = name if label is None else f"{label}: {name}"
                axes.plot(centre, shells[column].to_numpy(dtype=float), style, marker="o", ms=3, color=colour, label=text)
                drawn = True
    if not drawn:
        axes.text(0.5, 0.5, "no half-dataset or test statistics", ha="center", va="center", transform=axes.transAxes)
    axes.axhline(0.0, color="0.6", lw=0.8)
    axes.set_ylim(min(-0.1, axes.get_ylim()[0]), 1.02)
    axes.set_ylabel("correlation")
    _resolution_axis(axes, statistics[0])
    axes.grid(alpha=0.3)
    if drawn:
        axes.legend(fontsize="small")
    figure.tight_layout()
    return figure


def plot_calibration(calibration, labels=None):
    """Histograms of the predictive z-scores (Iobs − Ipred)/σpred of the held-out and
    of the fitted observations, against the standard normal density they follow when
    the uncertainties are honest.

    Parameters
    ----------
    calibration : Calibration or list of them
        One per data set (:func:`skmerge.calibration.calibration_report`).
    labels : list of str, optional
        Legend names of the data sets.

    Returns
    -------
    matplotlib.figure.Figure
        Densities on a log axis, so that the tails (outliers) show; values beyond the
        outer bins are counted in them.
    """
    from matplotlib.figure import Figure
    from scipy.stats import norm

    if not isinstance(calibration, (list, tuple)):
        calibration = [calibration]
    labels = labels or [None] * len(calibration)
    figure = Figure(figsize=(6.4, 4.2))
    axes = figure.add_subplot()
    for index, (report, label) in enumerate(zip(calibration, labels)):
        edges = np.asarray(report.histogram["edges"], dtype=float)
        for part, name, style in (("test", "held out", "-"), ("fitted", "fitted", "--")):
            counts = np.asarray(report.histogram[part], dtype=float)
            if counts.sum():
                text = f"{name} ({counts.sum():,.0f})" if label is None else f"{label}: {name}"
                axes.stairs(counts / (counts.sum() * np.diff(edges)), edges, color=f"C{index}", linestyle=style,
                            label=text)
    z = np.linspace(edges[0], edges[-1], 400)
    axes.plot(z, norm.pdf(z), color="0.3", lw=0.8, label="normal (honest σ)")
    axes.set_yscale("log")
    axes.set_ylim(bottom=1e-5)
    axes.set_xlabel("z = (Iobs − Ipred) / σpred  (outer bins hold everything beyond)")
    axes.set_ylabel("density")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    return figure


def plot_history(history):
    """Loss (−ELBO per observation) and its NLL and KL parts against the step.

    Parameters
    ----------
    history : DataFrame or array of shape (n_steps, 3)
        ``skmerge.io.writers.history_table`` or a merger's ``loss_curve_``.
    """
    from matplotlib.figure import Figure

    if hasattr(history, "columns"):
        steps = history["step"].to_numpy() if "step" in history else np.arange(1, len(history) + 1)
        columns = {c: history[c].to_numpy(dtype=float) for c in ("loss", "nll", "kl") if c in history}
    else:
        curve = np.asarray(history, dtype=float).reshape(len(history), -1)
        steps = np.arange(1, len(curve) + 1)
        columns = dict(zip(("loss", "nll", "kl"), curve.T))
    figure = Figure(figsize=(6.4, 5.0))
    top, bottom = figure.subplots(2, 1, sharex=True)
    for name, style in (("loss", "-"), ("nll", "--")):
        if name in columns:
            top.plot(steps, columns[name], style, lw=1, label={"loss": "loss (−ELBO)", "nll": "NLL"}[name])
    top.set_ylabel("per observation")
    top.legend(fontsize="small")
    top.grid(alpha=0.3)
    if "kl" in columns:
        bottom.plot(steps, columns["kl"], color="C2", lw=1, label="KL")
        bottom.legend(fontsize="small")
    bottom.set_ylabel("per observation")
    bottom.set_xlabel("step")
    bottom.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def plot_ccpred(reports, labels=None):
    """CCpred against resolution (training and test observations) and against the
    image, with the bad images marked.

    Parameters
    ----------
    reports : CCpredReport or list of them
        One per data set (:func:`skmerge.analysis.ccpred_report`).
    labels : list of str, optional
        Legend names of the data sets.

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.figure import Figure

    if not isinstance(reports, (list, tuple)):
        reports = [reports]
    labels = labels or [None] * len(reports)
    figure = Figure(figsize=(6.4, 6.4))
    by_shell, by_image = figure.subplots(2, 1)
    for index, (report, label) in enumerate(zip(reports, labels)):
        colour, prefix = f"C{index}", "" if label is None else f"{label}: "
        shells = report.shells.drop(index="overall")
        centre = (shells["d_max"].to_numpy(float) ** -2.0 + shells["d_min"].to_numpy(float) ** -2.0) / 2
        for part, style in (("train", "-"), ("test", ":")):
            if f"cc_{part}" in shells:
                by_shell.plot(centre, shells[f"cc_{part}"].to_numpy(float), style, marker="o", ms=3, color=colour,
                              label=f"{prefix}{part}")
        images = report.images
        by_image.plot(images.index.to_numpy(), images["ccpred"].to_numpy(float), ".", ms=3, color=colour,
                      label=f"{prefix}images")
        bad = images.loc[report.bad_images]
        if len(bad):
            by_image.plot(bad.index.to_numpy(), bad["ccpred"].to_numpy(float), "x", color="C3", ms=7,
                          label=f"{prefix}bad (< {report.threshold:.2f})")
    by_shell.set_ylabel("CCpred")
    _resolution_axis(by_shell, reports[0].shells)
    by_image.set_xlabel("image")
    by_image.set_ylabel("CCpred")
    for axes in (by_shell, by_image):
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    figure.tight_layout()
    return figure


def _resolution_axis(axes, stats):
    """Label an x axis in 1/d² with resolutions in Å, over the shells of a statistics
    table (or of a MergingStatistics)."""
    table = getattr(stats, "table", stats).drop(index="overall")
    lo = float(table["d_max"].to_numpy()[0]) ** -2.0 if np.isfinite(table["d_max"].to_numpy()[0]) else 0.0
    hi = float(table["d_min"].to_numpy()[-1]) ** -2.0
    ticks = np.linspace(lo, hi, 6)
    axes.set_xlim(lo, hi)
    axes.set_xticks(ticks)
    axes.set_xticklabels([f"{t ** -0.5:.2f}" if t > 0 else "inf" for t in ticks])
    axes.set_xlabel("resolution (Å)")
