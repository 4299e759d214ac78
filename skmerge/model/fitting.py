"""Fitting a model: build it, choose what trains, run the loop, watch a held-out set;
early stopping."""

import dataclasses
import gc
import math
from dataclasses import dataclass

import numpy as np

from ..errors import ParameterError
from ..table import take_rows
from .build import build_model, restore_model
from .data import Reflections, encode, laue_band
from .fitted import LIKELIHOOD_ATTRIBUTES, NetworkShape, Weights, likelihood_attributes, shape_asked_for


# Fitted attributes that only some fits have (a refit drops those it does not set).
OPTIONAL_ATTRIBUTES = ("sdfac_", "sdadd_", "prior_r_", "marginal_moments_", "image_weight_ratio_",
                       "image_scale_variance_",
                       *LIKELIHOOD_ATTRIBUTES,
                       "validation_scores_", "best_validation_score_", "wavelength_bands_", "dmin_",
                       "held_out_loss_curve_")


@dataclass
class Training:
    """The outcome of :func:`train`."""

    model: object
    state: object
    loss_curve: np.ndarray
    converged: bool
    kept_step: int
    validation_scores: np.ndarray = None
    """Held-out mean log predictive density per observation (in the input's units)
    after every chunk of steps, when a validation set steered early stopping."""
    held_out_loss: np.ndarray = None
    """(step, held-out observations' ``nll`` loss term) every ``validation_frequency``
    steps, when a held-out table was watched."""

    def attributes(self):
        """The estimator's fitted attributes that hold this outcome: the fit state, the
        weights and the training curves."""
        attributes = self.state.attributes()
        weights = Weights.of(self.model)
        attributes.update(posterior_weights_=weights.posterior, scale_weights_=weights.scale,
                          loss_curve_=self.loss_curve, n_iter_=len(self.loss_curve), converged_=bool(self.converged))
        if weights.error_model is not None:
            attributes["sdfac_"], attributes["sdadd_"] = (float(v) for v in weights.error_model)
        if weights.prior is not None:
            attributes["prior_r_"] = weights.prior
        if weights.marginals is not None:
            attributes["marginal_moments_"] = weights.marginals
        attributes["sandwich_ratio_"] = weights.sandwich_ratio
        if weights.image_weight_ratio is not None:
            attributes["image_weight_ratio_"] = weights.image_weight_ratio
        if weights.image_scale_variance is not None:
            attributes["image_scale_variance_"] = weights.image_scale_variance
        if weights.likelihood is not None:
            attributes.update(likelihood_attributes(self.model.likelihood, weights.likelihood))
        if self.held_out_loss is not None:
            attributes["held_out_loss_curve_"] = self.held_out_loss
        if self.validation_scores is not None:
            attributes["validation_scores_"] = self.validation_scores
            attributes["best_validation_score_"] = float(np.max(self.validation_scores))
        return attributes


def fit_model(params, X, y, rng, seed, *, previous=None, X_held_out=None, previous_as_prior=False):
    """Fit a model to the table X as the estimator's parameters say, from scratch or
    from ``previous`` (the FitState and Weights of a fit to warm-start from, whose
    posterior is the prior of the reflections it saw with ``previous_as_prior``),
    watching the loss of the table ``X_held_out`` every ``validation_frequency`` steps.

    Laue data are expanded into harmonics in the band of the data (or of the previous
    fit, so that a warm start keeps its reflections).

    With ``early_stopping`` a first fit holds ``validation_fraction`` of the images out
    and watches their predictive density; the number of steps that gave the best value
    is then used to fit every image (so every image is merged), and the first fit's
    held-out scores and convergence are reported with it.
    """
    harmonics = previous[0].harmonics if previous is not None else None
    if params.laue and harmonics is None:
        bands, dmin = laue_band(X, params.wavelength_key, params.wavelength_range)
        harmonics = {"wavelength_key": params.wavelength_key, "wavelength_range": bands, "dmin": dmin}
    encoding = {"anomalous": params.anomalous, "separate_files": params.separate_files, "harmonics": harmonics}
    start = {"previous": previous, "harmonics": harmonics, "previous_as_prior": previous_as_prior,
             "network_shape": resolved_network_shape(params, X, previous)}
    if not params.early_stopping:
        return train(params, encode(X, y, **encoding), rng, seed, params.max_iter, held_out=X_held_out, **start)
    rows = _training_rows(X["image_id"].to_numpy(np.int64), params.validation_fraction, rng)
    first = train(params, encode(take_rows(X, rows), None if y is None else np.asarray(y)[rows], **encoding), rng,
                  seed, params.max_iter, validation=take_rows(X, ~rows), **start)
    steps, converged, scores = first.kept_step, first.converged, first.validation_scores
    del first
    gc.collect()  # the first model's TensorFlow functions sit in reference cycles
    result = train(params, encode(X, y, **encoding), rng, seed, steps, stop=False, held_out=X_held_out, **start)
    result.converged, result.validation_scores = converged, scores
    return result


# Layers of their own for each serial still (careless's thermolysin example uses two):
# thermolysin's CC1/2 0.921 → 0.939 and CCanom 0.043 → 0.101 against image heads; two
# gave 0.937 and 0.090, and three beat two in each half-dataset split of two seeds.
_STILLS_IMAGE_LAYERS = 3
# The shared scale network's depth for serial stills, whose images' layers carry what is
# each still's own: thermolysin's CCanom 0.101/0.124/0.128 (20 layers) → 0.257/0.200/0.237
# (6) in three seeds, CC1/2 up too, and a step 0.62× as long (bench/RESULTS.md).
_STILLS_MLP_LAYERS = 6


def resolved_network_shape(params, X, previous=None):
    """The estimator's ``mlp_layers``, ``image_layers`` and ``image_heads`` for the
    table X, "auto" decided (a :class:`~skmerge.model.fitted.NetworkShape`). Serial
    stills (:func:`skmerge.geometry.recorded_as_stills`) with per-image offsets get
    ``_STILLS_IMAGE_LAYERS`` image layers, or heads when ``image_layers`` gives them
    none (each is freedom of the images' own: one is enough), and under image layers a
    ``_STILLS_MLP_LAYERS`` deep shared network; the rest (rotation series, Laue data,
    stills without image layers) get ``MLP_LAYERS`` and no image freedom of their own
    but what is asked. A warm start keeps what the fit it continues decided.
    """
    from ..geometry import recorded_as_stills
    from .scaling import image_model

    asked = shape_asked_for(params)
    auto = {name for name in NetworkShape._fields if getattr(params, name) == "auto"}
    if not auto:
        return asked
    if previous is not None:
        return asked._replace(**{name: getattr(previous[0], name) for name in auto})
    stills = not params.laue and recorded_as_stills(X)
    own_weights = stills and image_model(params) == "offsets"  # the encoder gives images no weights of their own
    layers, heads = asked.image_layers, asked.image_heads
    if "image_layers" in auto:
        layers = _STILLS_IMAGE_LAYERS if own_weights and not heads else 0
    if "image_heads" in auto:
        heads = own_weights and not layers
    # Only what was measured: stills whose images have layers of their own.
    depth = _STILLS_MLP_LAYERS if "mlp_layers" in auto and stills and layers else asked.mlp_layers
    return NetworkShape(depth, layers, heads)


def train(params, observations, rng, seed, max_iter, *, previous=None, harmonics=None, validation=None,
          stop=True, held_out=None, previous_as_prior=False, network_shape=None):
    """Build the model on encoded ``observations`` and optimise it for up to ``max_iter``
    steps: until the training loss levels off; with ``validation`` (a table of held-out
    images) until their loss stops improving (the best state is kept); or, with
    ``stop=False``, for exactly ``max_iter`` steps. The loss of the table ``held_out``
    is recorded every ``validation_frequency`` steps without steering training.
    ``previous`` and ``previous_as_prior`` are :func:`fit_model`'s; ``network_shape`` is
    :func:`resolved_network_shape`'s."""
    from .distributed import active_strategy, check_workers, data_parallel_trainer
    from .training import ImageBatches, Trainer

    strategy = active_strategy()
    if strategy is not None:
        check_workers(strategy, params, observations, seed)
    model, data, state = build_model(params, observations, rng, previous, harmonics, previous_as_prior,
                                     network_shape)
    variables = trained_variables(params, model)
    if params.freeze == "scales":
        data["mu"], data["spread"] = model.scale_network.of(data)
    options = dict(learning_rate=params.learning_rate, jit_compile=params.jit_compile, beta_1=params.beta_1,
                   beta_2=params.beta_2, clipnorm=params.clipnorm, clipvalue=params.clipvalue,
                   global_clipnorm=params.global_clipnorm)
    if strategy is not None:
        trainer = data_parallel_trainer(strategy, params, model, variables, data, state, seed, options)
    else:
        if params.batch_size is not None and params.batch_size < len(state.image_ids):
            data = ImageBatches(data, data["image"].numpy(), state.reflection_counts[data["refl"].numpy()],
                                params.batch_size, spot=observations.spot)
        else:
            data = model.prepared(data)
        trainer = Trainer(model, variables, data, seed=seed, **options)
    scores = []
    monitor = watch = None
    if validation is not None:
        monitor = _validation_monitor(params, model, state, validation, seed, scores)
    if held_out is not None:
        watch = _held_out_nll(params, model, state, held_out, seed)
    with _progress(max_iter, params.verbose) as progress:
        history, converged = trainer.run(
            max_iter, tol=params.tol, n_iter_no_change=params.n_iter_no_change if stop else max_iter,
            progress=progress, monitor=monitor, watch=watch, watch_every=params.validation_frequency,
        )
    held_out_loss = None
    if held_out is not None:
        held_out_loss = np.array(trainer.watched, dtype=np.float64).reshape(-1, 2)
    return Training(model, state, history, converged, trainer.kept_step,
                    np.asarray(scores) if validation is not None else None, held_out_loss)


def with_posterior_corrections(params, model, data_chunks, n_reflections):
    """Set what a trained model's merged table needs beyond its posterior (not for
    amplitudes frozen at given values): its grid marginals
    (:mod:`skmerge.model.marginals`) when the estimator's ``marginals`` asks for them, and
    the sandwich ratio that widens SIGF (:mod:`skmerge.model.sandwich`), and the factors
    that carry the uncertainty of each image's own scale weights into SIGF
    (:mod:`skmerge.model.scale_uncertainty`), with the variance of each image's log scale
    that predictions carry. ``data_chunks`` gives the training data."""
    from .marginals import grid_marginals
    from .sandwich import sandwich_ratio
    from .scale_uncertainty import image_weight_uncertainty

    fitted = params.freeze != "posterior"
    grid = fitted and params.marginals == "grid"
    model.marginals = grid_marginals(model, data_chunks, n_reflections) if grid else None
    model.sandwich_ratio = sandwich_ratio(model, data_chunks, n_reflections) if fitted else 1.0
    # Scales held at a previous fit's values were not fitted to these observations.
    scales_fitted = fitted and params.freeze != "scales"
    uncertainty = image_weight_uncertainty(model, data_chunks, n_reflections) if scales_fitted else None
    model.image_weight_ratio, model.image_scale_variance = uncertainty or (None, None)


def joined_with_previous(params, old_state, old_weights, result):
    """The training result of an online update (``VariationalMerger.partial_fit``)
    extended to everything fitted before: the union of the old and new reflections and
    images, with the new posterior and per-image weights where the update has them and
    the old ones elsewhere, the reflections' observation counts added, and the shared
    weights (scale network, noise model, prior) of the update."""
    state, weights = result.state, Weights.of(result.model)
    old_reflections, reflections = old_state.reflections, state.reflections
    old_keys, new_keys = old_reflections.keys, reflections.keys
    keys = np.union1d(old_keys, new_keys)
    union = dataclasses.replace(reflections, **{
        field.name: values_on_union(keys, old_keys, getattr(old_reflections, field.name), new_keys,
                                    getattr(reflections, field.name))
        for field in dataclasses.fields(Reflections) if isinstance(getattr(reflections, field.name), np.ndarray)})
    counts = np.zeros(len(keys), np.int64)
    counts[np.searchsorted(keys, old_keys)] += old_state.reflection_counts
    counts[np.searchsorted(keys, new_keys)] += state.reflection_counts
    posterior = {name: values_on_union(keys, old_keys, old_weights.posterior[name], new_keys, value)
                 for name, value in weights.posterior.items()}
    images = np.union1d(old_state.image_ids, state.image_ids)
    scale = list(weights.scale)
    for i in result.model.scale_network.per_image_weights():
        if len(scale[i]) == len(state.image_ids):  # not the empty table of a model without offsets
            scale[i] = values_on_union(images, old_state.image_ids, old_weights.scale[i], state.image_ids, scale[i])
    union_state = dataclasses.replace(state, reflections=union, image_ids=images, reflection_counts=counts)
    # The marginals of the reflections seen before stand with their posterior; without
    # marginals on both sides there are none.
    marginals = None
    if weights.marginals is not None and old_weights.marginals is not None:
        marginals = values_on_union(keys, old_keys, old_weights.marginals.T, new_keys, weights.marginals.T).T
    # Reflections without a factor on one side (or fits without one) keep their posterior's.
    ratio = None
    if weights.image_weight_ratio is not None or old_weights.image_weight_ratio is not None:
        ratio = values_on_union(keys, old_keys, _values_or(old_weights.image_weight_ratio, len(old_keys), 1.0),
                                new_keys, _values_or(weights.image_weight_ratio, len(new_keys), 1.0))
    # Images without a variance on one side (or fits without one) get none.
    scale_variance = None
    if weights.image_scale_variance is not None or old_weights.image_scale_variance is not None:
        scale_variance = values_on_union(
            images, old_state.image_ids, _values_or(old_weights.image_scale_variance, len(old_state.image_ids), 0.0),
            state.image_ids, _values_or(weights.image_scale_variance, len(state.image_ids), 0.0))
    union_weights = dataclasses.replace(weights, posterior=posterior, scale=scale, marginals=marginals,
                                        image_weight_ratio=ratio, image_scale_variance=scale_variance)
    return dataclasses.replace(result, model=restore_model(params, union_state, union_weights), state=union_state)


def _values_or(values, n, fill):
    return np.full(n, fill, np.float32) if values is None else values


def values_on_union(keys, old_keys, old_values, new_keys, new_values):
    """Values (rows of arrays) of two sorted sets of distinct keys on ``keys``, their
    union: the new value where both have a key."""
    values = np.empty((len(keys),) + np.shape(new_values)[1:], np.result_type(old_values, new_values))
    values[np.searchsorted(keys, old_keys)] = old_values
    values[np.searchsorted(keys, new_keys)] = new_values
    return values


def trained_variables(params, model):
    """The variables of ``model`` that training changes (all but those ``freeze`` keeps)."""
    from .._tf import tf

    variables = []
    if params.freeze != "posterior":
        # The prior's learned parameters (a double-Wilson r) belong with the amplitudes.
        variables += list(model.posterior.trainable_variables) + list(model.prior.trainable_variables)
    if params.freeze != "scales":
        variables += list(model.scale_network.trainable_variables)
        # The noise model's parameters (error model, Student-t ν) train with the scales.
        for noise in (model.error_model, model.likelihood):
            if isinstance(noise, tf.Module):
                variables += list(noise.trainable_variables)
    return variables


def _validation_monitor(params, model, state, X_val, seed, scores):
    """A function returning the current mean negative log predictive density of the
    held-out images (what early stopping watches); it records each value as a score in
    the input's units."""
    evaluate = _mean_loss(params, state, X_val, lambda data, extra, seed: model.log_predictive(data, 4, seed, extra),
                          seed)

    def monitor():
        loss = float(evaluate())
        scores.append(-loss - math.log(state.intensity_scale))
        return loss

    return monitor


def _held_out_nll(params, model, state, X_held_out, seed):
    """A function returning the held-out observations' expected negative log-likelihood
    per observation under the current posterior: the ``nll`` term of the loss, on data
    the fit does not see."""
    evaluate = _mean_loss(params, state, X_held_out, lambda data, extra, seed: model.expected_log_likelihood(
        data, params.mc_samples, seed, extra), seed)
    return lambda: float(evaluate())


def _mean_loss(params, state, X, log_density, seed):
    """A compiled function of the model's current state: minus the mean over the
    observations of the table X of ``log_density(data, extra_prior, seed)``."""
    from .._tf import tf

    data, extra = state.evaluation_data(params, X)
    seed = tf.constant([seed, 1])
    return tf.function(lambda: -tf.reduce_mean(log_density(data, extra, seed)), jit_compile=params.jit_compile)


def _training_rows(image, fraction, rng):
    """Rows of the images kept for training when ``fraction`` of them are held out."""
    images = np.unique(image)
    if len(images) < 2:
        raise ParameterError("early_stopping needs at least two images to hold one out.")
    n_val = min(max(1, int(round(fraction * len(images)))), len(images) - 1)
    held_out = rng.choice(images, n_val, replace=False)
    return ~np.isin(image, held_out)


class _progress:
    """A tqdm bar with the loss and ETA when verbose, else nothing."""

    def __init__(self, total, verbose):
        self.total, self.verbose, self.bar = total, verbose, None

    def __enter__(self):
        if not self.verbose:
            return None
        from tqdm.auto import tqdm

        self.bar = tqdm(total=self.total, desc="fit", unit="step", dynamic_ncols=True)

        def update(step, loss):
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4f}")

        return update

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
