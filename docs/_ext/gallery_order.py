"""The order of the gallery's examples: a first merge, model choice, then the kinds of
experiment, then keeping a fit. Examples not listed follow, by file name."""

from pathlib import Path

EXAMPLES = [
    "plot_merge_rotation.py",
    "plot_choose_likelihood.py",
    "plot_time_series.py",
    "plot_laue.py",
    "plot_serial_stills.py",
    "plot_save_load_transfer.py",
]


def example_order(path):
    """Sort key of an example file (sphinx-gallery's ``within_subsection_order``)."""
    name = Path(path).name
    return (EXAMPLES.index(name) if name in EXAMPLES else len(EXAMPLES), name)
