"""Fitting and evaluating on an observation store, in memory set by the reflections, the
parameters and the minibatch rather than by the number of observations.

The fit (:func:`fit_store`) starts as an in-memory fit does, but computes every starting
value in passes over the store's pieces (:func:`skmerge.store.iter_store_chunks`),
accumulating sums per reflection and per image:

1. the reflections (their keys, centric flags, ε and observation counts), the images,
   the intensity unit, a first inverse-variance merge, and a random sample of rows on
   which the metadata transformer is fitted (every row of a store of up to
   ``SAMPLE_ROWS``);
2. five rounds of the quick image scaling (:func:`~skmerge.model.initialisation.quick_image_scales`),
   one pass each: every piece holds whole images, so a pass fits each image's scale to
   the last merge and accumulates the next merge under the new scales at once; the
   floor on the scales (10⁻³ of their median) is the previous round's median, where
   the in-memory scaling takes the round's own;
3. the robust merge that starts the posterior (:func:`~skmerge.baseline.robust_mean`),
   whose medians need every observation of a reflection: they are taken from the first
   ``RESERVOIR`` observations of each reflection in the store's order (all of them for
   reflections with fewer), kept in one pass, and the spread of the residuals from the
   same observations weighted by how many of their reflection's they stand for; then
   three passes of reweighted means over every observation.

Training then draws minibatches of whole images from the store
(:func:`skmerge.store.iter_image_batches`: shuffled row groups, a bounded buffer), each
pass over the store in a new order, encodes them in a background thread of ``tf.data``
and pads them to one shape, so that the compiled step never retraces (:class:`StoreBatches`).

A warm start (the half-dataset merges' refit of the posteriors with the scales frozen,
:func:`skmerge.half_datasets.half_dataset_merges`) keeps the previous fit's intensity
unit, metadata transformer, Wilson curve and scale network, as in memory, and skips the
passes that would compute them.

A :class:`StoreSource` may select part of a store (some images, or the rows outside a
test set): fits, merges and predictions then see only those observations.

Not streamed: reindexing of ambiguous settings, early stopping, Laue data, the image
encoder and held-out tables (:func:`check_streamable` says so).
"""

import os
import queue
import threading
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from ..baseline import group_median, means_of_sums, outlier_excess, residual_spread
from ..errors import InputError, ParameterError
from ..store import _StoreIndex, is_store, iter_image_batches, iter_store_chunks, read_manifest
from ..symmetry import lookup_keys
from .build import _metadata_transformer, _scale_network, checked_intensity_scale, merging_model, start_posterior
from .data import Reflections, encode
from .fitted import FitState
from .decay import rotation_reference_b
from .fitting import (Training, _progress, resolved_network_shape, trained_variables,
                      with_posterior_corrections)
from .initialisation import (SCALING_ROUNDS, evaluate_curve, image_scale_factors, probable_observations, scale_floor,
                             wilson_curve)

# Rows of the store (at most) on which the metadata transformer is fitted.
SAMPLE_ROWS = 1 << 19
# Observations of each reflection kept for the medians of the robust start.
RESERVOIR = 64
# Observations held for shuffling minibatches (beside one row group), and the fewest
# batches' worth of images held however large the images.
BUFFER_ROWS = 1 << 18
BUFFER_BATCHES = 4
# Batches each stage of the feed (reading, encoding) may run ahead of the next.
PREFETCH_BATCHES = 2
_ROBUST_ROUNDS = 3
_ROBUST_CUTOFF = 3.0


def check_streamable(params, y=None, X_held_out=None):
    """ParameterError for what a fit on an observation store does not do."""
    unsupported = [name for name, on in (
        ("early_stopping", params.early_stopping), ("laue", params.laue),
        ("image_model='encoder'", params.image_model == "encoder" and params.image_scales),
        ("jit_compile", params.jit_compile), ("y", y is not None), ("X_held_out", X_held_out is not None)) if on]
    if unsupported:
        raise ParameterError(f"a fit on an observation store does not stream {', '.join(unsupported)}; read the "
                             "store into memory (skmerge.read_unmerged(store)) and fit the table instead.")
    if params.batch_size is None:
        raise ParameterError("a fit on an observation store draws minibatches of whole images: set batch_size "
                             "(--batch-size), e.g. 32 images per step.")


class StoreSource:
    """An observation store, or a selection of its observations, as a fit reads it: its
    description and its pieces in order. The estimator's methods take one in place of
    a store's path.

    Parameters
    ----------
    store : path
    chunk_rows : int, optional
        Observations per piece of a pass.
    select : callable, optional
        The observations to keep: ``select(image_id, rows)`` returns a boolean mask
        (see :func:`skmerge.store.iter_image_batches`); None keeps every one.

    Examples
    --------
    >>> import numpy as np
    >>> from skmerge.model.streaming import StoreSource
    >>> first_ten = StoreSource("runs.parquet").where(lambda image_id, rows: image_id < 10)  # doctest: +SKIP
    >>> merger.fit(first_ten)  # doctest: +SKIP
    """

    def __init__(self, store, chunk_rows=None, select=None):
        if not is_store(store):
            raise InputError(f"{store}: not an observation store (a directory written by 'skmerge convert' or "
                             f"skmerge.store.write_store); fit reflection files as a table: "
                             f"skmerge.read_unmerged({os.fspath(store)!r}).")
        self.path = Path(store)
        self.manifest = read_manifest(self.path)
        self.chunk_rows = chunk_rows
        self.select = select
        # Of the whole store: a selection's are counted as it is read.
        self.n_observations = int(self.manifest["observations"])

    def where(self, select):
        """This source with only the observations ``select`` keeps among its own."""
        if self.select is None:
            joined = select
        else:
            def joined(image_id, rows):
                return np.asarray(self.select(image_id, rows), bool) & np.asarray(select(image_id, rows), bool)
        return StoreSource(self.path, self.chunk_rows, joined)

    def image_files(self):
        """The ``file_id`` of every image of the store, in ``image_id`` order."""
        return _StoreIndex(self.path).image_files

    def chunks(self):
        """(table, rows) of every selected piece, as :func:`skmerge.store.iter_store_chunks`
        gives them with numpy dtypes."""
        if self.chunk_rows is None:
            return iter_store_chunks(self.path, mtz_dtypes=False, select=self.select)
        return iter_store_chunks(self.path, self.chunk_rows, mtz_dtypes=False, select=self.select)

    def head(self):
        """The first piece's table: the store's columns, symmetry and cell."""
        return next(iter(self.chunks()))[0]


def as_source(store):
    """A :class:`StoreSource` of a store's path, or the source given."""
    return store if isinstance(store, StoreSource) else StoreSource(store)


def fit_store(params, store, rng, seed, previous=None):
    """Fit a model to the observation store ``store`` (a path or a :class:`StoreSource`)
    as the estimator's parameters say, from scratch or from ``previous`` (the FitState
    and Weights of a fit to warm-start from; see the module docstring); returns a
    :class:`~skmerge.model.fitting.Training` and the store's first piece (its columns)."""
    from .training import Trainer

    check_streamable(params)
    source = as_source(store)
    survey = _Survey(params, source, seed, previous)
    state = survey.state
    if previous is None:
        image_scale, merged, _ = _quick_image_scales(params, source, state, survey.first_merge)
        seen = np.isfinite(merged)
        curve = wilson_curve(state.reflections.dhkl[seen], merged[seen] / state.reflections.epsilon[seen])
    else:
        image_scale, curve = None, previous[0].wilson_curve
    state.wilson_curve = curve
    state.reflections.mean_intensity = evaluate_curve(curve, state.reflections.dhkl)
    network = _scale_network(params, state, rng, previous, image_scale)
    posterior = start_posterior(params, state, previous,
                                partial(_robust_start_merge, params, source, state, network))
    model = merging_model(params, state, posterior, network, None if previous is None else previous[1])
    batches = StoreBatches(params, source, state, survey.image_counts, seed)
    trainer = Trainer(model, trained_variables(params, model), batches, learning_rate=params.learning_rate,
                      seed=seed, jit_compile=False, beta_1=params.beta_1, beta_2=params.beta_2,
                      clipnorm=params.clipnorm, clipvalue=params.clipvalue, global_clipnorm=params.global_clipnorm)
    try:
        with _progress(params.max_iter, params.verbose) as progress:
            history, converged = trainer.run(params.max_iter, tol=params.tol,
                                             n_iter_no_change=params.n_iter_no_change, progress=progress)
    finally:
        batches.close()
    with_posterior_corrections(params, model,
                               lambda: (state.evaluation_data(params, X)[0] for X, _ in source.chunks()),
                               len(state.reflections))
    if previous is None and params.freeze is None:
        state.reference_b = rotation_reference_b(params, model, state, lambda: (X for X, _ in source.chunks()))
    return Training(model, state, history, converged, trainer.kept_step), survey.head


class _Survey:
    """The first pass: reflections, images, intensity unit, first merge, metadata
    transformer (see the module docstring), and whether images get heads (read from the
    first piece's images); a warm start keeps the ``previous`` fit's unit and
    transformer."""

    def __init__(self, params, source, seed, previous=None):
        sample_rng = np.random.default_rng(seed)
        keep = min(1.0, SAMPLE_ROWS / max(source.n_observations, 1))
        keys = np.zeros(0, np.int64)
        sums = np.zeros((4, 0))  # count, ΣI, ΣI/σ², Σ1/σ² of every reflection
        flags = np.zeros((2, 0))  # centric, ε
        image_counts = np.zeros(int(source.manifest["images"]), np.int64)
        sample, self.head = [], None
        for X, _ in source.chunks():
            if self.head is None:
                self.head = X.iloc[:0]
                transformer = _metadata_transformer(params, X) if previous is None else None
                shape = resolved_network_shape(params, X, previous)
            observations = encode(X, anomalous=params.anomalous, separate_files=params.separate_files)
            chunk_keys, first, inverse = np.unique(observations.keys, return_index=True, return_inverse=True)
            inverse = inverse.ravel()
            weight = observations.sigma**-2.0
            chunk_sums = np.stack([np.bincount(inverse, weights=w, minlength=len(chunk_keys)) for w in (
                np.ones(len(inverse)), observations.intensity, weight * observations.intensity, weight)])
            chunk_flags = np.stack([X["CENTRIC"].to_numpy(bool)[first], X["EPSILON"].to_numpy(np.float64)[first]])
            keys, sums, flags = _union(keys, sums, flags, chunk_keys, chunk_sums, chunk_flags)
            image_counts += np.bincount(observations.image_id, minlength=len(image_counts))
            if transformer is not None:
                sample.append(X if keep == 1.0 else X.iloc[np.flatnonzero(sample_rng.random(len(X)) < keep)])
        if self.head is None:
            raise InputError(f"{source.path}: no observation is selected to fit.")
        reflections = Reflections.from_keys(keys, self.head.spacegroup, self.head.cell, params.anomalous,
                                            params.separate_files, flags[0].astype(bool), flags[1])
        count, total, weighted, weight = sums
        if previous is None:
            sample = pd.concat(sample)
            transformer.fit(sample)
            n_features = transformer.transform(sample.iloc[:1]).shape[1]
            del sample
            c = checked_intensity_scale(np.sum(total / reflections.epsilon) / np.sum(count))
        else:
            transformer, n_features = previous[0].metadata_transformer, previous[0].n_metadata_features
            c = previous[0].intensity_scale
        image_ids = np.flatnonzero(image_counts)
        self.image_counts = image_counts[image_ids]
        # A warm start stays in the frame of the fit it continues (a half-dataset merge in the full merge's).
        self.state = FitState(reflections, image_ids, count.astype(np.int64), c, transformer, n_features, None,
                              image_heads=shape.image_heads, image_layers=shape.image_layers,
                              mlp_layers=shape.mlp_layers,
                              reference_b=previous[0].reference_b if previous is not None else 0.0)
        # The merge of the unscaled data in standardised units: ΣwI/c over Σw/c² with w = 1/σ².
        self.first_merge = means_of_sums(weight * c * c, weighted * c)[0]


def _union(keys, sums, flags, new_keys, new_sums, new_flags):
    """Sorted keys with per-key sums and flags (rows of 2-D arrays), joined with another
    such set: the sums of keys in both are added, their flags taken from either."""
    union = np.union1d(keys, new_keys)
    old, new = np.searchsorted(union, keys), np.searchsorted(union, new_keys)
    joined_sums, joined_flags = np.zeros((len(sums), len(union))), np.zeros((len(flags), len(union)))
    joined_sums[:, new] = new_sums
    joined_sums[:, old] += sums
    joined_flags[:, new] = new_flags
    joined_flags[:, old] = flags
    return union, joined_sums, joined_flags


def _rows(params, state, X):
    """Each row's reflection and image (positions in the fit state), standardised
    intensity and σ."""
    observations = encode(X, anomalous=params.anomalous, separate_files=params.separate_files)
    refl = lookup_keys(state.reflections.keys, observations.keys)
    image = np.searchsorted(state.image_ids, observations.image_id)
    c = state.intensity_scale
    return refl, image, observations.intensity / c, observations.sigma / c


def _quick_image_scales(params, source, state, merged):
    """:func:`~skmerge.model.initialisation.quick_image_scales` in one pass per round
    (see the module docstring), from the first merge ``merged``."""
    n_images, n_reflections = len(state.image_ids), len(state.reflections)
    k, floor = np.ones(n_images), scale_floor(np.ones(1))
    for _ in range(SCALING_ROUNDS):
        weight_sum, weighted_sum = np.zeros(n_reflections), np.zeros(n_reflections)
        for X, _ in source.chunks():
            refl, image, intensity, sigma = _rows(params, state, X)
            images, local = np.unique(image, return_inverse=True)
            local = local.ravel()
            w = sigma**-2.0
            predicted = merged[refl]
            num = np.bincount(local, weights=w * intensity * predicted, minlength=len(images))
            den = np.bincount(local, weights=w * predicted * predicted, minlength=len(images))
            k[images] = np.maximum(image_scale_factors(num, den), floor)
            row_k = k[image]
            weight_sum += np.bincount(refl, weights=w * row_k * row_k, minlength=n_reflections)
            weighted_sum += np.bincount(refl, weights=w * row_k * intensity, minlength=n_reflections)
        norm = np.exp(np.mean(np.log(k)))
        k /= norm
        floor = scale_floor(k)
        # The merge under k/norm is norm times the merge under k.
        merged, merged_sigma = (norm * v for v in means_of_sums(weight_sum, weighted_sum))
    return k, merged, merged_sigma


def _robust_start_merge(params, source, state, network, family, family_prior):
    """:func:`~skmerge.baseline.robust_mean` of every observation scaled by its starting
    scale, per ``family`` of reflections, in passes (see the module docstring), from each
    family's :func:`~skmerge.model.initialisation.probable_observations` among those kept
    under ``family_prior`` (from the medians if None)."""
    from .._tf import tf

    # Compiled once for pieces of any length: eagerly, the network's chunked map runs op by op.
    scales = tf.function(network, reduce_retracing=True)

    def scaled():
        for X, _ in source.chunks():
            arrays, _ = state.evaluation_arrays(params, X)
            mu, spread = (t.numpy().astype(np.float64) for t in scales(
                tf.constant(arrays["features"]), tf.constant(arrays["image"], tf.int32)))
            scale_mean = np.exp(mu + spread**2 / 2)
            yield family[arrays["refl"]], arrays["intensity"] / scale_mean, arrays["sigma"] / scale_mean

    n_groups = len(family)
    kept = np.full((2, n_groups, RESERVOIR), np.nan, np.float32)  # values, σ
    filled, counts = np.zeros(n_groups, np.int64), np.zeros(n_groups, np.int64)
    for group, values, sigma in scaled():
        order = np.argsort(group, kind="stable")
        sorted_group = group[order]
        starts = np.flatnonzero(np.r_[True, sorted_group[1:] != sorted_group[:-1]])
        rank = np.arange(len(group)) - np.repeat(starts, np.diff(np.r_[starts, len(group)]))
        slot = filled[sorted_group] + rank
        fits = slot < RESERVOIR
        kept[0, sorted_group[fits], slot[fits]] = values[order][fits]
        kept[1, sorted_group[fits], slot[fits]] = sigma[order][fits]
        in_group = np.bincount(group, minlength=n_groups)
        counts += in_group
        filled = np.minimum(filled + in_group, RESERVOIR)
    has = np.isfinite(kept[0])
    kept_group = np.nonzero(has)[0]
    stands_for = (counts / np.maximum(filled, 1))[kept_group]
    # As robust_mean: the first round's scatter about the medians, whatever the start.
    centre = group_median(kept_group, kept[0][has], n_groups)
    mean = centre
    if family_prior is not None:
        mean = probable_observations(kept_group, kept[0][has].astype(np.float64), kept[1][has].astype(np.float64),
                                     n_groups, *family_prior, weights=stands_for)
    error = None
    for _ in range(_ROBUST_ROUNDS):
        residual = np.abs(kept[0][has] - centre[kept_group]) / kept[1][has]
        finite = np.isfinite(residual)
        spread = residual_spread(residual[finite], stands_for[finite]) if finite.any() else np.inf
        weight_sum, weighted_sum = np.zeros(n_groups), np.zeros(n_groups)
        for group, values, sigma in scaled():
            # A spread of ∞ (no finite residual) leaves the plain inverse-variance mean.
            excess = outlier_excess(np.abs(values - mean[group]) / sigma, spread, _ROBUST_CUTOFF)
            w = (sigma * excess) ** -2.0
            weight_sum += np.bincount(group, weights=w, minlength=n_groups)
            weighted_sum += np.bincount(group, weights=w * values, minlength=n_groups)
        mean, error = means_of_sums(weight_sum, weighted_sum)
        centre = mean
    return mean, error


class StoreBatches:
    """Minibatches of whole images read from an observation store while training runs.

    A pipeline of background threads feeds the steps: one draws ``batch_size`` images
    at a time from the store (:func:`skmerge.store.iter_image_batches`, a new order for
    every pass over it, holding about ``BUFFER_ROWS`` observations for shuffling), the
    next encodes them as the fit state says and pads them to the rows of the
    ``batch_size`` largest images, so that every batch has one shape, and ``tf.data``
    turns them into tensors; each stage runs up to ``PREFETCH_BATCHES`` ahead of the
    next, so that reading, encoding and the step overlap. Every stage is one thread
    passing its batches on in order, so the batches follow each other as they would
    drawn one by one: the fit depends on the seed, not on the threads' timing. As
    :class:`~skmerge.model.training.ImageBatches`, a batch's terms count
    n_images/images_in_batch times and padding counts for nothing.

    Parameters
    ----------
    params : VariationalMerger
    source : StoreSource
    state : FitState
    image_counts : ndarray
        Observations of each image of ``state.image_ids``.
    seed : int
    """

    def __init__(self, params, source, state, image_counts, seed):
        from .._tf import tf

        self.params, self.source, self.state, self.seed = params, source, state, int(seed)
        self.batch_size = min(int(params.batch_size), len(image_counts))
        self.n_rows = int(np.sort(image_counts)[::-1][:self.batch_size].sum())
        self.n_images = len(image_counts)
        self.n_total = float(image_counts.sum())
        self.buffer_images = max(BUFFER_BATCHES * self.batch_size, int(BUFFER_ROWS * self.n_images / self.n_total))
        self.rows_per_reflection = np.maximum(state.reflection_counts, 1).astype(np.float64)
        n_features = state.n_metadata_features
        rows = tf.TensorSpec([self.n_rows], tf.float32)
        signature = {"refl": tf.TensorSpec([self.n_rows], tf.int32), "image": tf.TensorSpec([self.n_rows], tf.int32),
                     "features": tf.TensorSpec([self.n_rows, n_features], tf.float32), "intensity": rows,
                     "sigma": rows, "weight": rows, "kl_weight": rows}
        self._stop, self._threads = threading.Event(), []
        dataset = tf.data.Dataset.from_generator(self._batches, output_signature=signature).prefetch(
            PREFETCH_BATCHES)
        self._iterator = iter(dataset)
        self._n_total = tf.constant(self.n_total, tf.float32)

    def _image_batches(self):
        epoch = 0
        while True:
            yield from iter_image_batches(self.source.path, self.batch_size, buffer_images=self.buffer_images,
                                          random_state=self.seed + epoch, mtz_dtypes=False, select=self.source.select)
            epoch += 1

    def _batches(self):
        read = _in_thread(self._image_batches(), PREFETCH_BATCHES, self._stop, self._threads)
        yield from _in_thread(map(self.padded, read), PREFETCH_BATCHES, self._stop, self._threads)

    def close(self):
        """Stop the threads that read and encode batches, and wait for them: a thread
        left inside pyarrow's reader when the interpreter exits hangs the exit."""
        self._stop.set()
        for thread in list(self._threads):
            thread.join()

    def padded(self, X):
        """The arrays of a batch of whole images, padded to the batch shape."""
        arrays, _ = self.state.evaluation_arrays(self.params, X)
        n, pad = len(arrays["refl"]), self.n_rows - len(arrays["refl"])
        factor = self.n_images / len(np.unique(arrays["image"]))
        ok = np.r_[np.ones(n), np.zeros(pad)]
        refl = np.r_[arrays["refl"], np.zeros(pad, np.int64)]
        return {"refl": refl.astype(np.int32), "image": np.r_[arrays["image"], np.full(pad, -1)].astype(np.int32),
                "features": np.concatenate([arrays["features"], np.zeros((pad, arrays["features"].shape[1]),
                                                                         np.float32)]),
                "intensity": np.r_[arrays["intensity"], np.zeros(pad)].astype(np.float32),
                "sigma": np.r_[arrays["sigma"], np.ones(pad)].astype(np.float32),
                "weight": (factor * ok).astype(np.float32),
                "kl_weight": (factor * ok / self.rows_per_reflection[refl]).astype(np.float32)}

    def draw(self, seed):
        """The next batch (``seed`` is unused: the store's shuffle is seeded at start)."""
        batch = dict(self._iterator.get_next())
        batch["n_total"] = self._n_total
        return batch


def _in_thread(items, depth, stop, threads):
    """The items of an iterable, computed in a background thread of their own (added to
    the list ``threads``) at most ``depth`` ahead of the consumer, in order, until
    ``stop`` is set; an exception of the thread is raised in the consumer."""
    buffer, end = queue.Queue(depth), object()

    def put(entry):
        # Waits in short turns, so that a consumer that has stopped lets the thread end.
        while not stop.is_set():
            try:
                buffer.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        iterator = iter(items)
        try:
            while not stop.is_set():
                item = next(iterator, end)
                if not put((item, None)) or item is end:
                    return
        except Exception as exc:  # handed to the consumer
            put((None, exc))

    thread = threading.Thread(target=produce, name="skmerge-store-feed", daemon=True)
    threads.append(thread)
    thread.start()
    while not stop.is_set():
        try:
            item, error = buffer.get(timeout=0.1)
        except queue.Empty:
            continue
        if error is not None:
            raise error
        if item is end:
            return
        yield item


def store_keys(params, state, source):
    """The sorted reflection keys of every observation of a store."""
    keys = np.zeros(0, np.int64)
    for X, _ in source.chunks():
        keys = np.union1d(keys, state.encode(params, X, np.zeros(len(X))).keys)
    return keys


def evaluate_store(source, evaluate):
    """``evaluate(table)`` of every selected piece of a store (a tuple of per-row arrays),
    joined in the order of the store's table (:func:`skmerge.store.read_store`)."""
    outputs = None
    filled = np.zeros(source.n_observations, bool)
    for X, rows in source.chunks():
        values = evaluate(X)
        if outputs is None:
            outputs = [np.empty(source.n_observations, np.asarray(v).dtype) for v in values]
        for out, value in zip(outputs, values):
            out[rows] = value
        filled[rows] = True
    if outputs is None:
        raise InputError(f"{source.path}: no observation is selected.")
    return tuple(out if filled.all() else out[filled] for out in outputs)
