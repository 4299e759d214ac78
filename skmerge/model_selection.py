"""Cross-validation splitters that keep the observations of one image together.

A merger's held-out score is only honest when the observations of an image are either
all in the training rows or all in the test rows: an image's observations share its
scale (the per-image offset of the scale model), so splitting an image would let the
fit learn the held-out observations' scale from their neighbours on the same image.
The splitters here read the image of every row from the observation table itself
(column ``image_id``), so scikit-learn's tools need no ``groups`` argument::

    cross_val_score(merger, X, cv=ImageKFold(5))

scikit-learn's own group splitters work as well when given the image ids as groups::

    cross_val_score(merger, X, cv=GroupKFold(5), groups=X["image_id"])
"""

from numbers import Integral

import numpy as np
from sklearn.model_selection import BaseCrossValidator, GroupShuffleSplit
from sklearn.utils import check_random_state

from .errors import InputError

__all__ = ["ImageKFold", "ImageShuffleSplit", "image_groups"]


def image_groups(X, image_key="image_id"):
    """The image of every row of an observation table, as a numpy array.

    Parameters
    ----------
    X : rs.DataSet or pandas.DataFrame
        Observation table (from :func:`skmerge.read_unmerged`).
    image_key : str, default="image_id"
        Column that identifies the image (``file_id`` groups by file, e.g. by crystal).

    Returns
    -------
    ndarray of shape (n_observations,)

    Raises
    ------
    InputError
        When X is not a table or lacks the column.

    Examples
    --------
    >>> from skmerge.datasets import make_unmerged
    >>> from skmerge.model_selection import image_groups
    >>> X, _ = make_unmerged(n_images=4, random_state=0)
    >>> image_groups(X)[:3].tolist(), len(set(image_groups(X)))
    ([0, 0, 0], 4)
    """
    if not hasattr(X, "columns"):
        raise InputError(
            "the image-grouped splitters need the observation table (a DataFrame with an "
            f"{image_key!r} column), not {type(X).__name__}; pass groups= to "
            "sklearn.model_selection.GroupKFold for plain arrays."
        )
    if image_key not in X.columns:
        raise InputError(
            f"X has no column {image_key!r} to group the observations by; build X with "
            "skmerge.read_unmerged, or set image_key= to the column naming the image."
        )
    column = X[image_key]
    if column.isna().any():
        raise InputError(f"column {image_key!r} holds missing values; every observation needs an image.")
    return column.to_numpy()


def _check_n_splits(n_splits, minimum=2):
    if not isinstance(n_splits, Integral) or isinstance(n_splits, bool) or n_splits < minimum:
        raise ValueError(f"n_splits={n_splits!r} must be an integer of at least {minimum}.")


class ImageKFold(BaseCrossValidator):
    """K-fold cross-validation by image: every image is held out exactly once.

    The images of ``X[image_key]`` are dealt out to the folds like cards, in image
    order (image i goes to fold i mod k) or, with ``shuffle=True``, in a random order.
    Dealing interleaves the folds along a rotation series, so every fold samples the
    whole rotation range and the held-out images' reflections are mostly also observed
    in the training images (which is what makes a held-out likelihood meaningful).
    Folds have the same number of images (±1), not necessarily of observations.

    ``groups`` is not needed: the images are read from X. The observations of one image
    are never split between the training and the test rows.

    Parameters
    ----------
    n_splits : int, default=5
        Number of folds, at least 2 and at most the number of images.
    shuffle : bool, default=False
        Deal the images in a random order instead of in image order.
    random_state : int, RandomState instance or None, default=None
        The order of the images when ``shuffle=True``.
    image_key : str, default="image_id"
        Column of X that identifies the image. ``"file_id"`` holds out whole files
        (crystals, wavelengths) instead.

    See Also
    --------
    ImageShuffleSplit : random image-grouped train/test splits.
    sklearn.model_selection.GroupKFold : the same guarantee, with ``groups=X["image_id"]``.

    Examples
    --------
    >>> import numpy as np
    >>> from skmerge.datasets import make_unmerged
    >>> from skmerge.model_selection import ImageKFold
    >>> X, _ = make_unmerged(n_images=6, random_state=0)
    >>> cv = ImageKFold(n_splits=3)
    >>> for train, test in cv.split(X):
    ...     print(np.unique(X["image_id"].to_numpy()[test]).tolist())
    [0, 3]
    [1, 4]
    [2, 5]

    With a merger (no ``groups`` argument needed):

    >>> from sklearn.model_selection import cross_val_score
    >>> from skmerge import VariationalMerger
    >>> scores = cross_val_score(VariationalMerger(), X, cv=ImageKFold(3))  # doctest: +SKIP
    """

    def __init__(self, n_splits=5, *, shuffle=False, random_state=None, image_key="image_id"):
        self.n_splits = n_splits
        self.shuffle = shuffle
        self.random_state = random_state
        self.image_key = image_key

    def split(self, X, y=None, groups=None):
        """Generate the training and test row indices of every fold.

        Parameters
        ----------
        X : rs.DataSet or pandas.DataFrame
            Observation table with the ``image_key`` column.
        y : array-like, optional
            Ignored.
        groups : array-like, optional
            Ignored: the images are read from ``X[image_key]``.

        Yields
        ------
        train : ndarray
            Row positions of the training observations.
        test : ndarray
            Row positions of the held-out observations.
        """
        yield from super().split(X, y, None)

    def _iter_test_indices(self, X=None, y=None, groups=None):
        _check_n_splits(self.n_splits)
        image = image_groups(X, self.image_key)
        images, row_image = np.unique(image, return_inverse=True)
        if self.n_splits > len(images):
            raise ValueError(
                f"n_splits={self.n_splits} is more than the {len(images)} images in X; "
                "every fold must hold out at least one image."
            )
        order = np.arange(len(images))
        if self.shuffle:
            order = check_random_state(self.random_state).permutation(len(images))
        fold_of_image = np.empty(len(images), dtype=np.int64)
        fold_of_image[order] = np.arange(len(images)) % self.n_splits
        fold = fold_of_image[row_image.ravel()]
        for k in range(self.n_splits):
            yield np.flatnonzero(fold == k)

    def get_n_splits(self, X=None, y=None, groups=None):
        """Number of folds (``n_splits``)."""
        return self.n_splits


class ImageShuffleSplit(BaseCrossValidator):
    """Random train/test splits of the images, repeated ``n_splits`` times.

    Each split holds out a random ``test_size`` of the images (a fraction, or a
    number of images) with all their observations; unlike :class:`ImageKFold`, an
    image may be held out in several splits or in none. A thin wrapper of
    :class:`sklearn.model_selection.GroupShuffleSplit` that reads the images from X.

    Parameters
    ----------
    n_splits : int, default=5
        Number of re-shuffled splits.
    test_size : float or int, default=None
        Fraction (float) or number (int) of images held out; 0.2 when both sizes are
        None.
    train_size : float or int, default=None
        Fraction or number of images to train on; the complement of the test images
        when None.
    random_state : int, RandomState instance or None, default=None
    image_key : str, default="image_id"
        Column of X that identifies the image.

    See Also
    --------
    ImageKFold : every image held out exactly once.

    Examples
    --------
    >>> from skmerge.datasets import make_unmerged
    >>> from skmerge.model_selection import ImageShuffleSplit
    >>> X, _ = make_unmerged(n_images=10, random_state=0)
    >>> cv = ImageShuffleSplit(n_splits=2, test_size=0.3, random_state=0)
    >>> [X["image_id"].iloc[test].nunique() for _, test in cv.split(X)]
    [3, 3]
    """

    def __init__(self, n_splits=5, *, test_size=None, train_size=None, random_state=None, image_key="image_id"):
        self.n_splits = n_splits
        self.test_size = test_size
        self.train_size = train_size
        self.random_state = random_state
        self.image_key = image_key

    def split(self, X, y=None, groups=None):
        """Generate the training and test row indices of every split; the parameters
        and yields are those of :meth:`ImageKFold.split`."""
        _check_n_splits(self.n_splits, minimum=1)
        image = image_groups(X, self.image_key)
        splitter = GroupShuffleSplit(
            n_splits=self.n_splits, test_size=self.test_size, train_size=self.train_size,
            random_state=self.random_state,
        )
        yield from splitter.split(np.zeros((len(image), 1)), None, image)

    def get_n_splits(self, X=None, y=None, groups=None):
        """Number of splits (``n_splits``)."""
        return self.n_splits
