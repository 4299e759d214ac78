"""Fitted mergers as plain numbers: the safe format, read without pickle.

``merger.save(path)`` writes one NumPy ``.npz`` archive: every array of the fitted state
under a name of its own, and one JSON document holding the estimator's parameters, its
other fitted attributes, the skmerge version and a SHA-256 checksum of the whole
content. :meth:`VariationalMerger.load <skmerge.VariationalMerger.load>` reads it with
``numpy.load(..., allow_pickle=False)``, so loading runs no code from the file: a saved
merger can be shared like a data file. (joblib files, by contrast, are pickles that run
code when loaded.)

Fitted attributes are stored generically (every attribute ending in ``_``): numpy
arrays; None, bools, ints, floats and strings; lists, tuples and dicts of those; gemmi
space groups and cells; skmerge's own dataclasses (``Reflections``) and model pieces
(the scikit-learn estimators of ``skmerge.model``, by class name and parameters); and the
metadata transformer skmerge builds by default, by its fitted numbers. Anything else — a
transformer of the user's, a reference data set held in memory — raises
:class:`~skmerge.errors.NotSerializableError`: joblib stores those.
"""

import dataclasses
import importlib
import json
import math
import zipfile
from tokenize import TokenError
from pathlib import Path

import gemmi
import numpy as np
from sklearn.base import BaseEstimator
from sklearn.compose import ColumnTransformer
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted

from . import __version__
from ._persistence import _checksum, check_version, values_before_parameters_existed
from .errors import DamagedFileError, IncompatibleVersionError, InputError, NotSerializableError
from .features import PositionalEncoding, make_metadata_transformer

# Bumped whenever the layout of the document changes.
SAFE_FORMAT = 1
_DOCUMENT = "document"
_KIND = "skmerge.VariationalMerger"


def save(estimator, path):
    """Write a fitted estimator in the safe format (see the module docstring), atomically.

    Returns
    -------
    Path
    """
    from .io.writers import atomic_path

    check_is_fitted(estimator)
    encoder = _Encoder()
    document = {
        "kind": _KIND, "format": SAFE_FORMAT, "skmerge_version": __version__,
        "params": encoder.encode(estimator.get_params(deep=False), "parameter"),
        "attributes": encoder.encode(_fitted_attributes(estimator), "attribute"),
    }
    text = json.dumps(document, allow_nan=False)
    # The checksum of the document as it will be read back.
    document["checksum"] = _checksum({"document": json.loads(text), "arrays": encoder.arrays})
    arrays = {**encoder.arrays, _DOCUMENT: np.array(json.dumps(document, allow_nan=False))}
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **arrays)
    return Path(path)


def load(cls, path):
    """An estimator of class ``cls`` read from a file :func:`save` wrote.

    Raises
    ------
    InputError
        If there is no such file.
    DamagedFileError
        If the file is not a saved merger, or its content no longer matches its checksum.
    IncompatibleVersionError
        If another skmerge version, or format, wrote it.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file.")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
        document = json.loads(str(arrays.pop(_DOCUMENT)[()]))
        checksum = document.pop("checksum")
        kind, fmt, version = document["kind"], document["format"], document["skmerge_version"]
    # numpy parses an array's header with Python's tokenizer: a damaged header can raise its errors.
    except (OSError, ValueError, KeyError, TypeError, EOFError, SyntaxError, TokenError, zipfile.BadZipFile) as exc:
        raise DamagedFileError(f"{path}: not a merger saved by skmerge's save ({type(exc).__name__}: {exc}); "
                               "the file is damaged or of another kind.") from exc
    if kind != _KIND:
        raise DamagedFileError(f"{path}: holds a {kind!r}, not a saved VariationalMerger.")
    if checksum != _checksum({"document": document, "arrays": arrays}):
        raise DamagedFileError(f"{path}: this saved merger is damaged: its content does not match the checksum it "
                               "was saved with. Save it again from the fit, or refit.")
    try:
        check_version(version, fmt, SAFE_FORMAT)
    except IncompatibleVersionError as exc:
        raise IncompatibleVersionError(f"{path}: {exc}") from None
    decoder = _Decoder(arrays)
    estimator = cls(**{**values_before_parameters_existed(cls), **decoder.decode(document["params"])})
    estimator.__dict__.update(decoder.decode(document["attributes"]))
    return estimator


class _Encoder:
    """Values → JSON-able tags, collecting the arrays (``arrays``) they refer to."""

    def __init__(self):
        self.arrays = {}

    def _array(self, array):
        name = f"a{len(self.arrays)}"
        self.arrays[name] = array
        return name

    def encode(self, value, where):
        """The tag of ``value``; ``where`` names it in error messages."""
        if isinstance(value, np.generic):  # before float: numpy's float64 is one
            return {"$scalar": self._array(np.asarray(value))}
        if value is None or isinstance(value, (bool, int, str)):
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else {"$float": repr(value)}
        if isinstance(value, np.ndarray):
            return self._encode_array(value, where)
        if isinstance(value, (list, tuple)):
            items = [self.encode(item, f"{where}[{i}]") for i, item in enumerate(value)]
            return items if isinstance(value, list) else {"$tuple": items}
        if isinstance(value, dict):
            if where in ("parameter", "attribute"):  # the top level: names to values
                return {str(k): self.encode(v, k) for k, v in value.items()}
            return {"$dict": [[self.encode(k, where), self.encode(v, f"{where}[{k!r}]")] for k, v in value.items()]}
        if isinstance(value, Path):
            return {"$path": str(value)}
        if isinstance(value, gemmi.SpaceGroup):
            return {"$spacegroup": value.xhm()}
        if isinstance(value, gemmi.UnitCell):
            return {"$cell": list(value.parameters)}
        if isinstance(value, ColumnTransformer) and hasattr(value, "transformers_"):
            return self._encode_transformer(value, where)
        if _is_skmerge_class(type(value)):
            fields = (value.get_params(deep=False) if isinstance(value, BaseEstimator)
                      else {f.name: getattr(value, f.name) for f in dataclasses.fields(value)})
            name = type(value).__name__
            return {"$object": _qualified(type(value)),
                    "fields": {k: self.encode(v, f"{where}.{name}.{k}") for k, v in fields.items()}}
        raise NotSerializableError(
            f"{where}: a {type(value).__name__} cannot be saved in the safe format, which stores numbers, text and "
            "skmerge's own model pieces only; save this merger with joblib.dump (a pickle) instead."
        )

    def _encode_array(self, array, where):
        if not array.dtype.hasobject:
            return {"$array": self._array(array)}
        if not all(isinstance(item, str) for item in array.flat):
            raise NotSerializableError(f"{where}: an array of Python objects cannot be saved in the safe format; "
                                       "save this merger with joblib.dump instead.")
        return {"$array": self._array(array.astype(str)), "objects": True}

    def _encode_transformer(self, transformer, where):
        """The default metadata transformer as its columns and every step's fitted
        attributes; it is rebuilt by :func:`make_metadata_transformer` when loaded."""
        pipelines = [(name, pipeline) for name, pipeline, _ in transformer.transformers_ if name != "remainder"]
        columns = [name for name, _ in pipelines]
        frequencies = next((value for key, value in transformer.get_params(deep=True).items()
                            if key.endswith("__n_frequencies")), 0)
        steps_of = {name: [s for _, s in getattr(pipeline, "steps", [(name, pipeline)])] for name, pipeline in pipelines}
        encoded = [name for name, steps in steps_of.items() if any(isinstance(s, PositionalEncoding) for s in steps)]
        standardize = all(any(isinstance(s, StandardScaler) for s in steps) for steps in steps_of.values())
        settings = (encoded, standardize)
        if _signature(make_metadata_transformer(columns, frequencies, *settings)) != _signature(transformer):
            raise NotSerializableError(
                f"{where}: a metadata transformer of your own cannot be saved in the safe format (only the one "
                "skmerge builds from a list of columns); save this merger with joblib.dump instead."
            )
        steps = {name: [{"class": type(step).__name__, "fitted": self.encode(_fitted_attributes(step), name)}
                        for step in pipeline]
                 for name, pipeline in pipelines}
        return {"$metadata_transformer": {"columns": columns, "positional_encoding": frequencies,
                                          "encoded_columns": encoded, "standardize": standardize,
                                          "feature_names_in": self.encode(transformer.feature_names_in_, where),
                                          "steps": steps}}


def _fitted_attributes(estimator):
    """An estimator's fitted attributes (public names ending in ``_``)."""
    return {name: value for name, value in vars(estimator).items() if name.endswith("_") and not name.startswith("_")}


def _signature(transformer):
    """What a ColumnTransformer is made of: its settings, and the class and parameters
    of every step of every column's pipeline."""
    settings = {k: v for k, v in transformer.get_params(deep=False).items() if k != "transformers"}
    parts = [(name, list(columns), type(pipeline),
              [(type(step), step.get_params(deep=False)) for _, step in getattr(pipeline, "steps", [])])
             for name, pipeline, columns in transformer.transformers]
    return settings, parts


class _Decoder:
    """Tags → values, with the arrays of the archive."""

    def __init__(self, arrays):
        self.arrays = arrays

    def decode(self, tag):
        if isinstance(tag, list):
            return [self.decode(item) for item in tag]
        if not isinstance(tag, dict):
            return tag
        kind = next(iter(tag), "")
        if not kind.startswith("$"):  # the top level: names to values
            return {name: self.decode(value) for name, value in tag.items()}
        value = tag.get(kind)
        if kind == "$float":
            return float(value)
        if kind == "$scalar":
            return self.arrays[value][()]
        if kind == "$array":
            array = self.arrays[value]
            return array.astype(object) if tag.get("objects") else array
        if kind == "$tuple":
            return tuple(self.decode(item) for item in value)
        if kind == "$dict":
            return {_hashable(self.decode(k)): self.decode(v) for k, v in value}
        if kind == "$path":
            return Path(value)
        if kind == "$spacegroup":
            return gemmi.SpaceGroup(value)
        if kind == "$cell":
            return gemmi.UnitCell(*value)
        if kind == "$object":
            return _skmerge_class(value)(**{k: self.decode(v) for k, v in tag["fields"].items()})
        if kind == "$metadata_transformer":
            return self._decode_transformer(value)
        raise ValueError(f"unknown tag {kind!r}")

    def _decode_transformer(self, value):
        import pandas as pd

        transformer = make_metadata_transformer(value["columns"], value["positional_encoding"],
                                                value.get("encoded_columns"), value.get("standardize", True))
        names = self.decode(value["feature_names_in"])
        # One dummy row sets up the ColumnTransformer's bookkeeping (column selection,
        # output slices); every step's fitted numbers are then replaced by the stored ones.
        transformer.fit(pd.DataFrame(np.ones((1, len(names))), columns=list(names)))
        for name, steps in value["steps"].items():
            pipeline = transformer.named_transformers_[name]
            if [type(step).__name__ for step in pipeline] != [step["class"] for step in steps]:
                raise ValueError(f"the metadata transformer's steps of {name!r} differ from this skmerge's")
            for step, stored in zip(pipeline, steps):
                for attribute, number in self.decode(stored["fitted"]).items():
                    setattr(step, attribute, number)
        return transformer


def _hashable(key):
    return tuple(key) if isinstance(key, list) else key


def _qualified(cls):
    return f"{cls.__module__}.{cls.__qualname__}"


def _is_skmerge_class(cls):
    return cls.__module__.startswith("skmerge.") and (issubclass(cls, BaseEstimator) or dataclasses.is_dataclass(cls))


def _skmerge_class(qualified):
    """The skmerge class of a qualified name; only skmerge's own estimators and
    dataclasses are ever made from a file."""
    module, _, name = qualified.rpartition(".")
    if not module.startswith("skmerge."):
        raise ValueError(f"{qualified!r} is not one of skmerge's classes")
    cls = getattr(importlib.import_module(module), name, None)
    if not isinstance(cls, type) or not _is_skmerge_class(cls):
        raise ValueError(f"{qualified!r} is not one of skmerge's model pieces")
    return cls
