"""The ``skmerge`` command line: argument parsing over :func:`skmerge.run_merge`.

``skmerge mono`` takes careless's common flags under the same names. The defaults of the
estimator's flags are ``VariationalMerger().get_params()``, and their values are validated
by the estimator; everything that can be checked without reading data is checked first,
and a bad command line gets one line of error and exit status 2. Nothing here imports
TensorFlow for ``--help`` and ``--version``.
"""

import argparse
import contextlib
import re
import shlex
import shutil
import sys
from pathlib import Path

from . import __version__, cli_flags
from ._convert import register as register_convert
from .diagnostics import SPECIAL_KEYS
from .errors import InputError, SkmergeError
from .analysis_cli import register as register_analysis
from .report import register as register_report
from .signals import interrupt_on_sigterm

# Flags whose destination is the VariationalMerger parameter of that name.
ESTIMATOR_DESTS = ("anomalous", "separate_files", "likelihood", "mlp_layers", "mlp_width", "image_scales",
                   "positional_encoding", "max_iter", "learning_rate", "mc_samples", "batch_size", "early_stopping",
                   "random_state", "image_model", "image_heads", "marginals")
LAUE_DESTS = ("wavelength_key", "wavelength_range")


class UsageError(Exception):
    """A command line that cannot work; reported in one line with exit status 2."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (``skmerge: error: ...``)."""

    def error(self, message):
        raise UsageError(f"{message} (see '{self.prog} --help')")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog):
        super().__init__(prog, max_help_position=34, width=min(100, shutil.get_terminal_size((100, 24)).columns))


# ---------------------------------------------------------------------- arguments
_MONO_DESCRIPTION = """\
Merge unmerged monochromatic intensities into structure-factor amplitudes by variational inference.
The flags careless shares with skmerge have careless's names and meanings.

outputs (OUT is a path prefix; its directory must exist):
  OUT_<i>.mtz              merged data set i: F, SIGF, I, SIGI, N (+ Friedel columns, DANO)
  OUT_predictions_<i>.mtz  per observation: Iobs, SigIobs, Ipred, SigIpred, Z, Weight, Scale, ... test
  OUT_xval_<i>.mtz         half-dataset merges, stacked with 'repeat' and 'half' columns (the
                           predictions and xval files in careless's layout for careless's tools)
  OUT_history.csv          loss, nll, kl per step        OUT.joblib, OUT.npz  the fitted merger
  OUT_stats.csv/.json      statistics (+ calibration)    OUT_{cchalf,calibration,history}.png  plots
  OUT_report.html          everything above as one self-contained HTML page (skmerge report OUT remakes it)
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


def _add_mono_arguments(mono, defaults):
    mono.add_argument("metadata_keys", help="comma-separated observation columns that drive the scale model, e.g. "
                      f"'dHKL,Hobs,Kobs,Lobs,XDET,YDET,BATCH'. Always available: {', '.join(SPECIAL_KEYS)}; "
                      "plus any column of the reflection files")
    mono.add_argument("reflection_files", nargs="+", metavar="REFLECTION_FILE",
                      help="unmerged MTZ, XDS_ASCII.HKL / INTEGRATE.HKL, CrystFEL .stream or DIALS .refl")
    mono.add_argument("out", metavar="OUT", help="output prefix, e.g. out/hypf (the directory must exist)")

    data = mono.add_argument_group("data")
    add_read_arguments(data, defaults)
    data.add_argument("--separate-files", action="store_true", default=defaults["separate_files"],
                      help="scale all files together but merge each file separately (OUT_0, OUT_1, ...)")

    _add_reindexing_arguments(data)

    model = mono.add_argument_group("model")
    # No default here, so that --studentt-likelihood-dof can tell a conflicting --likelihood.
    model.add_argument("--likelihood", choices=("normal", "laplace", "studentt", "mixture", "t-mixture", "two-piece"),
                       help=f"error model of the intensities (default: {defaults['likelihood']}; studentt learns its "
                       "degrees of freedom unless --studentt-likelihood-dof fixes them; mixture: a normal core and a "
                       "learned fraction of gross outliers, t-mixture: the same with a Student-t core; two-piece: a "
                       "Student-t with its own learned degrees of freedom below and above the prediction)")
    model.add_argument("--studentt-likelihood-dof", type=float, metavar="DOF", dest="dof", help="Student-t "
                       "likelihood with DOF degrees of freedom (with --likelihood studentt alone: its default)")
    model.add_argument("--error-model", "--refine-uncertainties", action="store_true", dest="error_model", help="refine the sigmas as SdFac*sqrt(sigma^2 + "
                       "(SdAdd*Ipred)^2) with the model (the default; the flag is kept for older command lines)")
    model.add_argument("--no-error-model", action="store_true", help="use the reported sigmas as they are")
    model.add_argument("--marginals", choices=("variational", "grid"), default=defaults["marginals"],
                       help="what OUT_0.mtz reports: variational, the fitted truncated normals' moments; grid, each "
                       "reflection's posterior given the fitted scales and noise model integrated on a grid of F "
                       "(honest SIGF where a few observations disagree; see docs/model.md) (default: %(default)s)")
    model.add_argument("--no-double-wilson", action="store_true", help="Wilson's prior for every amplitude: no "
                       "bivariate prior between Friedel mates (the default ties them with --anomalous)")
    model.add_argument("--reference-mtz", metavar="FILE",
                       help="prior centred on the amplitudes of this merged MTZ (Wilson where it has none)")
    model.add_argument("--reference-prior", choices=("normal", "laplace", "studentt"),
                       help="shape of the reference prior (default: normal); needs --reference-mtz")
    model.add_argument("--double-wilson-parents", metavar="PARENTS", help="per file, the file its amplitudes are "
                       "tied to by a bivariate (double-Wilson) prior, or None for roots, e.g. None,0 (needs "
                       "--separate-files)")
    model.add_argument("--double-wilson-r", metavar="R", help="per file, the prior correlation with its parent, "
                       "e.g. 0,0.95 (fixed unless --optimize-double-wilson-r; default: learned from 0.9)")
    model.add_argument("--optimize-double-wilson-r", action="store_true", help="learn the correlations")
    model.add_argument("--double-wilson-reindexing-ops", metavar="OPS", help="per file, the operator from its "
                       "indices to its parent's, separated by ';', e.g. 'x,y,z;-x,-y,z'")
    model.add_argument("--mlp-layers", type=cli_flags.auto_or_count(1), metavar="N", default=defaults["mlp_layers"],
                       help="layers of the scale network; 'auto' gives six to serial stills with image layers and "
                       "twenty to the rest (default: %(default)s)")
    model.add_argument("--mlp-width", type=int, metavar="N", default=defaults["mlp_width"],
                       help="width of the scale network (default: %(default)s)")
    model.add_argument("--disable-image-scales", action="store_false", dest="image_scales",
                       default=defaults["image_scales"], help="no scale of its own per image")
    model.add_argument("--image-model", choices=["offsets", "encoder"], default=defaults["image_model"],
                       help="how images get their own scale: an offset per image, or an embedding computed from "
                       "each image's own observations, which serves images the fit never saw (default: "
                       "%(default)s)")
    model.add_argument("--image-heads", action=argparse.BooleanOptionalAction, default=defaults["image_heads"],
                       help="give each image its own weights on learned combinations of the scale network's last "
                       "hidden layer, with a prior whose width the fit learns from how much the images differ "
                       "(needs --image-model offsets; default: on for serial stills, off for rotation series and "
                       "Laue data)")
    model.add_argument("-L", "--positional-encoding-frequencies", type=int, metavar="N", dest="positional_encoding",
                       default=defaults["positional_encoding"], help="positional encoding of every metadata "
                       "column with N frequencies (default: %(default)s; 0 is none)")

    fit = mono.add_argument_group("optimisation")
    fit.add_argument("--iterations", type=int, metavar="N", dest="max_iter", default=defaults["max_iter"],
                     help="maximum number of gradient steps (default: %(default)s); unlike careless, "
                     "skmerge stops earlier once the loss has converged")
    fit.add_argument("--learning-rate", type=float, metavar="RATE", default=defaults["learning_rate"],
                     help="Adam learning rate (default: %(default)s)")
    fit.add_argument("--mc-samples", type=int, metavar="N", default=defaults["mc_samples"],
                     help="Monte Carlo samples per step (default: %(default)s)")
    fit.add_argument("--batch-size", type=int, metavar="IMAGES", default=defaults["batch_size"],
                     help="train on random batches of this many whole images per step, so that a step's time "
                     "and memory do not grow with the data (default: every image in every step)")
    fit.add_argument("--early-stopping", action="store_true", default=defaults["early_stopping"],
                     help="choose the number of steps on 10%% of the images held out (the step of their best "
                     "likelihood), then refit on every image for that many steps (helps serial stills fitted "
                     "without --error-model)")
    fit.add_argument("--seed", type=int, default=0, dest="random_state", metavar="SEED",
                     help="random seed of the fit and of all splits (default: %(default)s)")

    parallel = mono.add_argument_group("data-parallel training", "run the same command in every worker process "
                                       "(tf.distribute.MultiWorkerMirroredStrategy); worker 0 writes the outputs. "
                                       "Without --workers, TF_CONFIG in the environment (2 or more tasks) does the "
                                       "same")
    parallel.add_argument("--workers", metavar="HOST:PORT,...", help="the host:port of every worker, the same "
                          "list in each")
    parallel.add_argument("--worker-index", type=int, metavar="I", help="this worker's position in --workers "
                          "(0 … number of workers − 1)")

    validation = mono.add_argument_group("validation")
    validation.add_argument("--test-fraction", type=float, default=0.0, metavar="F", help="hold out this fraction "
                            "of the observations from the fit; CCpred and the σ calibration use them (default: 0)")
    validation.add_argument("--merge-half-datasets", action="store_true", help="after the fit, freeze the scales "
                            "and merge random halves of the images (OUT_xval_<i>.mtz, CC1/2, CCanom)")
    validation.add_argument("--half-dataset-repeats", type=int, metavar="N",
                            help="number of random half splits (default: 1); needs --merge-half-datasets")
    validation.add_argument("--no-shadow-mask", dest="mask_shadows", action="store_false",
                            help="keep the observations behind a detector shadow (default: after the fit, find "
                            "detector regions where strongly predicted spots come out below a fifth of their "
                            "prediction, as behind an unmasked beam-stop arm, or a zone around the beam where they "
                            "come out more than twice or less than half their prediction, report them and fit again "
                            "without their observations; needs detector-position columns such as XDET,YDET or X,Y)")

    output = mono.add_argument_group("output")
    _add_table_arguments(output)
    output.add_argument("--disable-progress-bar", action="store_true", help="no progress bars")
    output.add_argument("--quiet", action="store_true", help="print nothing but warnings and errors (implies "
                        "--disable-progress-bar)")

    cli_flags.add_arguments(mono, defaults)


def _add_reindexing_arguments(group):
    group.add_argument("--reindexing-ops", metavar="OPS", help="indexing ambiguity: 'auto' (the default) resolves it "
                       "between the twin laws of the lattice, 'none' merges the images as indexed, or give the "
                       "operators separated by ';', e.g. '-h,-k,l' (each image's choice: OUT_reindexing.csv)")
    group.add_argument("--disable-index-disambiguation", action="store_true",
                       help="merge the images as indexed (the same as --reindexing-ops none)")
    group.add_argument("--reindexing-reference", metavar="FILE", help="merged MTZ whose setting the merge takes "
                       "when the indexing is ambiguous (default: the setting of most images)")


def _reindexing(args):
    """The reindexing parameters of the ambiguity flags."""
    if args.disable_index_disambiguation:
        if args.reindexing_ops not in (None, "none"):
            raise UsageError("--disable-index-disambiguation contradicts --reindexing-ops " + args.reindexing_ops)
        return {"reindexing": "none"}
    params = {}
    if args.reindexing_ops is not None:
        text = args.reindexing_ops.strip()
        params["reindexing"] = text if text in ("auto", "none") else [op.strip() for op in text.split(";")]
    if args.reindexing_reference is not None:
        params["reindexing_reference"] = args.reindexing_reference
    return params


def add_read_arguments(data, defaults):
    """The flags of skmerge.read_unmerged's read options (see :func:`read_options`)."""
    data.add_argument("--anomalous", action="store_true", default=defaults["anomalous"], help="keep Friedel mates apart")
    data.add_argument("-d", "--dmin", type=float, metavar="DMIN", help="high-resolution limit in Å (default: all data)")
    data.add_argument("-c", "--isigi-cutoff", type=float, metavar="ISIGI",
                      help="drop observations with I/σ(I) below this (default: keep all)")
    data.add_argument("--spacegroups", metavar="SPACEGROUP", help="space group for merging, e.g. 'P 21 21 21' "
                      "(a comma-separated list must name one space group); default: the files'")
    data.add_argument("--cell", type=float, nargs=6, metavar=("A", "B", "C", "AL", "BE", "GA"),
                      help="unit cell in Å and degrees for every file (default: the files')")
    data.add_argument("--intensity-key", metavar="KEY", help="intensity column (default: the first of MTZ type J)")
    data.add_argument("--uncertainty-key", metavar="KEY", help="σ column (default: the σ partner of the intensity)")
    data.add_argument("--image-key", metavar="KEY", help="image-number column (default: the first of MTZ type B)")
    data.add_argument("--drop-invalid", action="store_true", help="drop observations with non-finite I or σ, or σ ≤ 0")


def _add_poly_arguments(poly, defaults):
    _add_mono_arguments(poly, defaults)
    laue = poly.add_argument_group("Laue")
    laue.add_argument("-w", "--wavelength-key", default=defaults["wavelength_key"], metavar="KEY",
                      help="column with each spot's wavelength in Å (default: %(default)s)")
    laue.add_argument("-l", "--wavelength-range", type=float, nargs=2, metavar=("LAMBDA_MIN", "LAMBDA_MAX"),
                      default=defaults["wavelength_range"], help="band of the beam in Å for the harmonic expansion "
                      "(default: each file's smallest and largest recorded wavelength)")
    laue.add_argument("--spectral-file", metavar="FILE", help="the incident spectrum: a text file of two columns, "
                      "wavelength (Å) and relative flux; every harmonic's scale is the flux at its wavelength times "
                      "the scale model's, which learns what the spectrum leaves (careless replaces its network by "
                      "the spectrum; give fewer metadata keys for the same)")
    laue.add_argument("--lorentz-correction", action="store_true", default=defaults["lorentz_correction"],
                      help="multiply every harmonic's scale by its Lorentz factor λ⁴/sin²θ")


def _add_table_arguments(group):
    group.add_argument("--shells", type=int, default=10, metavar="N",
                       help="resolution shells of the statistics table (default: %(default)s)")
    group.add_argument("--binning", choices=("equal-count", "equal-volume"), default="equal-count",
                       help="shells with equal numbers of measured reflections, or of possible reflections "
                       "(≈ equal reciprocal volume) (default: %(default)s)")
    group.add_argument("--method", choices=("pearson", "spearman"), default="pearson",
                       help="correlation coefficient of CC1/2, CCanom and CCpred (default: %(default)s)")


def build_parser():
    from .merger import VariationalMerger

    defaults = VariationalMerger().get_params()
    parser = _Parser(prog="skmerge", formatter_class=_Formatter,
                     description="Merge X-ray diffraction data by variational inference.")
    parser.add_argument("--version", action="version", version=f"skmerge {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    mono = commands.add_parser("mono", help="merge monochromatic data (careless mono's flags)",
                               description=_MONO_DESCRIPTION, epilog=_MONO_EPILOG, formatter_class=_Formatter)
    _add_mono_arguments(mono, defaults)
    poly = commands.add_parser("poly", help="merge polychromatic (Laue) data (careless poly's flags)",
                               description=_POLY_DESCRIPTION, epilog=_POLY_EPILOG, formatter_class=_Formatter)
    _add_poly_arguments(poly, defaults)
    for command in (mono, poly):
        # The flag of each destination, to name it in error messages.
        flags = {a.dest: max(a.option_strings, key=len) for a in command._actions if a.option_strings}
        command.set_defaults(run=_mono, flag_of=flags)

    stats = commands.add_parser(
        "stats", help="print the merging-statistics table of a finished run", formatter_class=_Formatter,
        description="Recompute the merging-statistics table and the calibration from the MTZ files of a run "
        "(OUT_<i>.mtz, OUT_xval_<i>.mtz, OUT_predictions_<i>.mtz; careless's SigF/SigI names are read too), or "
        "print OUT_stats.json when the MTZ files are gone.")
    stats.add_argument("out", metavar="OUT", help="the output prefix of the run, e.g. out/hypf")
    _add_table_arguments(stats)
    stats.add_argument("--plot", metavar="PNG", help="also draw CC1/2, CCanom and CCpred against resolution")
    stats.set_defaults(run=_stats)

    demo = commands.add_parser("demo", help="simulate a data set, merge it and print the statistics",
                               formatter_class=_Formatter)
    demo.add_argument("--images", type=int, default=90, help="number of simulated images (default %(default)s)")
    demo.add_argument("--shells", type=int, default=8, help="resolution shells in the table (default %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(run=_demo)
    register_report(commands)
    register_analysis(commands, _Formatter)
    register_convert(commands)
    return parser


def merger_parameters(args, keys):
    """VariationalMerger parameters of a parsed ``mono`` or ``poly`` command line."""
    dests = ESTIMATOR_DESTS + (LAUE_DESTS if args.command == "poly" else ())
    params = {name: getattr(args, name) for name in dests if getattr(args, name) is not None}
    params["metadata"] = keys
    params["verbose"] = 0 if (args.quiet or args.disable_progress_bar) else 1
    if args.command == "poly":
        params["laue"] = True
        if args.wavelength_range is not None:
            params["wavelength_range"] = tuple(args.wavelength_range)
        params["lorentz_correction"] = args.lorentz_correction
        if args.spectral_file is not None:
            from .laue import read_spectrum

            params["spectrum"] = read_spectrum(args.spectral_file)
    if args.dof is not None:
        from .model.likelihoods import StudentTLikelihood

        params["likelihood"] = StudentTLikelihood(dof=args.dof)
    if args.no_error_model:
        params["error_model"] = None
    if args.no_double_wilson:
        params["prior"] = "wilson"
    if args.reference_mtz is not None:
        from .model.priors import ReferencePrior

        params["prior"] = ReferencePrior(args.reference_mtz, args.reference_prior or "normal")
    if _double_wilson_flags(args):
        params["prior"] = _double_wilson_prior(args)
    params.update(cli_flags.parameters(args, keys))
    if args.wilson_prior_b is not None:
        params["prior"] = cli_flags.with_wilson_b(params.get("prior"), args.wilson_prior_b)
    params.update(_reindexing(args))
    return params


def _double_wilson_flags(args):
    names = ("double_wilson_parents", "double_wilson_r", "double_wilson_reindexing_ops")
    return [args.flag_of[n] for n in names if getattr(args, n) is not None] + (
        ["--optimize-double-wilson-r"] if args.optimize_double_wilson_r else [])


def _double_wilson_prior(args):
    """careless's double-Wilson flags as a DoubleWilsonPrior."""
    from .model.double_wilson import DoubleWilsonPrior

    def listed(dest, convert):
        text = getattr(args, dest)
        if text is None:
            return None
        try:
            return [convert(v.strip()) for v in text.split(";" if dest.endswith("ops") else ",")]
        except ValueError:
            raise UsageError(f"{args.flag_of[dest]} {text}: give one value per file, separated by "
                             f"'{';' if dest.endswith('ops') else ','}'") from None

    r = listed("double_wilson_r", float)
    return DoubleWilsonPrior(parents=listed("double_wilson_parents", lambda v: None if v.lower() == "none" else int(v)),
                             r=0.9 if r is None else r, learn_r=r is None or args.optimize_double_wilson_r,
                             reindexing_ops=listed("double_wilson_reindexing_ops", str))


def read_options(args):
    """The read options of :func:`skmerge.read_unmerged` the flags give."""
    return dict(spacegroup=args.spacegroups.split(",")[0].strip() if args.spacegroups else None, cell=args.cell,
                dmin=args.dmin, isigi_cutoff=args.isigi_cutoff, intensity_key=args.intensity_key,
                sigma_key=args.uncertainty_key, image_key=args.image_key, drop_invalid=args.drop_invalid or None)


def workflow_options(args):
    """The options of :func:`skmerge.run_merge` other than the estimator's."""
    return dict(**read_options(args),
                half_datasets=(args.half_dataset_repeats or 1) if args.merge_half_datasets else 0,
                test_fraction=args.test_fraction, track_test_loss=args.validation_frequency is not None,
                mask_shadows=args.mask_shadows, shells=args.shells, binning=args.binning, method=args.method)


# ------------------------------------------------------------------- validation
def check_mono_arguments(args):
    """Every check that needs no reading of the data; raises UsageError. Returns the
    metadata keys as a list."""
    keys = [k.strip() for k in args.metadata_keys.split(",")]
    if not args.metadata_keys.strip() or any(not k for k in keys):
        raise UsageError(f"metadata keys {args.metadata_keys!r}: give comma-separated column names, "
                         f"e.g. 'dHKL,Hobs,Kobs,Lobs' (always available: {','.join(SPECIAL_KEYS)})")
    keys = list(dict.fromkeys(keys))
    cli_flags.check_arguments(args, UsageError)
    if args.wilson_prior_b is not None and args.reference_mtz is not None:
        raise UsageError("--wilson-prior-b conflicts with --reference-mtz: choose one prior")
    if args.reference_mtz is not None and not Path(args.reference_mtz).is_file():
        raise UsageError(f"--reference-mtz {args.reference_mtz}: no such file")
    if args.reference_prior is not None and args.reference_mtz is None:
        raise UsageError("--reference-prior needs --reference-mtz FILE")
    if args.error_model and args.no_error_model:
        raise UsageError("--error-model conflicts with --no-error-model")
    if args.no_double_wilson and _double_wilson_flags(args):
        raise UsageError(f"{_double_wilson_flags(args)[0]} conflicts with --no-double-wilson")
    if args.reference_mtz is not None and _double_wilson_flags(args):
        raise UsageError(f"{_double_wilson_flags(args)[0]} conflicts with --reference-mtz: choose one prior")
    if args.double_wilson_parents is not None and not args.separate_files:
        raise UsageError("--double-wilson-parents ties files together; merge them with --separate-files")
    if args.dof is not None and args.likelihood not in (None, "studentt"):
        raise UsageError(f"--studentt-likelihood-dof conflicts with --likelihood {args.likelihood}")
    if args.half_dataset_repeats is not None and not args.merge_half_datasets:
        raise UsageError("--half-dataset-repeats needs --merge-half-datasets")
    if args.half_dataset_repeats is not None and args.half_dataset_repeats < 1:
        raise UsageError(f"--half-dataset-repeats {args.half_dataset_repeats}: give at least 1 repeat")
    if args.spacegroups is not None:
        groups = [re.sub(r"\s+", " ", g.strip()) for g in args.spacegroups.split(",")]
        if "" in groups:
            raise UsageError(f"--spacegroups {args.spacegroups!r}: empty space group")
        if len(groups) not in (1, len(args.reflection_files)):
            raise UsageError(f"--spacegroups gives {len(groups)} space groups for {len(args.reflection_files)} "
                             "files; give one, or one per file")
        if len(set(groups)) > 1:
            raise UsageError(f"--spacegroups {args.spacegroups!r}: skmerge merges files of one space group; "
                             "give one space group for all files")
    if (args.workers is None) != (args.worker_index is None):
        raise UsageError("--workers and --worker-index go together: give the list of every worker and this one's "
                         "position in it")
    if args.command == "poly" and args.wavelength_range and not args.wavelength_range[0] < args.wavelength_range[1]:
        raise UsageError(f"--wavelength-range {args.wavelength_range[0]:g} {args.wavelength_range[1]:g}: "
                         "give the smaller wavelength first")
    return keys


def check_values(args, params):
    """Validate every flag's value through the estimator (``params``) or the workflow's
    options, one flag at a time so that the error names it; raises UsageError."""
    from .errors import ParameterError
    from .workflow import check_options, make_merger

    checks = [("dof" if name == "likelihood" and args.dof is not None else name, make_merger, {name: value})
              for name, value in params.items()]
    checks += [(name, check_options, {name: getattr(args, name)}) for name in ("test_fraction", "shells")]
    for dest, check, values in checks:
        try:
            check(**values)
        except ParameterError as exc:
            raise UsageError(f"{args.flag_of.get(dest, dest)} {getattr(args, dest, '')}: {_one_line(exc)}") from None


# --------------------------------------------------------------------- commands
def _mono(args):
    keys = check_mono_arguments(args)
    params = merger_parameters(args, keys)
    check_values(args, params)
    log = _logger(args.quiet)
    cli_flags.configure_tensorflow(args)
    scope, chief = _data_parallel(args, log)
    with scope:
        merger, params = cli_flags.transfer(args, params, UsageError)

        from .workflow import format_statistics, run_merge

        result = run_merge(args.reflection_files, args.out if chief else None, merger=merger, log=log,
                           command=args.command_line, **workflow_options(args), **params)
    if not chief:
        return 0
    if not args.quiet:
        print(format_statistics(result.statistics, result.names, result.calibration))
    cli_flags.after_run(args, result, log)
    return 0


def _data_parallel(args, log):
    """The scope the run's fits train in (the multi-worker strategy's of --workers or
    TF_CONFIG, or none) and whether this process writes the outputs."""
    from .errors import ParameterError
    from .model import distributed

    if args.workers is None and distributed.tf_config_workers() < 2:
        return contextlib.nullcontext(), True
    try:
        strategy = distributed.multi_worker_strategy(args.workers, args.worker_index)
    except ParameterError as exc:
        flags = f"--workers {args.workers} --worker-index {args.worker_index}" if args.workers else "TF_CONFIG"
        raise UsageError(f"{flags}: {_one_line(exc)}") from None
    chief = distributed.is_chief(strategy)
    log("info", f"data-parallel fit over {strategy.num_replicas_in_sync} workers"
        + ("; this one writes the outputs" if chief else "; the chief writes the outputs"))
    return strategy.scope(), chief


def _stats(args):
    from .io import writers
    from .plotting import plot_statistics
    from .workflow import calibration_from_outputs, format_statistics, statistics_from_outputs

    if args.plot:
        writers.check_output_prefix(args.plot)
    statistics, names = statistics_from_outputs(args.out, shells=args.shells, binning=args.binning, method=args.method)
    if args.plot:
        writers.write_figure(plot_statistics(statistics, None if len(names) == 1 else names), args.plot)
    print(format_statistics(statistics, names, calibration_from_outputs(args.out, statistics)))
    return 0


def _demo(args):
    """Simulate a data set with known truth, merge it and print the statistics."""
    import numpy as np

    from .datasets import make_unmerged
    from .stats import resolution_shells
    from .workflow import run_merge

    X, truth = make_unmerged(n_images=args.images, outlier_fraction=0.01, random_state=args.seed)
    print(f"simulated {len(X):,} observations of {X['asu_index'].nunique():,} reflections on {args.images} images")
    result = run_merge(X, metadata=["dHKL", "BATCH", "XDET", "YDET"], likelihood="studentt", random_state=args.seed,
                       verbose=int(not args.quiet), half_datasets=1, shells=args.shells, log=_logger(quiet=True))
    print(f"fitted in {result.merger.n_iter_} steps")
    true = truth.merged.loc[result.merged[0].index]
    shell, _ = resolution_shells(true["dHKL"].to_numpy(), args.shells)
    f, f_true = result.merged[0]["F"].to_numpy(float), true["F"].to_numpy(float)
    print(result.statistics[0])
    cc_true = [np.corrcoef(f[shell == i], f_true[shell == i])[0, 1] for i in range(args.shells)]
    print("\nCC(F, truth) in the shells above: " + " ".join(f"{c:.3f}" for c in cc_true)
          + f"; overall {np.corrcoef(f, f_true)[0, 1]:.3f}")
    return 0


# ----------------------------------------------------------------------- output
def _logger(quiet):
    """The workflow's log callback: status lines (unless quiet) and warnings on stderr."""
    def log(level, message):
        if level == "warning" or not quiet:
            print(f"skmerge: {'warning: ' if level == 'warning' else ''}{message}", file=sys.stderr, flush=True)
    return log


def _one_line(exc):
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv=None):
    """Run the command line; returns the exit status (2 for a bad command line)."""
    try:
        args = build_parser().parse_args(argv)
        args.command_line = shlex.join(["skmerge", *(sys.argv[1:] if argv is None else argv)])
        with interrupt_on_sigterm():  # a killed run cleans up as an interrupted one
            return args.run(args) or 0
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else 0
    except (UsageError, SkmergeError, OSError) as exc:
        print(f"skmerge: error: {_one_line(exc)}", file=sys.stderr)
        return 2 if isinstance(exc, (UsageError, InputError)) else 1
    except KeyboardInterrupt:
        print("skmerge: interrupted; outputs of earlier runs are unchanged", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
