"""The ``skmerge`` command line: thin argument parsing over the public API.

``skmerge mono`` takes careless's common flags under the same names; everything is
checked before any work is done, and a bad command line gets one line of error and exit
status 2. Nothing here imports TensorFlow until a model is fitted, so ``--help`` and
``--version`` are fast.
"""

import argparse
import os
import re
import sys
from pathlib import Path

from . import __version__
from .errors import InputError, SkmergeError

# Keys read_unmerged always provides, whatever the file format.
SPECIAL_KEYS = ("dHKL", "Hobs", "Kobs", "Lobs", "image_id", "file_id")
_MEDIAN_CHI2_1 = 0.4549  # median of z² for z ~ Normal(0, 1)
_SCATTER_LIMIT = 3.0  # above hypf's and PYP's 2.0 and 1.8, where the error model is optional
# VariationalMerger's defaults, quoted in the help (tests/test_cli.py checks them).
ESTIMATOR_DEFAULTS = {
    "max_iter": 2000,
    "learning_rate": 0.003,
    "mlp_layers": 20,
    "mlp_width": 10,
    "mc_samples": 1,
    "dof": 16.0,
    "positional_encoding": 0,
}
# careless flags of its published examples that skmerge accepts but does not use.
IGNORED_CARELESS_FLAGS = {
    "image_layers": ("--image-layers", "skmerge learns one scale offset per image instead of per-image layers"),
    "beta_1": ("--beta-1", "skmerge's Adam uses beta_1 = 0.9"),
    "beta_2": ("--beta-2", "skmerge's Adam uses beta_2 = 0.99"),
}


class UsageError(Exception):
    """A command line that cannot work; reported in one line with exit status 2."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (``skmerge: error: ...``)."""

    def error(self, message):
        raise UsageError(f"{message} (see '{self.prog} --help')")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog):
        super().__init__(prog, max_help_position=34, width=min(100, _terminal_width()))


def _terminal_width():
    try:
        return os.get_terminal_size().columns
    except OSError:
        return 100


# ---------------------------------------------------------------------- arguments
def _positive_int(text):
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a whole number of at least 1")
    return value


def _non_negative_int(text):
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a whole number of at least 0")
    return value


def _positive_float(text):
    value = _number(text, float)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number")
    return value


def _finite_float(text):
    value = _number(text, float)
    if value != value or abs(value) == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number")
    return value


def _fraction(text):
    value = _number(text, float)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a fraction in [0, 1)")
    return value


def _number(text, kind):
    try:
        return kind(text)  # int("30_000") works, as in careless's examples
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole ' if kind is int else ''}number") from None


_MONO_DESCRIPTION = """\
Merge unmerged monochromatic intensities into structure-factor amplitudes by variational
inference. The flags careless shares with skmerge have careless's names and meanings.

outputs (OUT is a path prefix; its directory must exist):
  OUT_<i>.mtz              merged data set i: F, SIGF, I, SIGI, N (+ Friedel columns, DANO)
  OUT_predictions_<i>.mtz  per observation: Iobs, SIGIobs, Ipred, SIGIpred, Scale, ... test
  OUT_xval_<i>.mtz         half-dataset merges, stacked with 'repeat' and 'half' columns
  OUT_history.csv          loss, nll, kl per step        OUT.joblib   the fitted merger
  OUT_stats.csv/.json      the merging-statistics table  OUT_cchalf.png, OUT_history.png
  i is the file number with --separate-files, else 0."""

_MONO_EPILOG = """\
examples:
  skmerge mono --anomalous --merge-half-datasets "dHKL,Hobs,Kobs,Lobs,XDET,YDET,BATCH" \\
      hypf_unmerged.mtz out/hypf
  skmerge mono --separate-files --studentt-likelihood-dof 16 "dHKL,X,Y" off.mtz 2ms.mtz out/pyp
  skmerge stats out/hypf"""


_POLY_DESCRIPTION = _MONO_DESCRIPTION.replace(
    "Merge unmerged monochromatic intensities", "Merge unmerged polychromatic (Laue) intensities"
).replace(
    "inference.", "inference. Every spot is expanded into its harmonics n·h (wavelength λ/n) inside the\n"
    "beam's band, and its intensity is modelled as their sum.", 1
)

_POLY_EPILOG = """\
examples:
  skmerge poly --separate-files --wavelength-key Wavelength "X,Y,Wavelength,dHKL,Hobs,Kobs,Lobs" \\
      off.mtz 2ms.mtz out/pyp
  skmerge stats out/pyp"""


def _add_mono_arguments(mono):
    d = ESTIMATOR_DEFAULTS
    mono.add_argument(
        "metadata_keys",
        help="comma-separated observation columns that drive the scale model, e.g. "
        f"'dHKL,Hobs,Kobs,Lobs,XDET,YDET,BATCH'. Always available: {', '.join(SPECIAL_KEYS)}; "
        "plus any column of the reflection files",
    )
    mono.add_argument("reflection_files", nargs="+", metavar="REFLECTION_FILE",
                      help="unmerged MTZ, XDS_ASCII.HKL / INTEGRATE.HKL, CrystFEL .stream or DIALS .refl")
    mono.add_argument("out", metavar="OUT", help="output prefix, e.g. out/hypf (the directory must exist)")

    data = mono.add_argument_group("data")
    data.add_argument("--anomalous", action="store_true", help="keep Friedel mates apart")
    data.add_argument("-d", "--dmin", type=_positive_float, metavar="DMIN",
                      help="high-resolution limit in Å (default: all data)")
    data.add_argument("-c", "--isigi-cutoff", type=_finite_float, metavar="ISIGI",
                      help="drop observations with I/σ(I) below this (default: keep all)")
    data.add_argument("--spacegroups", metavar="SPACEGROUP",
                      help="space group for merging, e.g. 'P 21 21 21' (a comma-separated list must "
                      "name one space group); default: the files'")
    data.add_argument("--intensity-key", metavar="KEY", help="intensity column (default: the first of MTZ type J)")
    data.add_argument("--uncertainty-key", metavar="KEY", help="σ column (default: the σ partner of the intensity)")
    data.add_argument("--image-key", metavar="KEY", help="image-number column (default: the first of MTZ type B)")
    data.add_argument("--separate-files", action="store_true",
                      help="scale all files together but merge each file separately (OUT_0, OUT_1, ...)")

    model = mono.add_argument_group("model")
    model.add_argument("--likelihood", choices=("normal", "laplace", "studentt"),
                       help="error model of the intensities (default: normal; studentt with "
                       "--studentt-likelihood-dof)")
    model.add_argument("--studentt-likelihood-dof", type=_positive_float, metavar="DOF", dest="dof",
                       help=f"Student-t likelihood with DOF degrees of freedom (with --likelihood studentt "
                       f"alone: {d['dof']:g})")
    model.add_argument("--error-model", action="store_true",
                       help="refine the sigmas as SdFac*sqrt(sigma^2 + (SdAdd*Ipred)^2) with the model "
                       "(recommended for serial stills, whose sigmas leave out the partiality error)")
    model.add_argument("--reference-mtz", metavar="FILE",
                       help="prior centred on the amplitudes of this merged MTZ (Wilson where it has none)")
    model.add_argument("--reference-prior", choices=("normal", "laplace", "studentt"),
                       help="shape of the reference prior (default: normal); needs --reference-mtz")
    model.add_argument("--mlp-layers", type=_positive_int, metavar="N",
                       help=f"layers of the scale network (default: {d['mlp_layers']})")
    model.add_argument("--mlp-width", type=_positive_int, metavar="N",
                       help=f"width of the scale network (default: {d['mlp_width']})")
    model.add_argument("--disable-image-scales", action="store_true", help="no scale offset per image")
    model.add_argument("-L", "--positional-encoding-frequencies", type=_non_negative_int, metavar="N",
                       help=f"positional encoding of every metadata column with N frequencies "
                       f"(default: {d['positional_encoding']}, none)")

    fit = mono.add_argument_group("optimisation")
    fit.add_argument("--iterations", type=_positive_int, metavar="N",
                     help=f"maximum number of gradient steps (default: {d['max_iter']}); unlike careless, "
                     "skmerge stops earlier once the loss has converged")
    fit.add_argument("--learning-rate", type=_positive_float, metavar="RATE",
                     help=f"Adam learning rate (default: {d['learning_rate']:g})")
    fit.add_argument("--mc-samples", type=_positive_int, metavar="N",
                     help=f"Monte Carlo samples per step (default: {d['mc_samples']})")
    fit.add_argument("--batch-size", type=_positive_int, metavar="IMAGES",
                     help="train on random batches of this many whole images per step, so that a step's time "
                     "and memory do not grow with the data (default: every image in every step)")
    fit.add_argument("--early-stopping", action="store_true",
                     help="choose the number of steps on 10%% of the images held out (the step of their best likelihood), "
                     "then refit on every image for that many steps (helps serial stills fitted without --error-model)")
    fit.add_argument("--seed", type=int, default=0, help="random seed of the fit and of all splits (default: 0)")

    validation = mono.add_argument_group("validation")
    validation.add_argument("--test-fraction", type=_fraction, default=0.0, metavar="F",
                            help="hold out this fraction of the observations from the fit; CCpred is "
                            "computed on them (default: 0)")
    validation.add_argument("--merge-half-datasets", action="store_true",
                            help="after the fit, freeze the scales and merge random halves of the images "
                            "(OUT_xval_<i>.mtz, CC1/2, CCanom)")
    validation.add_argument("--half-dataset-repeats", type=_positive_int, metavar="N",
                            help="number of random half splits (default: 1); needs --merge-half-datasets")

    output = mono.add_argument_group("output")
    _add_table_arguments(output)
    output.add_argument("--disable-progress-bar", action="store_true", help="no progress bars")
    output.add_argument("--quiet", action="store_true",
                        help="print nothing but warnings and errors (implies --disable-progress-bar)")

    compat = mono.add_argument_group(
        "careless compatibility", "careless flags of its published examples; accepted and ignored, with a warning")
    compat.add_argument("--image-layers", type=_non_negative_int, metavar="N",
                        help="ignored: skmerge learns one scale offset per image")
    compat.add_argument("--beta-1", type=_positive_float, metavar="B", help="ignored: Adam's beta_1 is 0.9")
    compat.add_argument("--beta-2", type=_positive_float, metavar="B", help="ignored: Adam's beta_2 is 0.99")


def _add_poly_arguments(poly):
    _add_mono_arguments(poly)
    laue = poly.add_argument_group("Laue")
    laue.add_argument("-w", "--wavelength-key", default="Wavelength", metavar="KEY",
                      help="column with each spot's wavelength in Å (default: Wavelength)")
    laue.add_argument("-l", "--wavelength-range", type=_positive_float, nargs=2, metavar=("LAMBDA_MIN", "LAMBDA_MAX"),
                      help="band of the beam in Å for the harmonic expansion (default: each file's smallest "
                      "and largest recorded wavelength)")


def _add_table_arguments(group):
    group.add_argument("--shells", type=_positive_int, default=10, metavar="N",
                       help="resolution shells of the statistics table (default: 10)")
    group.add_argument("--binning", choices=("equal-count", "equal-volume"), default="equal-count",
                       help="shells with equal numbers of measured reflections, or of possible reflections "
                       "(≈ equal reciprocal volume) (default: equal-count)")
    group.add_argument("--method", choices=("pearson", "spearman"), default="pearson",
                       help="correlation coefficient of CC1/2, CCanom and CCpred (default: pearson)")


def build_parser():
    parser = _Parser(prog="skmerge", formatter_class=_Formatter,
                     description="Merge X-ray diffraction data by variational inference.")
    parser.add_argument("--version", action="version", version=f"skmerge {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    mono = commands.add_parser("mono", help="merge monochromatic data (careless mono's flags)",
                               description=_MONO_DESCRIPTION, epilog=_MONO_EPILOG, formatter_class=_Formatter)
    _add_mono_arguments(mono)
    mono.set_defaults(run=_mono)

    poly = commands.add_parser("poly", help="merge polychromatic (Laue) data (careless poly's flags)",
                               description=_POLY_DESCRIPTION, epilog=_POLY_EPILOG, formatter_class=_Formatter)
    _add_poly_arguments(poly)
    poly.set_defaults(run=_mono)

    stats = commands.add_parser(
        "stats", help="print the merging-statistics table of a finished run", formatter_class=_Formatter,
        description="Recompute the merging-statistics table from the MTZ files of a run (OUT_<i>.mtz, "
        "OUT_xval_<i>.mtz, OUT_predictions_<i>.mtz; careless's SigF/SigI names are read too), or "
        "print OUT_stats.json when the MTZ files are gone.")
    stats.add_argument("out", metavar="OUT", help="the output prefix of the run, e.g. out/hypf")
    _add_table_arguments(stats)
    stats.add_argument("--plot", metavar="PNG", help="also draw CC1/2, CCanom and CCpred against resolution")
    stats.set_defaults(run=_stats)

    demo = commands.add_parser("demo", help="simulate a data set, merge it and print the statistics",
                               formatter_class=_Formatter)
    demo.add_argument("--images", type=_positive_int, default=90, help="number of simulated images (default 90)")
    demo.add_argument("--shells", type=_positive_int, default=8, help="resolution shells in the table (default 8)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(run=_demo)
    return parser


# ------------------------------------------------------------------- validation
def check_mono_arguments(args):
    """Every check that needs no reading of the data; raises UsageError. Returns the
    metadata keys as a list."""
    keys = [k.strip() for k in args.metadata_keys.split(",")]
    if not args.metadata_keys.strip() or any(not k for k in keys):
        raise UsageError(f"metadata keys {args.metadata_keys!r}: give comma-separated column names, "
                         f"e.g. 'dHKL,Hobs,Kobs,Lobs' (always available: {','.join(SPECIAL_KEYS)})")
    keys = list(dict.fromkeys(keys))
    for path in args.reflection_files:
        if not Path(path).exists():
            raise UsageError(f"{path}: no such file")
        if Path(path).is_dir():
            raise UsageError(f"{path}: is a directory, not a reflection file")
    _check_output_prefix(args.out)
    if args.reference_mtz is not None and not Path(args.reference_mtz).is_file():
        raise UsageError(f"--reference-mtz {args.reference_mtz}: no such file")
    if args.reference_prior is not None and args.reference_mtz is None:
        raise UsageError("--reference-prior needs --reference-mtz FILE")
    if args.dof is not None and args.likelihood not in (None, "studentt"):
        raise UsageError(f"--studentt-likelihood-dof conflicts with --likelihood {args.likelihood}")
    if args.half_dataset_repeats is not None and not args.merge_half_datasets:
        raise UsageError("--half-dataset-repeats needs --merge-half-datasets")
    if args.spacegroups is not None:
        groups = {re.sub(r"\s+", " ", g.strip()) for g in args.spacegroups.split(",")}
        n = len(args.spacegroups.split(","))
        if "" in groups:
            raise UsageError(f"--spacegroups {args.spacegroups!r}: empty space group")
        if n not in (1, len(args.reflection_files)):
            raise UsageError(f"--spacegroups gives {n} space groups for {len(args.reflection_files)} files; "
                             "give one, or one per file")
        if len(groups) > 1:
            raise UsageError(f"--spacegroups {args.spacegroups!r}: skmerge merges files of one space group; "
                             "give one space group for all files")
    return keys


def _check_output_prefix(out):
    path = Path(out)
    if out.endswith(("/", os.sep)) or path.is_dir():
        raise UsageError(f"output {out!r} is a directory; give a prefix inside it, e.g. {os.path.join(out, 'merged')}")
    directory = path.parent
    if not directory.is_dir():
        raise UsageError(f"output directory {str(directory)!r} does not exist; create it first (mkdir -p {directory})")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise UsageError(f"output directory {str(directory)!r} is not writable")


def check_metadata_keys(keys, X):
    """UsageError for keys the observation table lacks, listing the available ones."""
    from .table import TABLE_COLUMNS

    from_files = [str(c) for c in X.columns if c not in TABLE_COLUMNS]
    available = [*SPECIAL_KEYS, *from_files]
    unknown = [k for k in keys if k not in available]
    if unknown:
        raise UsageError(
            f"unknown metadata key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; available: "
            f"{','.join(SPECIAL_KEYS)} (always) and {','.join(from_files) or 'none'} (from the files)"
        )


def partiality_warning(X, keys):
    """A warning when most observations are partials (the M/ISYM partial flag of raw
    MOSFLM/XDS output) and no metadata key describes the fraction recorded, else None."""
    if "PARTIAL" not in X.columns or "FRACTIONCALC" in keys:
        return None
    fraction = float(X["PARTIAL"].to_numpy(dtype=float, na_value=0).mean())
    if fraction < 0.1:
        return None
    hint = ("add FRACTIONCALC to the metadata keys" if "FRACTIONCALC" in X.columns
            else "give the scale model a partiality column, or sum the partials first")
    return (f"{fraction:.0%} of the observations are flagged partial; their intensities are fractions of the "
            f"reflections', which also divides reflections between the halves of half-dataset splits and "
            f"lowers CC1/2 and CCanom: {hint}")


def sigma_scatter_warning(predictions):
    """A warning when the fitted observations scatter about their predictions far more
    than their σ say, else None.

    The factor is √(median z² / 0.455), z = (Iobs − Ipred)/σ, 0.455 being the median of
    z² for correct σ; the median keeps a few outliers from setting it. Measured after
    default fits: hypf 2.0, PYP 1.8, thermolysin (XFEL stills) 6.9, where --error-model
    lifted CC1/2 from 0.33 to 0.79.
    """
    import numpy as np

    fitted = predictions["test"].to_numpy() == 0
    z = (predictions["Iobs"].to_numpy(float) - predictions["Ipred"].to_numpy(float)) / predictions[
        "SIGIobs"].to_numpy(float)
    factor = float(np.sqrt(np.median(z[fitted] ** 2) / _MEDIAN_CHI2_1))
    if not factor > _SCATTER_LIMIT:
        return None
    return (f"the observations scatter about the fitted model {factor:.1f} times more than their sigmas say; "
            "with sigmas that small the fit chases the wildest observations: add --error-model "
            "(for serial stills also --batch-size 32)")


def merger_parameters(args, keys):
    """VariationalMerger parameters of a parsed ``mono`` command line."""
    params = {
        "metadata": keys,
        "anomalous": args.anomalous,
        "image_scales": not args.disable_image_scales,
        "early_stopping": args.early_stopping,
        "random_state": args.seed,
        "verbose": 0 if (args.quiet or args.disable_progress_bar) else 1,
    }
    if args.separate_files:
        params["separate_files"] = True
    if args.error_model:
        params["error_model"] = True
    if args.command == "poly":
        params["laue"], params["wavelength_key"] = True, args.wavelength_key
        if args.wavelength_range is not None:
            params["wavelength_range"] = tuple(args.wavelength_range)
    if args.dof is not None:
        params["likelihood"], params["dof"] = "studentt", args.dof
    elif args.likelihood is not None:
        params["likelihood"] = args.likelihood
    for flag, name in (("iterations", "max_iter"), ("learning_rate", "learning_rate"), ("mlp_layers", "mlp_layers"),
                       ("mlp_width", "mlp_width"), ("mc_samples", "mc_samples"), ("batch_size", "batch_size"),
                       ("positional_encoding_frequencies", "positional_encoding")):
        if getattr(args, flag) is not None:
            params[name] = getattr(args, flag)
    if args.reference_mtz is not None:
        from .model.priors import ReferencePrior

        params["prior"] = ReferencePrior(args.reference_mtz, args.reference_prior or "normal")
    return params


# --------------------------------------------------------------------- commands
def _mono(args):
    keys = check_mono_arguments(args)
    log = _Log(args.quiet)
    for attr, (flag, reason) in IGNORED_CARELESS_FLAGS.items():
        if getattr(args, attr) is not None:
            log.warning(f"{flag} is accepted for careless compatibility and ignored: {reason}")

    import numpy as np

    from .io import writers
    from .merger import VariationalMerger
    from .plotting import plot_history, plot_statistics
    from .half_datasets import half_dataset_merges
    from .stats import merging_statistics
    from .table import read_unmerged

    spacegroup = args.spacegroups.split(",")[0].strip() if args.spacegroups else None
    X = read_unmerged(args.reflection_files, spacegroup=spacegroup, anomalous=args.anomalous, dmin=args.dmin,
                      isigi_cutoff=args.isigi_cutoff, intensity_key=args.intensity_key,
                      sigma_key=args.uncertainty_key, image_key=args.image_key)
    check_metadata_keys(keys, X)
    if args.command == "poly" and args.wavelength_key not in X.columns:
        raise UsageError(f"--wavelength-key {args.wavelength_key!r} is not a column of the files; columns: "
                         f"{', '.join(map(str, X.columns))}")
    if args.command == "poly" and args.wavelength_range and not args.wavelength_range[0] < args.wavelength_range[1]:
        raise UsageError(f"--wavelength-range {args.wavelength_range[0]:g} {args.wavelength_range[1]:g}: "
                         "give the smaller wavelength first")
    warning = partiality_warning(X, keys)
    if warning:
        log.warning(warning)
    merger = VariationalMerger(**merger_parameters(args, keys))
    test = np.random.default_rng(args.seed).random(len(X)) < args.test_fraction
    if test.all():
        raise UsageError(f"--test-fraction {args.test_fraction} leaves no observation to fit")
    X_train = X.iloc[np.flatnonzero(~test)] if test.any() else X
    log.info(f"read {len(X):,} observations of {X['asu_index'].nunique():,} reflections"
             + (" (Friedel mates apart)" if args.anomalous else "") + f" on "
             f"{X['image_id'].nunique():,} images from {len(args.reflection_files)} file(s)"
             + (f"; {int(test.sum()):,} held out for testing" if test.any() else ""))

    merger.fit(X_train)
    error_model = {"sdfac": float(merger.sdfac_), "sdadd": float(merger.sdadd_)} if args.error_model else None
    log.info(f"fitted in {merger.n_iter_} steps" + ("" if merger.converged_ else
             " (the maximum; not converged — raise --iterations)")
             + (f"; error model SdFac {merger.sdfac_:.3g}, SdAdd {merger.sdadd_:.3g}" if error_model else ""))
    merged = merger.transform(X_train)
    predictions = writers.predictions_table(X, *merger.predict_with_uncertainty(X), test=test)
    warning = None if error_model else sigma_scatter_warning(predictions)
    if warning:
        log.warning(warning)
    halves = None
    if args.merge_half_datasets:
        halves = half_dataset_merges(merger, X, n_repeats=args.half_dataset_repeats or 1,
                                     random_state=args.seed, verbose=merger.verbose)

    n_sets = len(args.reflection_files) if args.separate_files else 1
    merged_sets = writers.split_by_file(merged, n_sets)
    prediction_sets = writers.split_by_file(predictions, n_sets)
    half_sets = writers.split_by_file(halves, n_sets) if halves is not None else [None] * n_sets
    statistics = [
        merging_statistics(m, h, p, shells=args.shells, binning=args.binning, method=args.method)
        for m, h, p in zip(merged_sets, half_sets, prediction_sets)
    ]

    out = args.out
    written = []
    for i in range(n_sets):
        written.append(writers.write_mtz(merged_sets[i], f"{out}_{i}.mtz"))
        written.append(writers.write_mtz(prediction_sets[i], f"{out}_predictions_{i}.mtz"))
        if half_sets[i] is not None:
            written.append(writers.write_mtz(half_sets[i], f"{out}_xval_{i}.mtz"))
    history = writers.history_table(merger.loss_curve_)
    written.append(writers.write_csv(history, f"{out}_history.csv"))
    written.append(writers.write_joblib(merger, f"{out}.joblib"))
    names = _data_set_names(args.reflection_files, n_sets)
    written += _write_statistics(statistics, names, out, writers, error_model)
    written.append(writers.write_figure(plot_history(history), f"{out}_history.png"))
    if halves is not None or test.any():
        labels = None if n_sets == 1 else names
        written.append(writers.write_figure(plot_statistics(statistics, labels), f"{out}_cchalf.png"))
    log.info("wrote " + ", ".join(p.name for p in written))
    if not args.quiet:
        _print_statistics(statistics, names)
    return 0


def _stats(args):
    import contextlib
    import json

    import reciprocalspaceship as rs

    from .io import writers
    from .plotting import plot_statistics
    from .stats import MergingStatistics, merging_statistics

    base = Path(args.out)
    pattern = re.compile(re.escape(base.name) + r"_(\d+)\.mtz$")
    directory = base.parent if str(base.parent) else Path(".")
    if not directory.is_dir():
        raise UsageError(f"directory {str(directory)!r} does not exist")
    indices = sorted(int(m.group(1)) for p in directory.iterdir() if (m := pattern.match(p.name)))
    if not indices:
        saved = Path(f"{args.out}_stats.json")
        if not saved.is_file():
            raise UsageError(f"no merged file {args.out}_0.mtz (nor {saved.name}); give the OUT prefix of a run")
        try:
            data = json.loads(saved.read_text(encoding="utf-8"))
            statistics = [MergingStatistics.from_dict(d) for d in data["datasets"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(f"{saved}: not a skmerge statistics file ({exc})") from exc
        _print_statistics(statistics, [d.get("name") for d in data["datasets"]])
        return 0

    def read(path):
        if not Path(path).is_file():
            return None
        try:
            return rs.read_mtz(str(path))
        except (RuntimeError, OSError, ValueError) as exc:
            raise InputError(f"{path}: not a readable MTZ file ({exc})") from exc

    saved_names = {}
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        saved = json.loads(Path(f"{args.out}_stats.json").read_text(encoding="utf-8"))
        saved_names = {d["index"]: d["name"] for d in saved["datasets"]}
    statistics, names = [], []
    for i in indices:
        merged = read(f"{args.out}_{i}.mtz")
        halves = read(f"{args.out}_xval_{i}.mtz")
        predictions = read(f"{args.out}_predictions_{i}.mtz")
        statistics.append(merging_statistics(merged, halves, predictions, shells=args.shells,
                                             binning=args.binning, method=args.method))
        names.append(saved_names.get(i) or f"{base.name}_{i}.mtz")
    if args.plot:
        _check_output_prefix(args.plot)
        writers.write_figure(plot_statistics(statistics, None if len(names) == 1 else names), args.plot)
    _print_statistics(statistics, names)
    return 0


def _demo(args):
    """Simulate a data set with known truth, merge it and print the statistics."""
    import numpy as np

    from .datasets import make_unmerged
    from .merger import VariationalMerger
    from .half_datasets import half_dataset_merges
    from .stats import merging_statistics, resolution_shells

    X, truth = make_unmerged(n_images=args.images, outlier_fraction=0.01, random_state=args.seed)
    print(f"simulated {len(X):,} observations of {X['asu_index'].nunique():,} reflections on {args.images} images")
    merger = VariationalMerger(
        metadata=["dHKL", "BATCH", "XDET", "YDET"], likelihood="studentt", random_state=args.seed,
        verbose=not args.quiet,
    ).fit(X)
    print(f"fitted in {merger.n_iter_} steps")
    merged = merger.transform(X)
    halves = half_dataset_merges(merger, X, random_state=args.seed)
    statistics = merging_statistics(merged, halves, shells=args.shells)
    true = truth.merged.loc[merged.index]
    shell, limits = resolution_shells(true["dHKL"].to_numpy(), args.shells)
    f, f_true = merged["F"].to_numpy(float), true["F"].to_numpy(float)
    print(statistics)
    cc_true = [np.corrcoef(f[shell == i], f_true[shell == i])[0, 1] for i in range(args.shells)]
    print("\nCC(F, truth) in the shells above: " + " ".join(f"{c:.3f}" for c in cc_true)
          + f"; overall {np.corrcoef(f, f_true)[0, 1]:.3f}")
    return 0


# ----------------------------------------------------------------------- output
class _Log:
    def __init__(self, quiet):
        self.quiet = quiet

    def info(self, message):
        if not self.quiet:
            print(f"skmerge: {message}", file=sys.stderr, flush=True)

    def warning(self, message):
        print(f"skmerge: warning: {message}", file=sys.stderr, flush=True)


def _data_set_names(files, n_sets):
    if n_sets == 1:
        return [", ".join(Path(f).name for f in files)]
    return [Path(f).name for f in files]


def _write_statistics(statistics, names, out, writers, error_model=None):
    import pandas as pd

    tables = []
    for i, (stats, name) in enumerate(zip(statistics, names)):
        table = stats.table.reset_index()
        table.insert(0, "data_set", i)
        tables.append(table)
    document = {
        "skmerge_version": __version__,
        "datasets": [{"index": i, "name": name, **s.to_dict()} for i, (s, name) in enumerate(zip(statistics, names))],
    }
    if error_model is not None:
        document["error_model"] = error_model
    return [writers.write_csv(pd.concat(tables, ignore_index=True), f"{out}_stats.csv"),
            writers.write_json(document, f"{out}_stats.json")]


def _print_statistics(statistics, names):
    for i, (stats, name) in enumerate(zip(statistics, names)):
        if i:
            print()
        title = f"Merging statistics of data set {i}" + (f" ({name})" if name else "")
        print(stats.to_string(title=title))


def _one_line(exc):
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv=None):
    """Run the command line; returns the exit status (2 for a bad command line)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return args.run(args) or 0
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else 0
    except (UsageError, InputError) as exc:
        print(f"skmerge: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except (SkmergeError, OSError) as exc:
        print(f"skmerge: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("skmerge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
