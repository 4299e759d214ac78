"""Assembling a model from an estimator's parameters and encoded observations: the
fit state (:class:`~skmerge.model.fitted.FitState`), the starting values, the scale
network, the posterior, and the prior, likelihood and error model around them."""

from numbers import Real
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.base import clone

from ..baseline import robust_mean
from ..errors import InputError, ParameterError
from ..features import check_metadata_columns, make_metadata_transformer, metadata_features, split_metadata
from ..symmetry import lookup_keys
from .data import tensor_data
from .fitted import FitState, prior_of
from .initialisation import (evaluate_curve, french_wilson, quick_image_scales, table_start, wilson_curve,
                             wilson_moments)

# An image encoder starts by learning the quick image scales of this many images (at
# most) in this many steps of this step size.
_START_IMAGES = 500
_START_STEPS = 300
_START_LEARNING_RATE = 0.01


def build_model(params, observations, rng, previous=None, harmonics=None):
    """The model, its training data and the fit state for encoded observations.

    A fresh fit standardises the intensities, fits the metadata transformer, scales the
    images quickly and estimates the Wilson curve; a warm start (``previous``: the
    (FitState, Weights) of the last fit) keeps all four. Starting values come from the
    observations that hold one reflection each (in Laue data, the spots without
    harmonic overlap). ``harmonics`` is the Laue expansion the observations were
    encoded with.

    Returns
    -------
    model : MergingModel
    data : dict of tensors
    state : FitState
    """
    from .scaling import image_model

    reflections, refl = observations.reflections(params.anomalous, params.separate_files)
    image_ids, image_row = np.unique(observations.image_id, return_inverse=True)
    single = observations.single_rows()
    rows = observations.rows
    if previous is None:
        intensity_scale = checked_intensity_scale(
            np.mean(observations.intensity[observations.of_row(single)] / reflections.epsilon[refl[single]]))
        transformer = _metadata_transformer(params, rows).fit(rows)
    else:
        intensity_scale, transformer = previous[0].intensity_scale, previous[0].metadata_transformer
    c = intensity_scale
    intensity, sigma = observations.intensity / c, observations.sigma / c
    features = metadata_features(transformer, rows, params.metadata)
    image_scale = None
    if previous is None:
        obs = observations.of_row(single)
        image_scale, merged, _ = quick_image_scales(
            refl[single], image_row[single], intensity[obs], sigma[obs], len(reflections), len(image_ids)
        )
        seen = np.isfinite(merged)
        curve = wilson_curve(reflections.dhkl[seen], merged[seen] / reflections.epsilon[seen])
    else:
        curve = previous[0].wilson_curve
    reflections.mean_intensity = evaluate_curve(curve, reflections.dhkl)
    state = FitState(reflections, image_ids, np.bincount(refl, minlength=len(reflections)), c, transformer,
                     features.shape[1], curve, harmonics)

    encoder = image_model(params) == "encoder"
    data = tensor_data(refl, image_row, features, intensity, sigma, observations.spot,
                       state.image_inputs(observations) if encoder else None)
    network = _scale_network(params, state, rng, previous, image_scale)
    start = tensor_data(refl[single], image_row[single], features[single],
                        *(v[observations.of_row(single)] for v in (intensity, sigma)))
    if encoder and previous is None:
        _learn_quick_scales(params, network, data, image_row, image_scale, rng)
    mu, spread = (t.numpy().astype(np.float64)[single] for t in network.of(data))
    posterior = start_posterior(params, state, previous, lambda family: _robust_start_merge(start, mu, spread, family))
    weights = previous[1] if previous is not None else None
    return merging_model(params, state, posterior, network, weights), data, state


def merging_model(params, state, posterior, network, weights=None):
    """The posterior and scale network joined with the prior, the likelihood and the
    error model: the error model at its starting values, or at fitted ``weights``."""
    from .error_model import make_error_model
    from .likelihoods import make_likelihood
    from .training import MergingModel

    error_model = make_error_model(params.error_model)
    if error_model is not None:
        fitted = weights.error_model if weights is not None else None
        error_model = error_model.build(*(fitted if fitted is not None else ()))
    prior = prior_of(params).build(state.reflections)
    if weights is not None and weights.prior is not None and hasattr(prior, "set_weights"):
        prior.set_weights(weights.prior)
    likelihood = make_likelihood(params.likelihood).build(weights.likelihood if weights is not None else None)
    return MergingModel(posterior, prior, likelihood, network, params.mc_samples, error_model, params.kl_weight)


def restore_model(params, state, weights):
    """The TensorFlow model of a fit from its numpy weights (after unpickling)."""
    from .posterior import TruncatedNormalPosterior
    from .scaling import ScaleNetwork, image_model

    n = len(state.reflections)
    posterior = TruncatedNormalPosterior(np.ones(n), np.ones(n), params.epsilon)
    posterior.set_weights(weights.posterior)
    network = ScaleNetwork(state.n_metadata_features, params.mlp_layers, params.mlp_width, len(weights.scale[-1]),
                           np.random.RandomState(0), spread_bijector=params.scale_bijector,
                           encoder=image_model(params) == "encoder")
    network.set_weights(weights.scale)
    return merging_model(params, state, posterior, network, weights)


def checked_intensity_scale(mean_intensity):
    """The unit of the standardised intensities (the mean I/ε of the data), or InputError
    when it is not positive."""
    scale = float(mean_intensity)
    if not scale > 0:
        raise InputError("the mean intensity is not positive; these data hold no signal to merge.")
    return scale


def _metadata_transformer(params, X):
    if params.metadata is not None and not isinstance(params.metadata, (list, tuple)):
        return clone(params.metadata)
    columns, _ = split_metadata(params.metadata)
    check_metadata_columns(X, columns)
    encoded = params.positional_encoding_keys
    missing = sorted(set(encoded or ()) - set(columns))
    if missing:
        raise InputError(f"positional_encoding_keys {missing} are not among the metadata columns {columns}.")
    return make_metadata_transformer(columns, params.positional_encoding, encoded, params.standardize_metadata)


def _scale_network(params, state, rng, previous, image_scale):
    from .scaling import ScaleNetwork, image_model

    kind = image_model(params)
    n_images = len(state.image_ids) if kind == "offsets" else 0
    offsets = np.log(image_scale) if previous is None and n_images else None
    network = ScaleNetwork(state.n_metadata_features, params.mlp_layers, params.mlp_width, n_images, rng, offsets,
                           params.scale_bijector, encoder=kind == "encoder")
    if previous is not None:
        old_state, old_weights = previous
        weights = list(old_weights.scale)
        if [np.shape(w) for w in weights[:-1]] != [np.shape(w) for w in network.get_weights()[:-1]]:
            raise ParameterError("warm_start needs the scale network of the previous fit: refit from scratch after "
                                 "changing metadata, mlp_layers, mlp_width or image_model.")
        if n_images:
            old = dict(zip(old_state.image_ids, weights[-1])) if len(weights[-1]) else {}
            fallback = float(np.mean(weights[-1])) if len(weights[-1]) else 0.0
            weights[-1] = np.array([old.get(i, fallback) for i in state.image_ids], np.float32)
        else:
            weights[-1] = np.zeros(0, np.float32)
        network.set_weights(weights)
    return network


def _learn_quick_scales(params, network, data, image_row, image_scale, rng):
    """Train the scale network and its image encoder to reproduce the quick image scales
    (least squares on log Σ) on the rows of a random subset of the images: the start
    that per-image offsets get by being set to them, at a cost that does not grow with
    the data."""
    from .._tf import tf
    from .training import Trainer

    chosen = rng.choice(len(image_scale), min(len(image_scale), _START_IMAGES), replace=False)
    rows = np.flatnonzero(np.isin(image_row, chosen))
    subset = {key: tf.gather(data[key], rows) for key in ("features", "image", "image_inputs")}
    subset["target"] = tf.constant(np.log(image_scale)[image_row[rows]], tf.float32)
    trainer = Trainer(_ScaleRegression(network), network.trainable_variables, subset,
                      learning_rate=_START_LEARNING_RATE, seed=0, jit_compile=params.jit_compile)
    trainer.run(_START_STEPS, tol=0.0, n_iter_no_change=_START_STEPS)


class _ScaleRegression:
    """The squared error of a scale network's log Σ against ``target``, in the shape of
    the loss terms a :class:`~skmerge.model.training.Trainer` minimises."""

    def __init__(self, network):
        self.network = network

    def loss_terms(self, data, seed):
        from .._tf import tf

        loss = tf.reduce_mean(tf.square(self.network.of(data)[0] - data["target"]))
        return tf.stack([loss, loss, 0.0])


def _robust_start_merge(data, mu, spread, family):
    """The robust merge (:func:`~skmerge.baseline.robust_mean`) of the rows of ``data``
    scaled by their starting scales (log Σ ~ Normal(``mu``, ``spread``)), per ``family``
    of each reflection."""
    scale_mean = np.exp(mu + spread**2 / 2)
    return robust_mean(family[data["refl"].numpy()], data["intensity"].numpy() / scale_mean,
                       data["sigma"].numpy() / scale_mean, len(family))


def start_posterior(params, state, previous, start_merge):
    """The truncated-normal posterior at its starting values: French–Wilson amplitudes of
    ``start_merge(family)`` (a robust merge of the scaled starting data per family of
    reflections: merged intensities and their σ), the prior, Wilson's mean with a
    multiple of Wilson's standard deviation (a number), or a merged table's amplitudes; a
    warm start keeps the posterior of reflections seen before."""
    from .posterior import TruncatedNormalPosterior

    reflections = state.reflections
    prior_mean = np.sqrt(reflections.epsilon.astype(np.float64))
    init = params.posterior_init
    if isinstance(init, str) and init == "prior" and previous is None:
        loc, scale = 0.8 * prior_mean, 0.5 * prior_mean
    elif isinstance(init, Real) and previous is None:
        loc, scale = wilson_moments(reflections)
        scale = init * scale
    else:
        # A prior that ties reflections together (double-Wilson) starts every family
        # from one estimate of all its observations: separate starts would hand each
        # member its own noise as a difference the fit must then unlearn.
        family = getattr(prior_of(params), "families", lambda r: np.arange(len(r)))(reflections)
        merged, merged_sigma = start_merge(family)
        loc, scale = french_wilson(reflections, merged[family], merged_sigma[family])
        bad = ~np.isfinite(loc) | ~np.isfinite(scale) | (scale <= 0)
        loc = np.where(bad, 0.8 * prior_mean, np.maximum(loc, 1e-3))
        scale = np.where(bad, 0.5 * prior_mean, scale)
    if isinstance(init, (pd.DataFrame, Path)):
        loc, scale = table_start(init, reflections, loc, scale)
    posterior = TruncatedNormalPosterior(loc, scale, params.epsilon)
    if previous is not None and params.warm_start is True:
        old_state, old_weights = previous
        rows = lookup_keys(old_state.reflections.keys, reflections.keys)
        known = rows >= 0
        weights = posterior.get_weights()
        for key in weights:
            weights[key][known] = old_weights.posterior[key][rows[known]]
        posterior.set_weights(weights)
    return posterior
