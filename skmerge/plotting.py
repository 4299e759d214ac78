"""Plots of merging statistics, calibration and training history (matplotlib, no pyplot state).

The functions return ``matplotlib.figure.Figure`` objects that are not registered with
pyplot, so they work without a display and never pile up in a long session; save them
with ``figure.savefig`` or :func:`skmerge.io.writers.write_figure`.
"""

import numpy as np

_CC_COLUMNS = (("cc_half", "CC1/2", "-"), ("cc_anom", "CCanom", "--"), ("cc_pred", "CCpred (test)", ":"),
               ("cc_diff", "CCdiff", "-."))


def plot_statistics(statistics, labels=None):
    """CC1/2, CCanom, CCpred and CCdiff against resolution.

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
        centre, shells = _shell_centres(stats)
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

    calibration, labels = _as_lists(calibration, labels)
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
    """The loss terms per observation against the step: the loss (−ELBO) and the
    likelihood's terms above, the KL divergences below.

    Parameters
    ----------
    history : DataFrame or array of shape (n_steps, 3)
        ``skmerge.io.writers.history_table`` (step, loss, nll, kl), a merger's
        ``loss_curve_``, or careless's ``OUT_history.csv`` (a ``step`` column, one column
        per term; ``_val`` columns, the validation set's, are drawn dashed).
    """
    from matplotlib.figure import Figure

    if hasattr(history, "columns"):
        steps = history["step"].to_numpy() if "step" in history else np.arange(1, len(history) + 1)
        columns = {str(c): history[c].to_numpy(dtype=float) for c in history.columns
                   if c != "step" and not str(c).startswith("Unnamed") and np.issubdtype(history[c].dtype, np.number)}
    else:
        curve = np.asarray(history, dtype=float).reshape(len(history), -1)
        steps = np.arange(1, len(curve) + 1)
        columns = dict(zip(("loss", "nll", "kl"), curve.T))
    figure = Figure(figsize=(6.4, 5.0))
    top, bottom = figure.subplots(2, 1, sharex=True)
    colours = {}
    for name, values in columns.items():
        term = name.removesuffix("_val")
        axes = bottom if "kl" in term.lower() else top
        colour = colours.setdefault(term, f"C{len(colours)}")
        label = {"loss": "loss (−ELBO)", "nll": "NLL", "kl": "KL"}.get(term, term)
        axes.plot(steps, values, "--" if name.endswith("_val") else "-", color=colour, lw=1,
                  label=label + (" (validation)" if name.endswith("_val") else ""))
    for axes in (top, bottom):
        axes.set_ylabel("per observation")
        axes.grid(alpha=0.3)
        if axes.lines:
            axes.legend(fontsize="small")
    bottom.set_xlabel("step")
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
        by_image.plot(images.index.to_numpy(), images["ceiling"].to_numpy(float), "_", ms=4, alpha=0.5,
                      color=colour, label=f"{prefix}noise ceiling")
        bad = images.loc[report.bad_images]
        if len(bad):
            by_image.plot(bad.index.to_numpy(), bad["ccpred"].to_numpy(float), "x", color="C3", ms=7,
                          label=f"{prefix}bad")
    by_shell.set_ylabel("CCpred")
    _resolution_axis(by_shell, reports[0].shells)
    by_image.set_xlabel("image")
    by_image.set_ylabel("CCpred")
    for axes in (by_shell, by_image):
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    figure.tight_layout()
    return figure


def plot_signal(statistics, labels=None):
    """Mean I/σ(I) and completeness (anomalous completeness dashed) per resolution shell.

    Parameters
    ----------
    statistics : MergingStatistics or list of them
    labels : list of str, optional
        Legend names of the data sets.

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.figure import Figure

    statistics, labels = _as_lists(statistics, labels)
    figure = Figure(figsize=(6.4, 5.4))
    top, bottom = figure.subplots(2, 1, sharex=True)
    for index, (stats, label) in enumerate(zip(statistics, labels)):
        centre, shells = _shell_centres(stats)
        prefix = "" if label is None else f"{label}: "
        top.plot(centre, shells["mean_isigi"].to_numpy(float), marker="o", ms=3, color=f"C{index}", label=label)
        bottom.plot(centre, 100 * shells["completeness"].to_numpy(float), marker="o", ms=3, color=f"C{index}",
                    label=prefix + "completeness")
        if "anom_completeness" in shells:
            bottom.plot(centre, 100 * shells["anom_completeness"].to_numpy(float), "--", marker="o", ms=3,
                        color=f"C{index}", label=prefix + "anomalous completeness")
    top.set_ylabel("⟨I/σ(I)⟩")
    bottom.set_ylabel("completeness (%)")
    bottom.set_ylim(0, 102)
    for axes in (top, bottom):
        axes.grid(alpha=0.3)
    if labels[0] is not None:
        top.legend(fontsize="small")
    bottom.legend(fontsize="small")
    _resolution_axis(bottom, statistics[0])
    figure.tight_layout()
    return figure


def plot_wilson(fits):
    """Wilson plots: ln⟨I/ε⟩ against 1/d² with the fitted line of each data set.

    Parameters
    ----------
    fits : dict of str → WilsonFit
        Per data set, :func:`skmerge.analysis.wilson_b`.

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.2))
    axes = figure.add_subplot()
    for index, (name, fit) in enumerate(fits.items()):
        shells = fit.shells
        label = name if len(fits) > 1 else "ln⟨I/ε⟩"
        axes.plot(shells["inv_d2"], shells["log_intensity"], "o", ms=4, color=f"C{index}", label=label)
        used = shells[shells["used"]]
        axes.plot(used["inv_d2"], used["fitted"], "-", color=f"C{index}", lw=1, label=f"B = {fit.b:.1f} Å²")
    axes.set_xlabel("1/d² (Å⁻²)")
    axes.set_ylabel("ln⟨I/ε⟩")
    # The autoscale margin can reach 1/d² ≤ 0 (a low-resolution shell near 30 Å), where
    # the resolution axis above would be infinite and matplotlib refuses to draw it.
    lowest = min(float(fit.shells["inv_d2"].min()) for fit in fits.values())
    axes.set_xlim(left=max(axes.get_xlim()[0], 0.5 * lowest))
    secondary = axes.secondary_xaxis("top", functions=(_inverse_root, _inverse_root))
    secondary.set_xlabel("resolution (Å)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    return figure


def plot_images(tables):
    """Per-image scale, CCpred and outlier counts against the image number, the images
    the run lists marked with a red ×.

    Parameters
    ----------
    tables : dict of str → DataFrame
        Per data set, :func:`skmerge.report.image_table` (indexed by image_id; panels of
        columns no table has are left out).

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.figure import Figure

    panels = [(c, name) for c, name in (("scale", "scale (median)"), ("cc_pred", "CCpred"),
                                        ("n_outliers", "outliers"))
              if any(c in t.columns and t[c].notna().any() for t in tables.values())]
    figure = Figure(figsize=(7.2, 1.9 * len(panels) + 0.8))
    axes = np.atleast_1d(figure.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0])
    for index, (name, table) in enumerate(tables.items()):
        image = table.index.to_numpy()
        listed = table["reason"].to_numpy(str) != "" if "reason" in table else np.zeros(len(table), bool)
        for panel, (column, _) in zip(axes, panels):
            if column not in table.columns:
                continue
            values = table[column].to_numpy(float)
            panel.plot(image, values, ".-", ms=3, lw=0.6, color=f"C{index}", label=name if len(tables) > 1 else None)
            if listed.any():
                panel.plot(image[listed], values[listed], "x", ms=8, mew=2, color="red",
                           label="listed image" if index == 0 and panel is axes[0] else None)
    for panel, (column, name) in zip(axes, panels):
        panel.set_ylabel(name)
        panel.grid(alpha=0.3)
        if panel.get_legend_handles_labels()[0]:
            panel.legend(fontsize="small")
    axes[-1].set_xlabel("image_id")
    figure.tight_layout()
    return figure


def plot_coverage(calibration, labels=None):
    """Fraction of the held-out observations inside the 68 % and 95 % predictive
    intervals, per resolution shell, against the nominal levels.

    Parameters
    ----------
    calibration : Calibration or list of them
    labels : list of str, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.figure import Figure

    from .calibration import LEVELS

    calibration, labels = _as_lists(calibration, labels)
    figure = Figure(figsize=(6.4, 4.0))
    axes = figure.add_subplot()
    for index, (report, label) in enumerate(zip(calibration, labels)):
        centre, shells = _shell_centres(report)
        for level, style in zip(LEVELS, ("-", "--")):
            column = f"coverage_{round(100 * level)}"
            text = f"{level:.0%} interval" if label is None else f"{label}: {level:.0%}"
            axes.plot(centre, 100 * shells[column].to_numpy(float), style, marker="o", ms=3, color=f"C{index}",
                      label=text)
    for level in LEVELS:
        axes.axhline(100 * level, color="0.4", lw=0.8, ls=":")
    axes.set_ylabel("held-out observations inside (%)")
    axes.set_ylim(0, 100)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    _resolution_axis(axes, calibration[0])
    figure.tight_layout()
    return figure


def plot_anomalous_signal(tables, statistics):
    """Mean |ΔF|/σ(ΔF) per resolution shell.

    Parameters
    ----------
    tables : dict of str → DataFrame
        Per data set, :func:`skmerge.report.anomalous_signal`.
    statistics : MergingStatistics
        For the resolution axis.

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.0))
    axes = figure.add_subplot()
    for index, (name, table) in enumerate(tables.items()):
        centre, shells = _shell_centres(table)
        axes.plot(centre, shells["dano_sigma"].to_numpy(float), marker="o", ms=3, color=f"C{index}",
                  label=name if len(tables) > 1 else "⟨|ΔF|/σ(ΔF)⟩")
    axes.set_ylabel("⟨|ΔF|/σ(ΔF)⟩")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    _resolution_axis(axes, statistics)
    figure.tight_layout()
    return figure


def plot_shadow(shadow, X, ipred):
    """The detector as the fit sees it: every strongly predicted observation at its
    position, coloured by log₁₀(Iobs/Ipred), with the cells of a detector shadow and its
    zone around the beam outlined.

    Parameters
    ----------
    shadow : ShadowMask
        :func:`skmerge.shadows.find_shadows`'s result.
    X : DataFrame
        The observations, with Iobs, SIGIobs and the shadow's position columns.
    ipred : array-like of shape (n_observations,)
        Their predicted intensities.

    Returns
    -------
    matplotlib.figure.Figure
        Blue where the spots come out as predicted, red where they come out extinguished
        (the colour scale stops at 1 % and at 3× the prediction).
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Circle, Rectangle

    from .shadows import strongly_predicted

    ipred = np.asarray(ipred, dtype=np.float64)
    strong = strongly_predicted(X, ipred)
    x, y = (X[column].to_numpy(np.float64)[strong] for column in shadow.columns)
    ratio = X["Iobs"].to_numpy(np.float64)[strong] / ipred[strong]
    figure = Figure(figsize=(6.4, 5.6))
    axes = figure.add_subplot()
    points = axes.scatter(x, y, c=np.log10(np.clip(ratio, 0.01, 3.0)), s=2, cmap="coolwarm_r", vmin=-2.0,
                          vmax=np.log10(3.0), linewidths=0)
    for cell in shadow.cells:
        axes.add_patch(Rectangle(shadow.origin + cell * shadow.cell_size, *shadow.cell_size, fill=False,
                                 edgecolor="black", linewidth=0.6))
    zone = shadow.beam_zone
    if zone is not None:
        axes.add_patch(Circle(zone.centre, zone.radius, fill=False, edgecolor="black", linewidth=0.8))
    figure.colorbar(points, ax=axes, label="log10(Iobs / Ipred)")
    axes.set_aspect("equal")
    axes.set_xlabel(shadow.columns[0])
    axes.set_ylabel(shadow.columns[1])
    left_out = f"{len(shadow.cells)} shadowed cells" + ("" if zone is None else ", the beam zone")
    axes.set_title(f"{strong.sum():,} spots predicted at ≥ 5σ; outlined: {left_out}", fontsize="small")
    figure.tight_layout()
    return figure


def _as_lists(items, labels):
    """One item or several, and their legend labels (None for a single item)."""
    if not isinstance(items, (list, tuple)):
        items = [items]
    return list(items), list(labels) if labels else [None] * len(items)


def _shell_centres(table):
    """The middles in 1/d² of the shells of a MergingStatistics, a Calibration or a
    table with d_max, d_min and an ``overall`` row, and the table's per-shell rows."""
    shells = getattr(table, "table", getattr(table, "shells", table)).drop(index="overall")
    return (shells["d_max"].to_numpy(float) ** -2.0 + shells["d_min"].to_numpy(float) ** -2.0) / 2, shells


def _inverse_root(x):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.asarray(x) > 0, np.abs(x) ** -0.5, np.inf)


def _resolution_axis(axes, stats):
    """Label an x axis in 1/d² with resolutions in Å, over the shells of ``stats``."""
    _, table = _shell_centres(stats)
    lo = float(table["d_max"].to_numpy()[0]) ** -2.0 if np.isfinite(table["d_max"].to_numpy()[0]) else 0.0
    hi = float(table["d_min"].to_numpy()[-1]) ** -2.0
    ticks = np.linspace(lo, hi, 6)
    axes.set_xlim(lo, hi)
    axes.set_xticks(ticks)
    axes.set_xticklabels([f"{t ** -0.5:.2f}" if t > 0 else "inf" for t in ticks])
    axes.set_xlabel("resolution (Å)")
