"""Plots of merging statistics and training history (matplotlib, no pyplot state).

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


def _resolution_axis(axes, stats):
    """Label an x axis in 1/d² with resolutions in Å."""
    table = stats.table.drop(index="overall")
    lo = float(table["d_max"].to_numpy()[0]) ** -2.0 if np.isfinite(table["d_max"].to_numpy()[0]) else 0.0
    hi = float(table["d_min"].to_numpy()[-1]) ** -2.0
    ticks = np.linspace(lo, hi, 6)
    axes.set_xlim(lo, hi)
    axes.set_xticks(ticks)
    axes.set_xticklabels([f"{t ** -0.5:.2f}" if t > 0 else "inf" for t in ticks])
    axes.set_xlabel("resolution (Å)")
