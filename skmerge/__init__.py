"""skmerge: merge unmerged X-ray diffraction data by variational inference.

The package speaks numpy, pandas and reciprocalspaceship; TensorFlow is imported only
when a model is built, so reading data and the command line's help stay fast.
"""

from importlib import import_module

from .errors import (DamagedFileError, DataWarning, IncompatibleVersionError, InputError, NotSerializableError,
                     NumericalError, SkmergeError)

__version__ = "0.2.0"

# Public names that live in modules importing TensorFlow are loaded on first use.
_LAZY = {
    "read_unmerged": "skmerge.table",
    "write_store": "skmerge.store",
    "store": "skmerge.store",
    "load": "skmerge._persistence",
    "merge_inverse_variance": "skmerge.baseline",
    "datasets": "skmerge.datasets",
    "VariationalMerger": "skmerge.merger",
    "WilsonPrior": "skmerge.model.priors",
    "ReferencePrior": "skmerge.model.priors",
    "DoubleWilsonPrior": "skmerge.model.double_wilson",
    "NormalLikelihood": "skmerge.model.likelihoods",
    "LaplaceLikelihood": "skmerge.model.likelihoods",
    "StudentTLikelihood": "skmerge.model.likelihoods",
    "TwoPieceStudentTLikelihood": "skmerge.model.likelihoods",
    "MixtureLikelihood": "skmerge.model.likelihoods",
    "ErrorModel": "skmerge.model.error_model",
    "PositionalEncoding": "skmerge.features",
    "merging_statistics": "skmerge.stats",
    "half_dataset_merges": "skmerge.half_datasets",
    "run_merge": "skmerge.workflow",
    "MergeResult": "skmerge.workflow",
    "statistics_from_outputs": "skmerge.workflow",
    "workflow": "skmerge.workflow",
    "diagnostics": "skmerge.diagnostics",
    "metrics": "skmerge.metrics",
    "model_selection": "skmerge.model_selection",
    "ImageKFold": "skmerge.model_selection",
    "ImageShuffleSplit": "skmerge.model_selection",
}


def __getattr__(name):
    if name in _LAZY:
        module = import_module(_LAZY[name])
        value = module if module.__name__.endswith(name) else getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'skmerge' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "DamagedFileError",
    "DataWarning",
    "IncompatibleVersionError",
    "InputError",
    "NotSerializableError",
    "NumericalError",
    "SkmergeError",
    *_LAZY,
]
