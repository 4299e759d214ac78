"""Saving and loading fitted estimators with pickle/joblib across skmerge versions.

A fitted merger pickles with the version that made it, a persistence format and a
SHA-256 checksum of its content; loading refuses another format or minor version
(:class:`~skmerge.errors.IncompatibleVersionError`) and content that no longer matches
its checksum (:class:`~skmerge.errors.DamagedFileError`), so a damaged file never loads
as a silently different merger. Pickle runs code while it loads: load only files from a
source you trust.
"""

import hashlib
import inspect
import types

import numpy as np
import pandas as pd

from . import __version__
from .errors import DamagedFileError, IncompatibleVersionError

# Bumped whenever the fitted attributes change meaning or layout.
PERSISTENCE_FORMAT = 2
_FORMAT_KEY, _CHECKSUM_KEY = "_skmerge_persistence", "_skmerge_checksum"


class PersistentMixin:
    """Pickles without the live TensorFlow model (rebuilt from the numpy weights on first
    use), with a checksum of everything else; see the module docstring."""

    def __getstate__(self):
        # object.__getstate__ hands back the live __dict__: copy before editing.
        state = dict(super().__getstate__())
        state.pop("_model", None)
        state[_FORMAT_KEY] = PERSISTENCE_FORMAT
        if "skmerge_version_" in state:
            state[_CHECKSUM_KEY] = _checksum(state)
        return state

    def __setstate__(self, state):
        version = state.get("skmerge_version_")
        if version is not None:
            check_version(version, state.get(_FORMAT_KEY), PERSISTENCE_FORMAT)
        checksum = state.pop(_CHECKSUM_KEY, None)
        if version is not None and checksum != _checksum(state):
            raise DamagedFileError("this saved merger is damaged: its content does not match the checksum it was "
                                   "saved with. Save it again from the fit, or refit.")
        state.pop(_FORMAT_KEY, None)
        super().__setstate__({**values_before_parameters_existed(type(self)), **state})


# Parameters whose default changed after they came: the value that reproduces what a fit
# made before they existed did (image heads came off by default, then became "auto";
# image layers came as 0 by default, then became "auto").
_VALUES_BEFORE_THEY_EXISTED = {"image_heads": False, "image_layers": 0}


def values_before_parameters_existed(cls):
    """The value of each of ``cls``'s parameters for a merger saved before it existed:
    the value that reproduces what its fit did — the parameter's default unless
    that has changed since (a new parameter's default keeps the old model)."""
    return {name: _VALUES_BEFORE_THEY_EXISTED.get(name, parameter.default)
            for name, parameter in inspect.signature(cls.__init__).parameters.items()
            if parameter.default is not inspect.Parameter.empty}


def check_version(version, fmt, expected_fmt):
    """IncompatibleVersionError unless a merger saved by skmerge ``version`` in format
    ``fmt`` can be loaded by this skmerge, which writes ``expected_fmt``."""
    if fmt != expected_fmt or str(version).split(".")[:2] != __version__.split(".")[:2]:
        raise IncompatibleVersionError(
            f"this merger was saved by skmerge {version} (format {fmt}); skmerge "
            f"{__version__} cannot load it. Refit it, or install skmerge {version}."
        )


def _checksum(state):
    """SHA-256 of the content of a state, walked value by value: its pickle would not do,
    as pickling an estimator again after loading it can give other bytes (objects shared
    differently) for the same content."""
    digest = hashlib.sha256()
    _feed(digest, state)
    return digest.hexdigest()


def _feed(digest, value):
    if isinstance(value, np.ndarray) and value.dtype.hasobject:
        digest.update(f"objects{value.shape}".encode())
        _feed(digest, value.ravel().tolist())
    elif isinstance(value, np.ndarray):
        digest.update(f"array{value.dtype.str}{value.shape}".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, (str, bytes, bool, int, float, complex, type(None), np.generic)):
        digest.update(f"{type(value).__name__}:{value!r};".encode())
    elif isinstance(value, dict):
        digest.update(f"dict{len(value)}".encode())
        for key in sorted(value, key=repr):
            _feed(digest, key)
            _feed(digest, value[key])
    elif isinstance(value, (list, tuple, set, frozenset)):
        digest.update(f"{type(value).__name__}{len(value)}".encode())
        for item in sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value:
            _feed(digest, item)
    elif isinstance(value, (type, types.FunctionType, types.BuiltinFunctionType)):
        digest.update(f"{value.__module__}.{value.__qualname__}".encode())
    elif isinstance(value, pd.DataFrame):
        _feed(digest, [list(map(str, value.columns)), pd.util.hash_pandas_object(value).to_numpy()])
    elif type(value).__module__.startswith("gemmi"):
        digest.update(repr(value).encode())  # gemmi's objects print their values
    elif hasattr(value, "__dict__"):
        digest.update(f"{type(value).__module__}.{type(value).__qualname__}".encode())
        _feed(digest, {k: v for k, v in vars(value).items() if k != "_sklearn_version"})
    else:
        digest.update(repr(value).encode())


def load(path):
    """Load a saved merger: a ``.npz`` file of ``merger.save`` (the safe format, see
    :meth:`VariationalMerger.load <skmerge.VariationalMerger.load>`), or any other file
    as one of ``joblib.dump`` (the command line's ``OUT.joblib``).

    Unlike a bare ``joblib.load``, any failure — a damaged, truncated or foreign file —
    is a :class:`~skmerge.errors.DamagedFileError` naming the file. Loading a joblib
    file runs code from it (pickle): load only files from a source you trust; ``.npz``
    files run none.

    Examples
    --------
    >>> import joblib, skmerge
    >>> from skmerge.datasets import make_unmerged
    >>> X, _ = make_unmerged(n_images=6, random_state=0)
    >>> merger = skmerge.VariationalMerger(mlp_layers=2, max_iter=50, random_state=0).fit(X)
    >>> _ = joblib.dump(merger, "/tmp/skmerge_doctest.joblib")
    >>> (skmerge.load("/tmp/skmerge_doctest.joblib").predict(X) == merger.predict(X)).all()
    np.True_
    """
    import joblib

    if str(path).endswith(".npz"):
        from .merger import VariationalMerger

        return VariationalMerger.load(path)
    try:
        return joblib.load(path)
    except Exception as exc:  # whatever a damaged pickle makes the unpickler raise
        if isinstance(exc, IncompatibleVersionError):
            raise IncompatibleVersionError(f"{path}: {exc}") from exc
        raise DamagedFileError(f"{path}: cannot load a saved merger from it ({type(exc).__name__}: {exc}); "
                               "the file is damaged or was not written by joblib.dump.") from exc
