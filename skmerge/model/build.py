"""Assembling a model from an estimator's parameters and encoded observations: the
fit state (:class:`~skmerge.model.fitted.FitState`), the starting values, the scale
network, the posterior, and the prior, likelihood and error model around them."""

from functools import partial
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
from .fitted import FitState, prior_of, shape_asked_for
from .initialisation import (evaluate_curve, french_wilson, probable_observations, quick_image_scales, table_start,
                             wilson_curve, wilson_moments)

# An image encoder starts by learning the quick image scales of this many images (at
# most) in this many steps of this step size.
_START_IMAGES = 500
_START_STEPS = 300
_START_LEARNING_RATE = 0.01


def build_model(params, observations, rng, previous=None, harmonics=None, previous_as_prior=False,
                network_shape=None):
    """The model, its training data and the fit state for encoded observations.

    A fresh fit standardises the intensities, fits the metadata transformer, scales the
    images quickly and estimates the Wilson curve; a warm start (``previous``: the
    (FitState, Weights) of the last fit) keeps all four. Starting values come from the
    observations that hold one reflection each (in Laue data, the spots without
    harmonic overlap). ``harmonics`` is the Laue expansion the observations were
    encoded with. With ``previous_as_prior`` the previous posterior of every reflection
    it has is that reflection's prior (:func:`previous_posterior_prior`) and its start.
    ``network_shape`` is the scale network's :class:`~skmerge.model.fitted.NetworkShape`
    (the estimator's ``mlp_layers``, ``image_layers`` and ``image_heads`` with "auto"
    decided; None: what the estimator asks for whatever the data).

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
    known_scale = known_log_scale(params, rows)
    # The starting values divide the known factor out of the observations that hold one
    # reflection, so that the scale model and the amplitudes start without it.
    single_factor = 1.0 if known_scale is None else np.exp(known_scale[single])
    if previous is None:
        intensity_scale = checked_intensity_scale(np.mean(
            observations.intensity[observations.of_row(single)] / single_factor / reflections.epsilon[refl[single]]))
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
            refl[single], image_row[single], intensity[obs] / single_factor, sigma[obs] / single_factor,
            len(reflections), len(image_ids)
        )
        seen = np.isfinite(merged)
        curve = wilson_curve(reflections.dhkl[seen], merged[seen] / reflections.epsilon[seen])
    else:
        curve = previous[0].wilson_curve
    reflections.mean_intensity = evaluate_curve(curve, reflections.dhkl)
    shape = network_shape or shape_asked_for(params)
    # A warm start stays in the frame of the fit it continues (a half-dataset merge in the full merge's).
    reference_b = previous[0].reference_b if previous is not None else 0.0
    state = FitState(reflections, image_ids, np.bincount(refl, minlength=len(reflections)), c, transformer,
                     features.shape[1], curve, harmonics, shape.image_heads, shape.image_layers, shape.mlp_layers,
                     reference_b)

    encoder = image_model(params) == "encoder"
    data = tensor_data(refl, image_row, features, intensity, sigma, observations.spot,
                       state.image_inputs(observations) if encoder else None, known_scale)
    network = _scale_network(params, state, rng, previous, image_scale)
    start = tensor_data(refl[single], image_row[single], features[single],
                        *(v[observations.of_row(single)] for v in (intensity, sigma)),
                        log_known_scale=None if known_scale is None else known_scale[single])
    if encoder and previous is None:
        _learn_quick_scales(params, network, data, image_row, image_scale, rng)
    mu, spread = (t.numpy().astype(np.float64)[single] for t in network.of(data))
    posterior = start_posterior(params, state, previous, partial(_robust_start_merge, start, mu, spread),
                                previous_as_prior)
    weights = previous[1] if previous is not None else None
    model = merging_model(params, state, posterior, network, weights, previous if previous_as_prior else None)
    return model, data, state


def merging_model(params, state, posterior, network, weights=None, previous=None):
    """The posterior and scale network joined with the prior, the likelihood and the
    error model: the error model at its starting values, or at fitted ``weights``; with
    ``previous`` (a fit's FitState and Weights) the prior of
    :func:`previous_posterior_prior`."""
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
    if previous is not None:
        prior = previous_posterior_prior(params, prior, state, *previous)
    likelihood = make_likelihood(params.likelihood).build(weights.likelihood if weights is not None else None)
    return MergingModel(posterior, prior, likelihood, network, params.mc_samples, error_model, params.kl_weight)


def previous_posterior_prior(params, prior, state, old_state, old_weights):
    """The prior of an online update (``VariationalMerger.partial_fit``): the old fit's
    posterior for the reflections it saw, ``prior`` (the merger's, built for ``state``)
    for the others.

    Under a double-Wilson prior every reflection seen before becomes a root whose law is
    its old posterior: a new child keeps its tie to a parent seen before (the old
    posterior stands for the parent's prior given the old images, and the child's law
    given the parent is the prior's), while an old child loses its tie to its parent
    (its old posterior already holds what its own observations said; tying it again
    would need the old prior divided out). So nothing is counted twice, and only the
    information an old child carries about a new parent is left out.
    """
    from .posterior import TruncatedNormalPosterior
    from .priors import PreviousPosteriorDistribution

    n_old = len(old_state.reflections)
    old = TruncatedNormalPosterior(np.ones(n_old), np.ones(n_old), params.epsilon)
    old.set_weights(old_weights.posterior)
    old = old.distribution()
    rows = lookup_keys(old_state.reflections.keys, state.reflections.keys)
    seen = rows >= 0
    loc, scale = (v.numpy()[np.maximum(rows, 0)] for v in (old.loc, old.scale))
    if hasattr(prior, "rerooted"):
        return prior.rerooted(seen, PreviousPosteriorDistribution(seen, loc, scale, prior.wilson))
    return PreviousPosteriorDistribution(seen, loc, scale, prior)


def restore_model(params, state, weights):
    """The TensorFlow model of a fit from its numpy weights (after unpickling)."""
    from .posterior import TruncatedNormalPosterior
    from .scaling import ScaleNetwork, image_model

    n = len(state.reflections)
    posterior = TruncatedNormalPosterior(np.ones(n), np.ones(n), params.epsilon)
    posterior.set_weights(weights.posterior)
    network = ScaleNetwork(state.n_metadata_features, state.mlp_layers, params.mlp_width, len(weights.scale[-1]),
                           np.random.RandomState(0), spread_bijector=params.scale_bijector,
                           encoder=image_model(params) == "encoder", image_layers=state.image_layers,
                           n_layer_images=len(state.image_ids), image_heads=state.image_heads)
    network.set_weights(weights.scale)
    model = merging_model(params, state, posterior, network, weights)
    model.sandwich_ratio = float(weights.sandwich_ratio)
    model.image_weight_ratio = weights.image_weight_ratio
    model.image_scale_variance = weights.image_scale_variance
    if weights.marginals is not None:
        from .marginals import GridMarginals

        model.marginals = GridMarginals.under(model.prior, weights.marginals)
    return model


def known_log_scale(params, rows):
    """The log of the known factor of each row's scale (:func:`skmerge.laue.log_known_scale`),
    or None."""
    if not params.laue:
        return None
    from ..laue import log_known_scale

    return log_known_scale(rows, params.wavelength_key, params.spectrum, params.lorentz_correction)


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
    network = ScaleNetwork(state.n_metadata_features, state.mlp_layers, params.mlp_width, n_images, rng, offsets,
                           params.scale_bijector, encoder=kind == "encoder", image_layers=state.image_layers,
                           n_layer_images=len(state.image_ids), image_heads=state.image_heads)
    if previous is not None:
        network.set_weights(_per_image_weights_for(network, state, *previous))
    return network


def _per_image_weights_for(network, state, old_state, old_weights):
    """The previous fit's scale weights for this fit's images: the per-image weights
    (offsets, image layers) of the images seen before kept, the mean image's for the
    others."""
    weights = list(old_weights.scale)
    per_image = network.per_image_weights()
    current = network.get_weights()
    shared = [i for i in range(len(current)) if i not in per_image]
    if len(weights) != len(current) or any(np.shape(weights[i]) != np.shape(current[i]) for i in shared):
        raise ParameterError("warm_start needs the scale network of the previous fit: refit from scratch after "
                             "changing metadata, mlp_layers, mlp_width, image_layers, image_heads or image_model.")
    rows = lookup_keys(old_state.image_ids, state.image_ids)
    known = rows >= 0
    for i in per_image:
        old = np.asarray(weights[i], np.float32)
        fallback = old.mean(axis=0) if len(old) else np.zeros(current[i].shape[1:], np.float32)
        fresh = np.array(np.broadcast_to(fallback, current[i].shape), np.float32)
        if len(old) and len(fresh):
            fresh[known] = old[rows[known]]
        weights[i] = fresh
    return weights


def _learn_quick_scales(params, network, data, image_row, image_scale, rng):
    """Train the scale network and its image encoder to reproduce the quick image scales
    (least squares on log Σ) on the rows of a random subset of the images: the start
    that per-image offsets get by being set to them, at a cost that does not grow with
    the data."""
    from .._tf import tf
    from .distributed import replicated_trainer

    chosen = rng.choice(len(image_scale), min(len(image_scale), _START_IMAGES), replace=False)
    rows = np.flatnonzero(np.isin(image_row, chosen))
    subset = {key: tf.gather(data[key], rows) for key in ("features", "image", "image_inputs")}
    subset["target"] = tf.constant(np.log(image_scale)[image_row[rows]], tf.float32)
    trainer = replicated_trainer(_ScaleRegression(network), network.trainable_variables, subset,
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


def _robust_start_merge(data, mu, spread, family, family_prior):
    """The robust merge (:func:`~skmerge.baseline.robust_mean`) of the rows of ``data``
    scaled by their starting scales (log Σ ~ Normal(``mu``, ``spread``)), per ``family``
    of each reflection, from each family's :func:`probable_observations` under
    ``family_prior`` (see :func:`_family_priors`; from the medians if None)."""
    scale_mean = np.exp(mu + spread**2 / 2)
    group = family[data["refl"].numpy()]
    values, sigma = data["intensity"].numpy() / scale_mean, data["sigma"].numpy() / scale_mean
    start = None if family_prior is None else probable_observations(group, values, sigma, len(family), *family_prior)
    return robust_mean(group, values, sigma, len(family), start=start)


def start_posterior(params, state, previous, start_merge, previous_as_prior=False):
    """The truncated-normal posterior at its starting values: French–Wilson amplitudes of
    ``start_merge(family, family_prior)`` (a robust merge of the scaled starting data per
    family of reflections under the families' :func:`_family_priors`: merged intensities
    and their σ), the prior, Wilson's mean with a
    multiple of Wilson's standard deviation (a number), or a merged table's amplitudes; a
    warm start keeps the posterior of reflections seen before (as does an update whose
    prior is the previous posterior, ``previous_as_prior``; a warm start of the scales
    only, when the observations are those of the previous fit: see
    :func:`_same_observations`)."""
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
        merged, merged_sigma = start_merge(family, _family_priors(params, reflections, family))
        loc, scale = french_wilson(reflections, merged[family], merged_sigma[family])
        bad = ~np.isfinite(loc) | ~np.isfinite(scale) | (scale <= 0)
        loc = np.where(bad, 0.8 * prior_mean, np.maximum(loc, 1e-3))
        scale = np.where(bad, 0.5 * prior_mean, scale)
    if isinstance(init, (pd.DataFrame, Path)):
        loc, scale = table_start(init, reflections, loc, scale)
    posterior = TruncatedNormalPosterior(loc, scale, params.epsilon)
    from_data = isinstance(init, str) and init == "data"
    keep = params.warm_start is True or previous_as_prior
    if previous is not None and (keep or from_data and _same_observations(state, previous[0])):
        old_state, old_weights = previous
        rows = lookup_keys(old_state.reflections.keys, reflections.keys)
        known = rows >= 0
        weights = posterior.get_weights()
        for key in weights:
            weights[key][known] = old_weights.posterior[key][rows[known]]
        posterior.set_weights(weights)
    return posterior


def _family_priors(params, reflections, family):
    """Each family's Wilson Σ and whether it is centric, for the start's
    :func:`~skmerge.model.initialisation.probable_observations`; None for Laue data, whose
    families start from their medians.

    At the start a Laue observation's scale lacks the spectrum, so two observations of one
    reflection at different wavelengths disagree without either being an outlier; the
    prior's choice of the weaker then biased PYP's start, and its fits lost 0.025 of
    CC1/2 (F) in every one of 5 splits (bench/RESULTS.md)."""
    if params.laue:
        return None
    wilson_sigma, centric = np.ones(len(family)), np.zeros(len(family), bool)
    wilson_sigma[family] = reflections.epsilon * reflections.mean_intensity
    centric[family] = reflections.centric
    return wilson_sigma, centric


def _same_observations(state, old_state):
    """Whether a fit sees the reflections and images of the previous fit, each reflection
    as many times: the data it was fitted on. Its posterior is then the previous fit's
    answer to the very question the new fit asks, and the start to keep even when only
    the scales are reused; a start from the data would leave both fits, each stopped
    along the slow directions of the posterior's widths, at different points."""
    return (np.array_equal(state.image_ids, old_state.image_ids)
            and np.array_equal(state.reflections.keys, old_state.reflections.keys)
            and np.array_equal(state.reflection_counts, old_state.reflection_counts))
