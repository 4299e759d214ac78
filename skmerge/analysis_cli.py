"""The analysis subcommands of ``skmerge``, named after careless's scripts.

:func:`register` adds them to the command line's subparsers; each prints a table
(:func:`skmerge.analysis.format_table`) and, with ``--csv FILE``, writes it. The work is
done by :mod:`skmerge.analysis`. Nothing here imports TensorFlow.
"""

import argparse
import contextlib
import textwrap

_RUN_HELP = ("the output prefix of a run of skmerge or careless (e.g. out/hypf; a directory holding one run; or "
             "one of its MTZ files)")


def register(commands, formatter_class=argparse.RawDescriptionHelpFormatter):
    """Add ``ccpred``, ``isigi``, ``filter-images``, ``bfactor``, ``apply-bfactor``,
    ``rsplit``, ``completeness``, ``plot-history``, ``xds2mtz`` and ``stream2mtz`` to
    ``commands`` (the ``add_subparsers`` object of ``skmerge``'s parser); each sets
    ``run`` to its function, which returns the exit status.

    Examples
    --------
    >>> import argparse
    >>> parser = argparse.ArgumentParser(prog="skmerge")
    >>> register(parser.add_subparsers(dest="command"))
    >>> parser.parse_args(["isigi", "out/hypf"]).shells
    10
    """
    def command(name, help, run, description=None):
        # The formatter keeps descriptions as written (the other commands' have layout).
        text = textwrap.fill(description or help[0].upper() + help[1:] + ".", 90)
        parser = commands.add_parser(name, help=help, description=text, formatter_class=formatter_class)
        parser.set_defaults(run=run)
        return parser

    ccpred = command("ccpred", "CCpred (Iobs vs Ipred) per resolution shell and per image; names the bad images",
                     _ccpred, "CCpred, the correlation of the observed and the predicted intensities of "
                     "OUT_predictions_<i>.mtz, per resolution shell for the training and the held-out (test) "
                     "observations, and per image (careless.ccpred and careless.image_ccpred). Images that fall far "
                     "further below their noise ceiling (the CCpred their observations' noise allows) than the "
                     "others are named bad; 'skmerge filter-images' removes them.")
    _run_arguments(ccpred)
    ccpred.add_argument("--bad-below", type=float, metavar="CC", help="images with CCpred below CC are bad (default: "
                        "those whose CCpred falls short of its noise ceiling by 4 robust SDs, and at least 0.1, "
                        "more than the median image's)")
    ccpred.add_argument("--image-csv", metavar="FILE", help="write the per-image table as CSV")
    ccpred.add_argument("--plot", metavar="PNG", help="draw CCpred against resolution and against the image")

    isigi = command("isigi", "I/σ(I) of the merged intensities per resolution shell", _isigi)
    _run_arguments(isigi, method=False)

    rsplit = command("rsplit", "Rsplit of the half-dataset merges (OUT_xval_<i>.mtz) per resolution shell", _rsplit,
                     "Rsplit = sqrt(2) sum|X1 - X2| / sum(X1 + X2) between the halves of the half-dataset merges "
                     "(OUT_xval_<i>.mtz) per resolution shell, X the merged intensity (--column I, the usual "
                     "definition) or amplitude (--column F, as careless.rsplit, which also rescales one half).")
    _run_arguments(rsplit, method=False)
    rsplit.add_argument("--column", choices=("I", "F"), default="I", help="merged intensities or amplitudes "
                        "(default: %(default)s)")

    completeness = command("completeness", "completeness and anomalous completeness per resolution shell",
                           _completeness)
    completeness.add_argument("out", metavar="MERGED", help="a merged MTZ file, or a run's output prefix")
    _table_arguments(completeness)
    completeness.add_argument("--binning", choices=("equal-count", "equal-volume"), default="equal-count",
                              help="shells of equal numbers of measured or of possible reflections "
                              "(default: %(default)s)")

    bfactor = command("bfactor", "fit a Wilson B factor to merged intensities", _bfactor,
                      "Fit ln<I/eps> = ln k - (B/2)/d^2 to the shells of a Wilson plot beyond 4.5 A.")
    bfactor.add_argument("out", metavar="MERGED", help="a merged MTZ file, or a run's output prefix")
    _table_arguments(bfactor, shells=20)

    apply = command("apply-bfactor", "apply a B factor to merged data", _apply_bfactor,
                    "Multiply amplitudes by exp(-B/(4d^2)) and intensities by exp(-B/(2d^2)) (and their sigmas): "
                    "data of Wilson B0 get B0 + B; a negative B sharpens.")
    apply.add_argument("merged", metavar="MERGED", help="a merged MTZ file")
    apply.add_argument("output", metavar="OUT_MTZ", help="the MTZ file to write")
    apply.add_argument("--b", "-b", type=float, required=True, metavar="B", help="the B factor in Å²")

    filtering = command("filter-images", "write an unmerged file without some images", _filter_images,
                        "Write UNMERGED without the chosen images: those given by number (--images), or those "
                        "whose CCpred in the run's predictions is below a limit (--ccpred-below with "
                        "--predictions; careless.filter_image).")
    filtering.add_argument("unmerged", metavar="UNMERGED", help="the unmerged MTZ file the run merged")
    filtering.add_argument("output", metavar="OUT_MTZ", help="the unmerged MTZ file to write")
    chosen = filtering.add_mutually_exclusive_group(required=True)
    chosen.add_argument("--images", type=int, nargs="+", metavar="N", help="image numbers of UNMERGED's image column")
    chosen.add_argument("--ccpred-below", type=float, metavar="CC",
                        help="remove the images whose CCpred (all their observations) is below CC")
    filtering.add_argument("--predictions", metavar="FILE", help="the run's OUT_predictions_<i>.mtz (with "
                           "--ccpred-below)")
    filtering.add_argument("--file-id", type=int, metavar="I", help="UNMERGED's position among the run's files, "
                           "when the predictions hold several")
    filtering.add_argument("--image-key", metavar="KEY", help="UNMERGED's image column (default: the first of MTZ "
                           "type B)")

    history = command("plot-history", "draw the loss curves of a run (OUT_history.csv) as PNG", _plot_history)
    history.add_argument("out", metavar="OUT", help="a run's output prefix, or its history CSV file")
    history.add_argument("-o", "--output", metavar="PNG", help="the PNG to write (default: OUT_history.png)")
    history.add_argument("--csv", metavar="FILE", help="also write the table printed as CSV")

    for name, fmt, what in (("xds2mtz", "xds", "XDS_ASCII.HKL or INTEGRATE.HKL"),
                            ("stream2mtz", "crystfel", "CrystFEL .stream")):
        converter = command(name, f"convert an unmerged {what} file to unmerged MTZ (for careless and skmerge)",
                            _convert)
        converter.set_defaults(format=fmt)
        converter.add_argument("source", metavar="FILE", help=f"the {what} file")
        converter.add_argument("output", metavar="OUT_MTZ", help="the unmerged MTZ file to write")
        converter.add_argument("--spacegroup", "--spacegroups", required=fmt == "crystfel", metavar="SPACEGROUP",
                               help="space group, e.g. 'P 43 21 2'" + (" (a stream records none)" if fmt ==
                                                                      "crystfel" else " (default: the file's)"))
        converter.add_argument("--cell", type=float, nargs=6, metavar=("A", "B", "C", "AL", "BE", "GA"),
                               help="unit cell in Å and degrees (default: the file's)")


def _table_arguments(parser, shells=10):
    parser.add_argument("--shells", type=int, default=shells, metavar="N",
                        help="resolution shells (default: %(default)s)")
    parser.add_argument("--csv", metavar="FILE", help="also write the table printed as CSV")


def _run_arguments(parser, method=True):
    parser.add_argument("out", metavar="OUT", help=_RUN_HELP)
    _table_arguments(parser)
    if method:
        parser.add_argument("--method", choices=("pearson", "spearman"), default="pearson",
                            help="1/SIGIobs²-weighted Pearson or Spearman correlation (default: %(default)s)")


# --------------------------------------------------------------------- commands
def _per_file(args, kind, compute):
    """``compute(table)`` for each file of a run of one kind, printed with a title;
    the tables (with a ``data_set`` column) are written to ``--csv``."""
    from .analysis import read_run_table, run_files

    _check_outputs(args, "csv")
    results = []
    for i, path in enumerate(run_files(args.out, kind)):
        with _about(path):
            results.append((i, path, compute(read_run_table(path, kind))))
    return results


@contextlib.contextmanager
def _about(path):
    """Name ``path`` in the InputErrors of the block that do not name it already."""
    from .errors import InputError

    try:
        yield
    except InputError as exc:
        if str(path) in str(exc):
            raise
        raise InputError(f"{path}: {exc}") from None


def _print_tables(args, results, title):
    from .analysis import format_table

    print("\n\n".join(format_table(table, title=f"{title} of {path.name}") for _, path, table in results))
    _write_csv(args.csv, [(i, table) for i, _, table in results])


def _ccpred(args):
    from .analysis import ccpred_report

    _check_outputs(args, "image_csv", "plot")
    results = _per_file(args, "predictions",
                        lambda table: ccpred_report(table, shells=args.shells, method=args.method,
                                                    below=args.bad_below))
    print("\n\n".join(report.to_string(title=f"{path.name}") for _, path, report in results))
    _write_csv(args.csv, [(i, report.shells) for i, _, report in results])
    _write_csv(args.image_csv, [(i, report.images) for i, _, report in results])
    if args.plot:
        from .io.writers import write_figure
        from .plotting import plot_ccpred

        write_figure(plot_ccpred([report for _, _, report in results], [path.name for _, path, _ in results]),
                     args.plot)
    return 0


def _isigi(args):
    from .analysis import isigi_table

    _print_tables(args, _per_file(args, "merged", lambda table: isigi_table(table, shells=args.shells)),
                  "I/sigma(I) per resolution shell")
    return 0


def _rsplit(args):
    from .analysis import rsplit_table

    _print_tables(args, _per_file(args, "xval", lambda table: rsplit_table(table, shells=args.shells, column=args.column)),
                  "Rsplit per resolution shell")
    return 0


def _completeness(args):
    from .analysis import completeness_table

    _print_tables(args, _per_file(args, "merged", lambda table: completeness_table(
        table, shells=args.shells, binning=args.binning)), "Completeness per resolution shell")
    return 0


def _bfactor(args):
    from .analysis import wilson_b

    fits = _per_file(args, "merged", lambda table: wilson_b(table, shells=args.shells))
    print("\n\n".join(f"{path.name}\n{fit.to_string()}" for _, path, fit in fits))
    _write_csv(args.csv, [(i, fit.shells) for i, _, fit in fits])
    return 0


def _apply_bfactor(args):
    from .analysis import apply_bfactor, read_run_table
    from .io.writers import write_mtz

    _check_outputs(args, "output")
    with _about(args.merged):
        table, scaled = apply_bfactor(read_run_table(args.merged), args.b)
    write_mtz(table, args.output)
    print(f"B = {args.b:g} A^2 applied to {', '.join(scaled) or 'no column'} of {args.merged}; wrote {args.output}")
    return 0


def _filter_images(args):
    import numpy as np

    from .analysis import ccpred_report, filter_images, image_numbers, read_run_table, unmerged_mtz
    from .errors import InputError
    from .io.mtz import read_mtz
    from .io.writers import write_mtz

    _check_outputs(args, "output")
    if (args.ccpred_below is None) != (args.predictions is None):
        raise InputError("--ccpred-below and --predictions go together: CCpred per image comes from the "
                         "predictions file")
    unmerged = read_mtz(args.unmerged)
    if args.images is not None:
        images = np.asarray(args.images)
    else:
        with _about(args.predictions):
            predictions = read_run_table(args.predictions, "predictions")
            report = ccpred_report(predictions, below=args.ccpred_below)
            images = image_numbers(predictions, unmerged, report.bad_images, file_id=args.file_id,
                                   image_key=args.image_key)
    with _about(args.unmerged):
        kept = filter_images(unmerged, images, image_key=args.image_key)
    write_mtz(unmerged_mtz(kept), args.output)
    print(f"removed {len(unmerged) - len(kept):,} observations of {len(np.unique(images))} image(s)"
          + (f" ({' '.join(map(str, sorted(np.unique(images).tolist())))})" if len(images) else "")
          + f"; wrote {len(kept):,} to {args.output}")
    return 0


def _plot_history(args):
    from pathlib import Path

    import numpy as np

    from .analysis import format_table, read_history
    from .io.writers import write_figure
    from .plotting import plot_history

    source = Path(args.out)
    if not source.is_file():
        from .workflow import resolve_output_prefix

        source = Path(f"{resolve_output_prefix(args.out)}_history.csv")
    output = args.output or str(source).removesuffix(".csv") + ".png"
    args.output = output
    _check_outputs(args, "output", "csv")
    history = read_history(source)
    rows = sorted(set(np.linspace(0, len(history) - 1, min(len(history), 11)).round().astype(int)))
    print(format_table(history.iloc[rows].set_index("step"), title=f"{source.name}: {len(history)} steps"))
    write_figure(plot_history(history), output)
    _write_csv(args.csv, [(0, history)])
    print(f"wrote {output}")
    return 0


def _convert(args):
    from .analysis import convert_to_mtz

    _check_outputs(args, "output")
    table = convert_to_mtz(args.source, args.output, spacegroup=args.spacegroup, cell=args.cell, expected=args.format)
    images = table[[c for c, t in table.dtypes.items() if getattr(t, "name", "") == "Batch"][0]].nunique()
    print(f"{args.source}: {len(table):,} observations on {images:,} images, space group "
          f"{table.spacegroup.hm}, cell {' '.join(f'{v:.3f}' for v in table.cell.parameters)}; "
          f"columns {', '.join(table.columns)}; wrote {args.output}")
    return 0


# ----------------------------------------------------------------------- output
def _check_outputs(args, *names):
    """InputError before any work unless every output file given can be written."""
    from .io.writers import check_output_prefix

    for name in names:
        if getattr(args, name, None):
            check_output_prefix(getattr(args, name))


def _write_csv(path, tables):
    """The tables of several data sets, stacked with a ``data_set`` column, as CSV."""
    if not path:
        return
    import pandas as pd

    from .io.writers import write_csv

    frames = []
    for i, table in tables:
        frame = table.reset_index()
        frame.insert(0, "data_set", i)
        frames.append(frame)
    write_csv(pd.concat(frames, ignore_index=True), path)

