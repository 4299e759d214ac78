"""Metadata → features of the scale model, through scikit-learn transformers.

The default transformer turns dHKL into 1/d² (the variable of the Wilson fall-off) and
standardises every numeric column, fitted on the training rows only. ``image_id`` is an
identity, not a number: listing it switches on per-image scale offsets instead of feeding
it to the network.
"""

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.compose import ColumnTransformer
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler
from sklearn.utils.validation import check_is_fitted, validate_data

from .errors import InputError

DEFAULT_METADATA = ("dHKL",)
IMAGE_IDENTITY = "image_id"


def _inverse_square(d):
    return 1.0 / np.square(np.asarray(d, dtype=np.float64))


class PositionalEncoding(TransformerMixin, BaseEstimator):
    """Sine and cosine features at octave-spaced frequencies.

    Each input column is mapped to [−1, 1] by the range seen in ``fit`` and replaced by
    sin(2ᵏπx) and cos(2ᵏπx) for k = 0 … n_frequencies − 1, which lets a small network
    represent sharp variation along that column (detector position, image number).

    Parameters
    ----------
    n_frequencies : int, default=4

    Attributes
    ----------
    data_min_, data_max_ : ndarray of shape (n_features,)

    Examples
    --------
    >>> import numpy as np
    >>> PositionalEncoding(n_frequencies=2).fit_transform(np.array([[0.0], [1.0]])).shape
    (2, 4)
    """

    def __init__(self, n_frequencies=4):
        self.n_frequencies = n_frequencies

    def fit(self, X, y=None):
        X = validate_data(self, X, dtype=np.float64)
        self.data_min_ = X.min(axis=0)
        self.data_max_ = X.max(axis=0)
        return self

    def transform(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float64, reset=False)
        span = np.where(self.data_max_ > self.data_min_, self.data_max_ - self.data_min_, 1.0)
        x = 2 * (X - self.data_min_) / span - 1
        angles = x[:, :, None] * (np.pi * 2.0 ** np.arange(self.n_frequencies))
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=2).reshape(len(X), -1)

    def get_feature_names_out(self, input_features=None):
        names = input_features if input_features is not None else getattr(
            self, "feature_names_in_", [f"x{i}" for i in range(len(self.data_min_))]
        )
        return np.array(
            [f"{fn}_{n}{k}" for n in names for fn in ("sin", "cos") for k in range(self.n_frequencies)],
            dtype=object,
        )


def make_metadata_transformer(columns, positional_encoding=0, encoded_columns=None, standardize=True):
    """The default metadata transformer for a list of column names.

    Parameters
    ----------
    columns : sequence of str
        Metadata columns of the observation table; ``image_id`` must already be removed.
    positional_encoding : int, default=0
        If positive, the standardised columns are further expanded by
        :class:`PositionalEncoding` with this many frequencies.
    encoded_columns : sequence of str, optional
        The columns the positional encoding expands (None: every column).
    standardize : bool, default=True
        Turn every column into z-scores (False: the values as they are, dHKL as 1/d²).

    Returns
    -------
    ColumnTransformer

    Examples
    --------
    >>> import pandas as pd
    >>> X = pd.DataFrame({"dHKL": [2.0, 3.0, 4.0], "XDET": [0.0, 50.0, 100.0]})
    >>> make_metadata_transformer(["dHKL", "XDET"], 2, encoded_columns=["XDET"]).fit_transform(X).shape
    (3, 5)
    """
    encoded = set(columns if encoded_columns is None else encoded_columns)
    transformers = []
    for column in columns:
        steps = [FunctionTransformer(_inverse_square, feature_names_out="one-to-one")] if column == "dHKL" else []
        if standardize:
            steps.append(StandardScaler())
        if positional_encoding and column in encoded:
            steps.append(PositionalEncoding(positional_encoding))
        if not steps:
            steps.append(FunctionTransformer(feature_names_out="one-to-one"))
        transformers.append((str(column), make_pipeline(*steps), [column]))
    return ColumnTransformer(transformers, remainder="drop", sparse_threshold=0)


def split_metadata(metadata):
    """(numeric columns, whether image_id was listed) of a list of metadata names."""
    columns = list(DEFAULT_METADATA) if metadata is None else [str(c) for c in metadata]
    return [c for c in columns if c != IMAGE_IDENTITY], IMAGE_IDENTITY in columns


def check_metadata_columns(X, columns):
    """Raise InputError for metadata columns X lacks or that hold non-numbers / NaN."""
    missing = [c for c in columns if c not in X.columns]
    if missing:
        raise InputError(
            f"metadata column(s) {', '.join(map(repr, missing))} not in the data; available: "
            f"{', '.join(map(str, X.columns))}."
        )
    for column in columns:
        values = X[column]
        if values.dtype.kind not in "biuf" and not hasattr(values.dtype, "numpy_dtype"):
            raise InputError(f"metadata column {column!r} is not numeric ({values.dtype}).")
        if not np.isfinite(values.to_numpy(np.float64, na_value=np.nan)).all():
            raise InputError(f"metadata column {column!r} holds NaN or infinite values; fill or drop them.")



def metadata_features(transformer, X, metadata=None):
    """The fitted metadata ``transformer`` applied to X: one finite float32 row per
    observation, or InputError. ``metadata`` (the estimator's parameter) names the
    columns to check first when it is a list."""
    if isinstance(metadata, (list, tuple)) or metadata is None:
        check_metadata_columns(X, split_metadata(metadata)[0])
    try:
        features = np.asarray(transformer.transform(X), dtype=np.float32)
    except (KeyError, ValueError) as exc:
        raise InputError(f"the metadata transformer failed on X: {exc}") from exc
    if features.ndim != 2 or len(features) != len(X):
        raise InputError("the metadata transformer must return one row of numbers per observation.")
    if not np.isfinite(features).all():
        raise InputError("the metadata transformer produced NaN or infinite features; check the metadata columns.")
    return features
