"""Half-dataset merges: a fitted merger refitted on random halves of the images.

They live next to the estimator because they refit it; the statistics computed from
them (:mod:`skmerge.stats`) work on the plain tables they return.
"""

import copy
import os

import numpy as np
import pandas as pd
from sklearn.utils import check_random_state

from .errors import InputError
from .table import take_rows


def half_dataset_merges(merger, X, *, n_repeats=1, random_state=None, verbose=0):
    """Merge random halves of the images with the fitted scale model frozen.

    For each repeat the images are split at random into two halves; each half is merged
    by refitting only the posteriors of a copy of ``merger`` on that half's observations
    (the posterior started afresh from the half's own data, so the halves stay
    independent), with the scale model fixed at its full-data fit.

    When files are merged separately, the images are split by their position in their
    file, so that the k-th image of every file falls in the same half: the files of a
    time-resolved series are usually recorded in pairs at the same orientation, whose
    images share systematic errors, and splitting a pair would make the two halves'
    differences between files anti-correlated (on PYP, dark vs 2 ms, CCdiff was −0.54
    with pairs split).

    Given an observation store, each half is fitted and merged streamed from the
    store's observations of its images (:mod:`skmerge.model.streaming`), which are
    split as the store's table would be, so that the halves of a store and of its table
    (:func:`skmerge.store.read_store`) hold the same images.

    Parameters
    ----------
    merger : VariationalMerger
        A fitted merger (with ``batch_size`` for a store).
    X : rs.DataSet, path or StoreSource
        The observation table it was fitted on, or the observation store (or a
        :class:`~skmerge.model.streaming.StoreSource` of it).
    n_repeats : int, default=1
    random_state : int, RandomState instance or None
        Makes the splits repeatable.
    verbose : int, default=0
        Show a progress bar over the 2 × ``n_repeats`` half merges when positive.

    Returns
    -------
    rs.DataSet
        The merged tables of every half, stacked, with integer columns ``repeat`` and
        ``half`` (0 or 1), indexed by H, K, L (plus ``file_id`` when the merger merges
        files separately).

    Examples
    --------
    >>> from skmerge import VariationalMerger
    >>> from skmerge.datasets import make_unmerged
    >>> from skmerge.stats import cc_half
    >>> X, _ = make_unmerged(n_images=12, random_state=0)
    >>> merger = VariationalMerger(mlp_layers=2, max_iter=100, random_state=0).fit(X)
    >>> halves = half_dataset_merges(merger, X, n_repeats=2, random_state=0)
    >>> halves.groupby(["repeat", "half"]).ngroups
    4
    >>> bool(cc_half(halves, n_bins=4).loc["overall", "CC1/2"] > 0.5)
    True
    """
    if int(n_repeats) < 1:
        raise InputError(f"n_repeats={n_repeats!r} must be at least 1.")
    from .model.streaming import StoreSource, as_source

    rng = check_random_state(random_state)
    source = as_source(X) if isinstance(X, (str, os.PathLike, StoreSource)) else None
    if source is None:
        image_id = _split_unit(X, merger.separate_files)
    else:  # the unit of each image of the store, whose image_id is its position
        files = source.image_files()
        image_id = _split_unit(pd.DataFrame({"image_id": np.arange(len(files)), "file_id": files}),
                               merger.separate_files)
    images = np.unique(image_id)
    if len(images) < 2:
        raise InputError("half-dataset merging needs at least two images.")
    tables = []
    bar = _bar(2 * int(n_repeats), "half-dataset merges", verbose)
    try:
        for repeat in range(int(n_repeats)):
            first = rng.permutation(images)[: len(images) // 2]
            in_first = np.isin(image_id, first)
            for half, rows in enumerate((in_first, ~in_first)):
                half_merger = copy.deepcopy(merger)
                half_merger.set_params(warm_start="scales", freeze="scales", posterior_init="data", early_stopping=False,
                                       verbose=0, random_state=rng.randint(2**31 - 1))
                if source is None:
                    X_half = take_rows(X, rows)
                else:
                    X_half = source.where(_of_images(np.flatnonzero(rows)))
                merged = half_merger.fit(X_half).transform(X_half)
                merged["repeat"] = np.int32(repeat)
                merged["half"] = np.int32(half)
                tables.append(merged)
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    out = pd.concat(tables).astype({"repeat": "MTZInt", "half": "MTZInt"})
    out.spacegroup, out.cell, out.merged = tables[0].spacegroup, tables[0].cell, True
    return out


def _split_unit(X, separate_files):
    """What the halves split: the image of every observation, or with separate files its
    image's position within its file (image_id is ordered by file, then image)."""
    image_id = X["image_id"].to_numpy(np.int64)
    if not separate_files:
        return image_id
    file_id = X["file_id"].to_numpy(np.int64)
    first = np.full(file_id.max() + 1, np.iinfo(np.int64).max)
    np.minimum.at(first, file_id, image_id)
    return image_id - first[file_id]


def _of_images(images):
    """A store selection (:class:`~skmerge.model.streaming.StoreSource`) of the
    observations of the given sorted images."""
    return lambda image_id, rows: np.isin(image_id, images)


def _bar(total, description, verbose):
    if not verbose:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="fit", dynamic_ncols=True)
