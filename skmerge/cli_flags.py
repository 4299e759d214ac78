"""careless's model, optimiser and TensorFlow flags of ``skmerge mono`` and ``skmerge poly``.

:mod:`skmerge.cli` defines the flags the two programs share by meaning (data, model,
validation, output); this module adds the rest of careless 0.5.4's flags under careless's
names, turns them into :class:`~skmerge.VariationalMerger` parameters, sets TensorFlow up
as they ask, and reads the files of ``--scale-file`` and ``--structure-factor-file``.
"""

import argparse
import os
from pathlib import Path

from .errors import InputError

# Flags whose destination is the VariationalMerger parameter of that name.
ESTIMATOR_DESTS = ("image_layers", "kl_weight", "beta_1", "beta_2", "clipnorm", "clipvalue", "global_clipnorm",
                   "epsilon", "scale_bijector", "validation_frequency", "jit_compile")

# How a saved merger of an earlier run is named: careless's OUT_scale / OUT_structure_factor
# name the run OUT, whose skmerge merger is OUT.npz (safe format) or OUT.joblib.
_CARELESS_SUFFIXES = ("_scale", "_structure_factor")
_MERGER_SUFFIXES = (".npz", ".joblib")


def add_arguments(parser, defaults):
    """Add careless's flags that :mod:`skmerge.cli` does not define to a ``mono`` or
    ``poly`` parser; ``defaults`` are ``VariationalMerger().get_params()``."""
    transfer = parser.add_argument_group(
        "transfer from an earlier run", "FILE is an earlier run's output prefix OUT (its OUT.npz or OUT.joblib), "
        "careless's OUT_scale / OUT_structure_factor naming of it, or the merger file itself")
    transfer.add_argument("--scale-file", metavar="FILE", help="start the scale model (network, image offsets, "
                          "metadata standardisation, error model) from this run's; the metadata keys and "
                          "--mlp-layers/--mlp-width must be the run's (taken from it when not given)")
    transfer.add_argument("--freeze-scales", action="store_true", help="keep those scales fixed: only the "
                          "amplitudes are fitted (needs --scale-file)")
    transfer.add_argument("--structure-factor-file", metavar="FILE", help="start the amplitudes from this run's "
                          "posterior, or from a merged MTZ with F/SIGF (F(+)/F(-) with --anomalous; skmerge's "
                          "or careless's OUT_0.mtz, which careless's OUT_structure_factor also finds)")
    transfer.add_argument("--freeze-structure-factors", action="store_true", help="keep those amplitudes fixed: "
                          "only the scale model is fitted (needs --structure-factor-file)")
    transfer.add_argument("--structure-factor-init-scale", type=float, metavar="S", help="start every amplitude "
                          "from the prior instead of the data, with S times the prior's width (careless's start)")

    model = parser.add_argument_group("careless model options")
    model.add_argument("--kl-weight", type=float, metavar="W", default=defaults["kl_weight"],
                       help="weight of the KL divergence relative to the likelihood (default: %(default)s, the ELBO)")
    model.add_argument("--wilson-prior-b", type=float, metavar="B", help="Wilson prior whose mean intensity "
                       "falls off with this B factor in Å² (0: flat, careless's default; skmerge's default: the "
                       "data's own fall-off)")
    model.add_argument("--epsilon", type=float, metavar="EPS", default=defaults["epsilon"], help="floor of the "
                       "amplitudes' posterior width in standardised units (⟨F²/ε⟩ = 1), for numerical stability "
                       "(default: %(default)s)")
    model.add_argument("--scale-bijector", choices=("exp", "softplus"), default=defaults["scale_bijector"],
                       help="function keeping the spread of the scales positive (default: %(default)s)")
    model.add_argument("--disable-metadata-standardization", action="store_true", help="feed the metadata to "
                       "the scale network as they are (dHKL as 1/d²) instead of as z-scores")
    model.add_argument("--positional-encoding-keys", metavar="KEYS", help="comma-separated metadata keys that "
                       "-L encodes (default: every key)")
    model.add_argument("--image-layers", type=auto_or_count(0), metavar="N", default=defaults["image_layers"],
                       help="add N layers whose weights belong to each image after the scale network, so that "
                       "every image can bend the metadata's effect on its scale its own way; 'auto' gives three to "
                       "serial stills and none to rotation series or Laue data (default: %(default)s)")

    optimiser = parser.add_argument_group("careless optimiser options")
    optimiser.add_argument("--beta-1", type=float, metavar="B1", default=defaults["beta_1"],
                           help="Adam's beta_1 (default: %(default)s)")
    optimiser.add_argument("--beta-2", type=float, metavar="B2", default=defaults["beta_2"],
                           help="Adam's beta_2 (default: %(default)s)")
    optimiser.add_argument("--clipnorm", type=float, metavar="N", help="clip each weight's gradient to this norm")
    optimiser.add_argument("--clipvalue", type=float, metavar="V", help="clip every gradient element to ±V")
    optimiser.add_argument("--global-clipnorm", type=float, metavar="N",
                           help="clip all the gradients together to this norm")
    optimiser.add_argument("--validation-frequency", type=int, metavar="N", help="with --test-fraction, record "
                           "the held-out observations' loss every N steps (OUT_history.csv's test_loss column; "
                           "careless's default is 10; without the flag it is not recorded)")

    tensorflow = parser.add_argument_group("TensorFlow", "GPU flags act on a machine with a GPU; without one they "
                                           "are accepted and there is nothing to select")
    tensorflow.add_argument("--run-eagerly", action="store_true", help="run TensorFlow eagerly, step by step "
                            "(slow; for debugging)")
    tensorflow.add_argument("--jit-compile", action="store_true", default=defaults["jit_compile"],
                            help="compile the training loop with XLA")
    tensorflow.add_argument("--reduce-retracing", action="store_true", help="accepted: skmerge's training loop "
                            "is traced once per fit, so there is no retracing to reduce")
    tensorflow.add_argument("--disable-gpu", action="store_true", help="run on the CPU only")
    tensorflow.add_argument("--gpu-id", type=int, metavar="ID", help="use this GPU (0 … number of GPUs − 1)")
    tensorflow.add_argument("--disable-memory-growth", action="store_true",
                            help="let TensorFlow take the whole GPU memory at the start")
    tensorflow.add_argument("--tf-debug", action="store_true", help="show TensorFlow's own log messages")

    parser.set_defaults(estimator_defaults=defaults)
    debug = parser.add_argument_group("inspection")
    debug.add_argument("--embed", action="store_true", help="open an interactive Python shell at the end with "
                       "the run's result, merger and observation table")
    debug.add_argument("--save-data-manager", action="store_true", help="also write the observation table the "
                       "model was fitted on (OUT_data.joblib; careless pickles its data manager)")


def auto_or_count(minimum):
    """An argparse type: "auto" or a whole number of layers, at least ``minimum``."""
    def parse(text):
        if text == "auto":
            return text
        try:
            count = int(text)
        except ValueError:
            count = minimum - 1
        if count < minimum:
            raise argparse.ArgumentTypeError(f"expected 'auto' or a number of layers ({minimum}, {minimum + 1}, "
                                             f"…), got {text!r}")
        return count
    return parse


def check_arguments(args, usage_error):
    """Checks of these flags that need no data; raises ``usage_error(message)``."""
    if args.freeze_scales and args.scale_file is None:
        raise usage_error("--freeze-scales needs --scale-file FILE (the scales to keep)")
    if args.freeze_structure_factors and args.structure_factor_file is None:
        raise usage_error("--freeze-structure-factors needs --structure-factor-file FILE (the amplitudes to keep)")
    if args.freeze_scales and args.freeze_structure_factors:
        raise usage_error("--freeze-scales with --freeze-structure-factors leaves nothing to fit")
    if args.structure_factor_init_scale is not None and args.structure_factor_file is not None:
        raise usage_error("--structure-factor-init-scale conflicts with --structure-factor-file")
    if args.gpu_id is not None and args.gpu_id < 0:
        raise usage_error(f"--gpu-id {args.gpu_id}: give 0 or more")
    for flag in ("scale_file", "structure_factor_file"):
        if getattr(args, flag) is not None:
            transfer_source(getattr(args, flag), args.flag_of[flag], usage_error)


def parameters(args, keys):
    """The VariationalMerger parameters of these flags (``keys``: the metadata keys)."""
    params = {name: getattr(args, name) for name in ESTIMATOR_DESTS if getattr(args, name) is not None}
    params["standardize_metadata"] = not args.disable_metadata_standardization
    if args.positional_encoding_keys is not None:
        params["positional_encoding_keys"] = [k.strip() for k in args.positional_encoding_keys.split(",")]
    if args.structure_factor_init_scale is not None:
        params["posterior_init"] = args.structure_factor_init_scale
    return params


def with_wilson_b(prior, b_factor):
    """The prior parameter with the Wilson B of ``--wilson-prior-b`` set.

    Examples
    --------
    >>> with_wilson_b("wilson", 0.0)
    WilsonPrior(b_factor=0.0)
    """
    from .model.double_wilson import DoubleWilsonPrior
    from .model.priors import WilsonPrior

    if prior == "wilson":
        return WilsonPrior(b_factor=b_factor)
    if prior in (None, "double-wilson"):
        return DoubleWilsonPrior(b_factor=b_factor)
    if hasattr(prior, "b_factor"):
        return prior.set_params(b_factor=b_factor)
    raise InputError("--wilson-prior-b sets the B of a Wilson or double-Wilson prior, not of --reference-mtz's")


def _prefixes(text):
    """The output prefixes an argument may name: itself, and without careless's suffix."""
    return [Path(text)] + [Path(text[:-len(s)]) for s in _CARELESS_SUFFIXES if text.endswith(s)]


def transfer_source(text, flag, usage_error):
    """What a ``--scale-file`` / ``--structure-factor-file`` argument names: ("merger",
    path) of a saved merger, or ("mtz", path) of a merged MTZ (only for structure factors:
    the file itself, or a run's OUT_0.mtz when no merger of the run is left). Raises
    ``usage_error`` when it names neither.

    Examples
    --------
    >>> transfer_source("merge/hewl_scale", "--scale-file", ValueError)
    Traceback (most recent call last):
    ...
    ValueError: --scale-file merge/hewl_scale: found no saved merger (merge/hewl_scale.npz, merge/hewl.npz or .joblib); careless's own TensorFlow checkpoints cannot be read
    """
    path = Path(text)
    if path.suffix in _MERGER_SUFFIXES and path.is_file():
        return "merger", path
    if path.suffix.lower() == ".mtz":
        if flag == "--scale-file":
            raise usage_error(f"--scale-file {text}: an MTZ holds no scale model; give an earlier run's OUT prefix")
        if not path.is_file():
            raise usage_error(f"{flag} {text}: no such file")
        return "mtz", path
    for prefix in _prefixes(text):
        for suffix in _MERGER_SUFFIXES:
            candidate = Path(f"{prefix}{suffix}")
            if candidate.is_file():
                return "merger", candidate
    merged = _merged_beside(text)
    if flag == "--structure-factor-file" and merged is not None:
        return "mtz", merged
    raise usage_error(f"{flag} {text}: found no saved merger ({', '.join(f'{p}.npz' for p in _prefixes(text))} or "
                      ".joblib)" + (" nor merged OUT_0.mtz" if flag == "--structure-factor-file" else "")
                      + "; careless's own TensorFlow checkpoints cannot be read")


def _merged_beside(text):
    """The merged OUT_0.mtz of the run an argument names, or None."""
    for prefix in _prefixes(text)[::-1]:
        merged = Path(f"{prefix}_0.mtz")
        if merged.is_file():
            return merged
    return None


def transfer(args, params, usage_error):
    """The merger to fit and its parameters when ``--scale-file`` or
    ``--structure-factor-file`` is given: (merger or None, params).

    A scale file's merger is fitted again with ``warm_start`` (its scales, and its
    posterior too when it is also the structure-factor file); the parameters that shape
    its scale model are its own unless the command line gives them. Structure factors
    from another source start the posterior through ``posterior_init``: the merged MTZ
    (which a merger saved in the safe format keeps as a path), or the posterior of a
    saved merger named by its file.
    """
    from . import load

    merger = None
    if args.scale_file is not None:
        _, path = transfer_source(args.scale_file, "--scale-file", usage_error)
        merger = load(path)
        for name in ("mlp_layers", "mlp_width", "image_layers", "image_heads", "positional_encoding", "image_scales",
                     "scale_bijector", "standardize_metadata", "positional_encoding_keys", "error_model", "likelihood"):
            if name not in params or params[name] == args.estimator_defaults[name]:
                params[name] = merger.get_params()[name]
        params["warm_start"] = "scales"
        if args.freeze_scales:
            params["freeze"] = "scales"
    if args.structure_factor_file is not None:
        text = args.structure_factor_file
        kind, path = transfer_source(text, "--structure-factor-file", usage_error)
        merged = _merged_beside(text)
        if merger is not None and kind == "merger" and path.resolve() == _resolved(args.scale_file):
            params["warm_start"] = True
        elif kind == "merger" and merged is None:
            params["posterior_init"] = _posterior_table(path)
        else:
            params["posterior_init"] = path if kind == "mtz" else merged
        if args.freeze_structure_factors:
            params["freeze"] = "posterior"
    return merger, params


def _resolved(text):
    _, path = transfer_source(text, "--scale-file", InputError)
    return path.resolve()


def _posterior_table(path):
    """The merged table (F, SIGF and Friedel halves) of every reflection of a saved
    merger's posterior."""
    from . import load
    from .model.fitted import FitState

    merger = load(path)
    state = FitState.from_attributes(merger)
    return state.table(merger, merger._get_model(), state.reflections.keys)


def configure_tensorflow(args):
    """Set TensorFlow up as the TensorFlow flags say, before anything runs on it."""
    if args.tf_debug:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
    from ._tf import tf

    gpus = tf.config.list_physical_devices("GPU")
    if args.disable_gpu:
        tf.config.set_visible_devices([], "GPU")
    elif gpus:
        if args.gpu_id is not None and args.gpu_id >= len(gpus):
            raise InputError(f"--gpu-id {args.gpu_id}: this machine has {len(gpus)} GPU(s) (0 … {len(gpus) - 1})")
        chosen = gpus[args.gpu_id or 0]
        tf.config.set_visible_devices([chosen], "GPU")
        tf.config.experimental.set_memory_growth(chosen, not args.disable_memory_growth)
    if args.run_eagerly:
        tf.config.run_functions_eagerly(True)


def after_run(args, result, log):
    """``--save-data-manager`` and ``--embed`` once the run has written its outputs."""
    if args.save_data_manager:
        from .io.writers import write_joblib

        path = write_joblib(result.observations, f"{args.out}_data.joblib")
        log("info", f"wrote {path.name}")
    if args.embed:
        import code

        code.interact(banner="skmerge: result, merger and X are the run's (exit with Ctrl-D)",
                      local={"result": result, "merger": result.merger, "X": result.observations})
