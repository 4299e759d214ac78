"""Exceptions raised by skmerge.

Every problem with what a user hands to skmerge (files, columns, values, parameters that
cannot work with the data) is reported as an :class:`InputError`, whose message names the
culprit and says what to do about it.
"""

from sklearn.utils._param_validation import InvalidParameterError


class SkmergeError(Exception):
    """Base class of every exception skmerge raises on purpose."""


class InputError(SkmergeError, ValueError):
    """A file, column or value given to skmerge cannot be used.

    The message names the file, column or value and says how to fix it.
    """


class ParameterError(InputError, InvalidParameterError):
    """An estimator parameter has a value it cannot take (scikit-learn's
    ``InvalidParameterError`` and an :class:`InputError` at once)."""


class DataWarning(UserWarning):
    """Data that skmerge can use after a change it reports (e.g. repeated rows dropped)."""


class NumericalError(SkmergeError, RuntimeError):
    """Training could not continue because the loss or its gradients stopped being finite,
    even after restoring the last good state and lowering the learning rate."""


class DamagedFileError(SkmergeError, ValueError):
    """A saved file's content is damaged: it does not load, or no longer matches the
    checksum it was saved with."""


class NotSerializableError(SkmergeError, TypeError):
    """A fitted merger holds something the safe format (``merger.save``) cannot store,
    such as a transformer of the user's; joblib can save it."""


class IncompatibleVersionError(SkmergeError, RuntimeError):
    """A persisted merger was written by a skmerge version this one cannot load."""
