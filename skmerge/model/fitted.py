"""A fitted model: what a fit learned besides its weights, the weights, and the
evaluation of tables with them.

A fit learns TensorFlow weights (the posterior, the scale network, the error model) and
everything around them that turns a table into the model's inputs: the reflections, the
images of the fit, the intensity unit, the fitted metadata transformer, the Wilson
curve and, for Laue data, the band of the harmonic expansion. The second kind is a
:class:`FitState`. The estimator copies both into its fitted attributes only once
training has succeeded, and rebuilds them from those attributes to evaluate.
"""

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy.special import logsumexp

from ..features import metadata_features
from ..merged import anomalous_table, merged_table
from ..symmetry import lookup_keys, pack_hkl, resolution, unpack_group, unpack_hkl
from .data import Reflections, chunks, encode, tensor_data
from .decay import fall_off
from .initialisation import evaluate_curve

# Posterior samples of the expected prior curvature behind the linear-response SIGF.
_COVARIANCE_SAMPLES = 32


# The scale network's depth on data other than serial stills (careless's default).
MLP_LAYERS = 20


class NetworkShape(NamedTuple):
    """The scale network's shape a fit decided: its depth and the images' own freedom
    (the estimator's ``mlp_layers``, ``image_layers`` and ``image_heads``, "auto"
    resolved)."""

    mlp_layers: int
    image_layers: int
    image_heads: bool


def heads_asked_for(params):
    """Whether an estimator's ``image_heads`` asks for heads whatever the data ("auto"
    asks for nothing yet)."""
    return not isinstance(params.image_heads, str) and bool(params.image_heads)


def layers_asked_for(params):
    """The number of image layers an estimator's ``image_layers`` asks for whatever the
    data ("auto" asks for none yet)."""
    return 0 if isinstance(params.image_layers, str) else int(params.image_layers)


def shape_asked_for(params):
    """The :class:`NetworkShape` an estimator asks for whatever the data ("auto" depth
    is ``MLP_LAYERS``, "auto" image freedom none)."""
    depth = MLP_LAYERS if isinstance(params.mlp_layers, str) else int(params.mlp_layers)
    return NetworkShape(depth, layers_asked_for(params), heads_asked_for(params))


@dataclass
class FitState:
    """What a fit learns besides its weights (see the module docstring)."""

    reflections: Reflections
    image_ids: np.ndarray
    reflection_counts: np.ndarray
    intensity_scale: float
    metadata_transformer: object
    n_metadata_features: int
    wilson_curve: tuple
    harmonics: dict = None
    """The keywords of :func:`skmerge.laue.expand_harmonics` fixed by the fit (Laue)."""
    image_heads: bool = False
    """Whether the images have heads of their own (``image_heads``, "auto" resolved)."""
    image_layers: int = 0
    """The number of layers of their own the images have (``image_layers``, "auto" resolved)."""
    mlp_layers: int = MLP_LAYERS
    """The scale network's depth (``mlp_layers``, "auto" resolved)."""
    reference_b: float = 0.0
    """The B (Å²) by which the fit's least-decayed images' scales fall off against the
    model's amplitudes; the merged table and the predictions' scales are in their frame
    (:mod:`skmerge.model.decay`; 0 for stills, Laue data and fits saved before it)."""

    def attributes(self):
        """The estimator's fitted attributes that hold this state."""
        attributes = {
            "reflections_": self.reflections, "image_ids_": self.image_ids,
            "reflection_counts_": self.reflection_counts, "intensity_scale_": self.intensity_scale,
            "metadata_transformer_": self.metadata_transformer, "n_metadata_features_": self.n_metadata_features,
            "wilson_curve_": self.wilson_curve, "image_heads_": self.image_heads,
            "image_layers_": self.image_layers, "mlp_layers_": self.mlp_layers, "reference_b_": self.reference_b,
        }
        if self.harmonics is not None:
            attributes["wavelength_bands_"] = self.harmonics["wavelength_range"]
            attributes["dmin_"] = self.harmonics["dmin"]
        return attributes

    @classmethod
    def from_attributes(cls, estimator):
        """The state held by a fitted estimator's attributes."""
        harmonics = None
        if estimator.laue:
            harmonics = {"wavelength_key": estimator.wavelength_key, "wavelength_range": estimator.wavelength_bands_,
                         "dmin": estimator.dmin_}
        # Fits made before mlp_layers, image_layers or image_heads could be "auto" have no
        # fitted attribute for it: theirs was the parameter.
        asked = shape_asked_for(estimator)
        shape = NetworkShape(*(getattr(estimator, f"{name}_", value) for name, value in asked._asdict().items()))
        return cls(estimator.reflections_, estimator.image_ids_, estimator.reflection_counts_,
                   estimator.intensity_scale_, estimator.metadata_transformer_, estimator.n_metadata_features_,
                   estimator.wilson_curve_, harmonics, bool(shape.image_heads), int(shape.image_layers),
                   int(shape.mlp_layers), float(getattr(estimator, "reference_b_", 0.0)))

    def encode(self, params, X, y=None):
        """X encoded as the fit encoded its training data."""
        return encode(X, y, anomalous=params.anomalous, separate_files=params.separate_files,
                      harmonics=self.harmonics)

    def fall_off(self, d):
        """The factor that takes the model's intensities at resolutions ``d`` (Å) into the
        frame of the merged table (:func:`skmerge.model.decay.fall_off` of ``reference_b``)."""
        return fall_off(self.reference_b, d) if self.reference_b else np.ones(len(d))

    def observation_resolution(self, X):
        """dHKL (Å) in the fit's cell of each row of X (a Laue spot's indices as recorded,
        not its harmonics')."""
        # From the rows' own indices, which give the ASU's d: no second encoding of X.
        columns = ["H", "K", "L"] if {"H", "K", "L"} <= set(X.columns) else ["Hobs", "Kobs", "Lobs"]
        return resolution(X[columns].to_numpy(np.int32), self.reflections.cell)

    def locate(self, params, keys):
        """Rows of reflection ``keys`` among the model's; reflections the fit never saw
        are numbered after them and get the prior returned alongside (else None)."""
        known = self.reflections
        refl = lookup_keys(known.keys, keys)
        unseen = refl < 0
        if not unseen.any():
            return refl, None
        new_keys, new_row = np.unique(keys[unseen], return_inverse=True)
        refl[unseen] = len(known) + new_row.ravel()
        union = Reflections.from_keys(np.concatenate([known.keys, new_keys]), known.spacegroup, known.cell,
                                      params.anomalous, params.separate_files)
        union.mean_intensity = evaluate_curve(self.wilson_curve, union.dhkl)
        # Built on the union so that a reference prior is normalised as in the fit.
        prior = prior_of(params).build(union).take(np.arange(len(known), len(union)))
        return refl, prior

    def image_inputs(self, observations):
        """What an image encoder reads of each row of encoded observations besides its
        metadata (:func:`~skmerge.model.scaling.observation_inputs`), the expected
        intensity being the Wilson curve's at the row's resolution."""
        from .scaling import observation_inputs

        keys, inverse = np.unique(observations.keys, return_inverse=True)
        expected = evaluate_curve(self.wilson_curve, resolution(unpack_hkl(keys), self.reflections.cell))
        obs = observations.of_row(np.arange(len(observations.keys)))
        c = self.intensity_scale
        return observation_inputs(observations.intensity[obs] / c, observations.sigma[obs] / c,
                                  expected[inverse.ravel()])

    def evaluation_data(self, params, X, y=None):
        """Tensors for evaluating X, and the prior of reflections the fit never saw.

        With per-image offsets, the images of X are numbered as in the fit (−1 for those
        it never saw); with the image encoder, among X's own images, with the inputs the
        encoder reads of every row."""
        arrays, extra = self.evaluation_arrays(params, X, y)
        return tensor_data(**arrays), extra

    def evaluation_arrays(self, params, X, y=None):
        """The arrays of :meth:`evaluation_data` (the keywords of
        :func:`~skmerge.model.data.tensor_data`), and the prior of reflections the fit
        never saw."""
        from .build import known_log_scale
        from .scaling import image_model

        observations = self.encode(params, X, y)
        refl, extra = self.locate(params, observations.keys)
        image_inputs = None
        if image_model(params) == "encoder":
            image = np.unique(observations.image_id, return_inverse=True)[1].ravel()
            image_inputs = self.image_inputs(observations)
        else:
            found = np.minimum(np.searchsorted(self.image_ids, observations.image_id), len(self.image_ids) - 1)
            image = np.where(self.image_ids[found] == observations.image_id, found, -1)
        c = self.intensity_scale
        features = metadata_features(self.metadata_transformer, observations.rows, params.metadata)
        return {"refl": refl, "image": image, "features": features, "intensity": observations.intensity / c,
                "sigma": observations.sigma / c, "spot": observations.spot, "image_inputs": image_inputs,
                "log_known_scale": known_log_scale(params, observations.rows)}, extra

    def merged(self, params, model, X):
        """The merged table of the reflections observed in X (see
        ``VariationalMerger.transform``)."""
        return self.table(params, model, np.unique(self.encode(params, X, np.zeros(len(X))).keys))

    def table(self, params, model, keys):
        """The merged table of the reflections with the given sorted keys."""
        # Imported here: the sandwich module loads TensorFlow, and this module must not
        # (the command line's --help and --version import it without TensorFlow).
        from .sandwich import applied_ratio, shared_correlation

        refl, extra = self.locate(params, keys)
        moments = [m.numpy().astype(np.float64) for m in model.amplitude_moments(extra)]
        m1, m2, _, m4 = (m[refl] for m in moments)
        counts = np.append(self.reflection_counts, 0)[np.minimum(refl, len(self.reflections))]
        hkl = unpack_hkl(keys)
        c = self.intensity_scale * self.fall_off(resolution(hkl, self.reflections.cell))
        root = np.sqrt(c)
        sigf, sigi = np.sqrt(np.maximum(m2 - m1**2, 0.0)), np.sqrt(np.maximum(m4 - m2**2, 0.0))
        group = unpack_group(keys) if params.separate_files else None
        fitted = refl < len(self.reflections)
        variance = np.maximum(moments[1] - moments[0] ** 2, 0.0)[:len(self.reflections)]
        covariance = model.amplitude_covariance(_COVARIANCE_SAMPLES, getattr(params, "seed_", 0))
        # SIGI follows SIGF's corrections: Var I ≈ 4F²·Var F for the reflections it matters for.
        if covariance is not None:
            variance = covariance.variance
            widened = np.sqrt(variance[refl[fitted]])
            sigi[fitted] *= np.divide(widened, sigf[fitted], out=np.ones_like(widened), where=sigf[fitted] > 0)
            sigf[fitted] = widened
        # Each reflection's own factor (its images' scale weights), then the sandwich's,
        # common to all.
        own = np.ones(len(self.reflections)) if model.image_weight_ratio is None else \
            np.asarray(model.image_weight_ratio, np.float64)
        ratio = applied_ratio(model.sandwich_ratio)
        widening = np.sqrt(ratio * own[refl[fitted]])
        sigf[fitted] *= widening
        sigi[fitted] *= widening
        mate_correlation = None
        if params.anomalous:
            mate = lookup_keys(self.reflections.keys, pack_hkl(-hkl, group))
            both = fitted & (mate >= 0)
            pair = refl[both], mate[both]
            mate_correlation = np.zeros(len(refl))
            if covariance is not None:
                mate_correlation[both] = covariance.covariance(*pair) / np.sqrt(variance[pair[0]] * variance[pair[1]])
            # The images' weights' share is shared by the halves as the sandwich's is: the
            # prior ties a reflection to its mate, so an image's scale error moves both
            # (widened each on its own, DANO's z on simulated stills fell from 1.03 to 0.84).
            mate_correlation[both] = shared_correlation(mate_correlation[both], variance[pair[0]],
                                                        variance[pair[1]], ratio * own[pair[0]], ratio * own[pair[1]])
        columns = {"F": m1 * root, "SIGF": sigf * root, "I": m2 * c, "SIGI": sigi * c, "N": counts.astype(np.int32)}
        spacegroup, cell = self.reflections.spacegroup, self.reflections.cell
        if params.anomalous:
            return anomalous_table(hkl, columns, spacegroup, cell, group, mate_correlation)
        if group is not None:
            columns["file_id"] = group
        return merged_table(hkl, columns, spacegroup, cell)

    def predict(self, params, model, X):
        """Mean and standard deviation of each observation's predicted intensity (in the
        input's units), and of its scale. A Laue spot sums its harmonics (their
        variances added) and takes the scale of its first harmonic. An image the fit
        never saw gets the mixture of the predictions with the weights of the images it
        saw (:func:`mixture_images`)."""
        from .scaling import image_model

        # Only an image encoder reads the observed intensities (X may lack them otherwise).
        arrays, extra = self.evaluation_arrays(params, X, None if image_model(params) == "encoder" else np.zeros(len(X)))
        mean, sd, scale, scale_sd = _moments(model, _with_scale_variance(model, arrays), extra)
        unseen, parts = self._mixture_parts(params, model, arrays, lambda own: _moments(model, own, extra))
        if parts is not None:
            mean[unseen], sd[unseen] = _mixed(parts[:, 0], parts[:, 1])
            scale[unseen], scale_sd[unseen] = _mixed(parts[:, 2], parts[:, 3])
        # Ipred = Scale × I of the merged table, whose intensities carry the fall-off.
        if self.reference_b:
            observed = self.fall_off(self.observation_resolution(X))
            scale, scale_sd = scale / observed, scale_sd / observed
        return mean * self.intensity_scale, sd * self.intensity_scale, scale, scale_sd

    def log_predictive(self, params, model, X, y, n_samples, seed):
        """log p(Iᵢ | training data) of each observation of X, per unit of the input
        intensities, from ``n_samples`` Monte Carlo samples; for an image the fit never
        saw, of the mixture over the images it saw (:func:`mixture_images`)."""
        arrays, extra = self.evaluation_arrays(params, X, y)
        values = _log_predictive(model, _with_scale_variance(model, arrays), extra, n_samples, seed)
        unseen, parts = self._mixture_parts(params, model, arrays,
                                            lambda own: _log_predictive(model, own, extra, n_samples, seed))
        if parts is not None:
            values[unseen] = logsumexp(parts, axis=0) - math.log(len(parts))
        return values - math.log(self.intensity_scale)

    def _mixture_parts(self, params, model, arrays, evaluate):
        """Whether each observation's image is one the fit never saw, and ``evaluate`` of
        those observations' arrays as each image of :func:`mixture_images` in turn
        (stacked; None when there are no such observations or the images have no
        weights of their own)."""
        unseen, components = _unseen_observations(arrays), mixture_images(model, len(self.image_ids), params)
        if not (unseen.any() and len(components)):
            return unseen, None
        own = _observations_of(arrays, unseen)
        return unseen, np.array([evaluate(_as_image(model, own, image)) for image in components])


# An image the fit never saw is predicted as any of the images it saw, each in turn: from
# at most this many of them (a fixed draw when there are more), which bounds the cost of
# predicting new images at this many passes over their rows.
_MIXTURE_IMAGES = 64


def mixture_images(model, n_images, params):
    """The training images whose weights an image the fit never saw is predicted with,
    in a mixture of equal weights: every image, or ``_MIXTURE_IMAGES`` of them drawn
    with the fit's seed; none when the images have no weights of their own (the
    image encoder reads each image's own rows instead).

    With images' own weights (offsets, image layers, heads), the scale of a still the fit
    never saw is as uncertain as the spread of the images' scales: the mean image's
    weights predict it with a bias (on thermolysin, log Σ of a still's own weights minus
    the mean image's: mean 0.84, SD 1.9) and a normal law in Σ fits a spread that wide
    poorly, where the mixture is the predictive the model implies."""
    network = model.scale_network
    if network.encoder is not None or (network.image_weight_count == 0 and network.heads is None):
        return np.arange(0)
    if n_images <= _MIXTURE_IMAGES:
        return np.arange(n_images)
    rng = np.random.default_rng(getattr(params, "seed_", 0))
    return np.sort(rng.choice(n_images, _MIXTURE_IMAGES, replace=False))


def _with_scale_variance(model, arrays):
    """``arrays`` with each row's ``log_scale_variance``: the uncertainty of its image's
    own scale weights (:mod:`skmerge.model.scale_uncertainty`), which the fit holds at
    point estimates; 0 for rows of images the fit never saw (their mixture carries
    each image's own)."""
    if model.image_scale_variance is None:
        return arrays
    per_image = np.asarray(model.image_scale_variance, np.float32)
    image = arrays["image"]
    return {**arrays, "log_scale_variance": np.where(image >= 0, per_image[np.maximum(image, 0)], 0.0)}


def _as_image(model, arrays, image):
    """``arrays`` with every row given to training image ``image``."""
    return _with_scale_variance(model, {**arrays, "image": np.full_like(arrays["image"], image)})


def _unseen_observations(arrays):
    """Whether each observation's image is one the fit never saw (image −1)."""
    unseen = arrays["image"] < 0
    if arrays.get("spot") is None:
        return unseen
    per_observation = np.zeros(len(arrays["intensity"]), bool)
    per_observation[arrays["spot"]] = unseen
    return per_observation


def _observations_of(arrays, keep):
    """The arrays of the observations ``keep`` (a mask over observations): their rows,
    with a Laue spot's numbering among the kept observations."""
    spot = arrays.get("spot")
    rows = keep if spot is None else keep[spot]
    taken = {key: None if value is None else value[keep if key in ("intensity", "sigma") else rows]
             for key, value in arrays.items()}
    if spot is not None:
        taken["spot"] = (np.cumsum(keep) - 1)[spot[rows]]
    return taken


def _moments(model, arrays, extra):
    """Per observation of ``arrays``, mean and SD of its predicted intensity (in the
    model's units) and of its scale: a Laue spot sums its harmonics' (their variances
    added) and takes its first harmonic's scale."""
    data = tensor_data(**arrays)
    outputs = [[] for _ in range(4)]
    for chunk in evaluation_chunks(model, data):
        for out, value in zip(outputs, model.predict(chunk, extra)):
            out.append(value.numpy().astype(np.float64))
    mean, sd, scale, scale_sd = (np.concatenate(o) for o in outputs)
    spot = arrays.get("spot")
    if spot is None:
        return mean, sd, scale, scale_sd
    n_obs = len(arrays["intensity"])
    first = np.unique(spot, return_index=True)[1]
    return (np.bincount(spot, weights=mean, minlength=n_obs), np.sqrt(np.bincount(spot, weights=sd**2, minlength=n_obs)),
            scale[first], scale_sd[first])


def _mixed(means, sds):
    """Mean and SD of an equal mixture whose components' means and SDs are the rows."""
    mean = means.mean(0)
    return mean, np.sqrt(np.maximum((sds**2 + means**2).mean(0) - mean**2, 0.0))


def _log_predictive(model, arrays, extra, n_samples, seed):
    """log p(Iᵢ | training data) of each observation of ``arrays``, in the model's units."""
    from .._tf import tf

    data = tensor_data(**arrays)
    seed = tf.constant([seed, 2])
    return np.concatenate([model.log_predictive(chunk, n_samples, seed, extra).numpy()
                           for chunk in evaluation_chunks(model, data)]).astype(np.float64)


def evaluation_chunks(model, data):
    """The pieces of evaluation data (:func:`~skmerge.model.data.chunks`), with the
    encoder's embedding of every image computed once from all its rows, which the pieces
    may split."""
    network = model.scale_network
    if network.encoder is not None:
        data = dict(data, image_embedding=network.image_embeddings(chunks(data), int(data["image"].numpy().max()) + 1))
    return chunks(data)


@dataclass
class Weights:
    """The numpy weights of a fitted model (what persists)."""

    posterior: dict
    scale: list
    error_model: np.ndarray = None
    """(SdFac, SdAdd) when the model has an error model."""
    prior: np.ndarray = None
    """The learned parameters of the prior (a double-Wilson prior's r), if it has any."""
    likelihood: np.ndarray = None
    """The learned parameters of the likelihood (a Student-t's ν), if it has any."""
    marginals: np.ndarray = None
    """The grid marginals' values (:class:`~skmerge.model.marginals.GridMarginals`), if
    the fit computed them."""
    sandwich_ratio: float = 1.0
    """J/H, the factor of the posterior variances in the merged table
    (:mod:`skmerge.model.sandwich`; 1 for fits saved before it)."""
    image_weight_ratio: np.ndarray = None
    """Per reflection, the factor of its posterior variance for its images' own scale
    weights (:mod:`skmerge.model.scale_uncertainty`; None: 1, as for fits saved before it)."""
    image_scale_variance: np.ndarray = None
    """Per image, the variance of its log scale from its own weights, which predictions
    carry (:mod:`skmerge.model.scale_uncertainty`; None: 0, as for fits saved before it)."""

    @classmethod
    def from_attributes(cls, estimator):
        """The weights held by a fitted estimator's attributes."""
        sdfac = getattr(estimator, "sdfac_", None)
        error_model = None if sdfac is None else np.array([sdfac, estimator.sdadd_])
        learned = list(learned_likelihood(estimator).values())
        return cls(estimator.posterior_weights_, estimator.scale_weights_, error_model,
                   getattr(estimator, "prior_r_", None), np.array(learned) if learned else None,
                   getattr(estimator, "marginal_moments_", None), getattr(estimator, "sandwich_ratio_", 1.0),
                   getattr(estimator, "image_weight_ratio_", None), getattr(estimator, "image_scale_variance_", None))

    @classmethod
    def of(cls, model):
        """The weights of a trained :class:`~skmerge.model.training.MergingModel`."""
        error_model = model.error_model.get_weights() if model.error_model is not None else None
        prior, likelihood = (getattr(piece, "get_weights", lambda: None)() for piece in (model.prior, model.likelihood))
        marginals = model.marginals.values if model.marginals is not None else None
        return cls(model.posterior.get_weights(), model.scale_network.get_weights(), error_model, prior, likelihood,
                   marginals, model.sandwich_ratio, model.image_weight_ratio, model.image_scale_variance)


# The fitted attributes of a likelihood's learned parameters, in the order its weights
# hold them: a Student-t's ν alone, a mixture's outlier fraction and width (and the ν of a
# Student-t core), or a two-piece Student-t's ν below and above the prediction.
LIKELIHOOD_ATTRIBUTES = ("likelihood_outlier_fraction_", "likelihood_outlier_scale_", "likelihood_dof_",
                         "likelihood_dof_below_", "likelihood_dof_above_")


def likelihood_attributes(likelihood, values):
    """The fitted attributes holding the learned ``values`` of a model's ``likelihood``
    (whose ``names`` say what they are)."""
    return {f"likelihood_{name}_": float(v) for name, v in zip(likelihood.names, values)}


def learned_likelihood(estimator):
    """A fitted estimator's learned likelihood parameters by name (``dof``;
    ``outlier_fraction`` and ``outlier_scale``, and ``dof`` of a Student-t core; or
    ``dof_below`` and ``dof_above``), in the
    order of the likelihood's weights; empty when its likelihood learned none."""
    return {name[len("likelihood_"):-1]: float(getattr(estimator, name))
            for name in LIKELIHOOD_ATTRIBUTES if hasattr(estimator, name)}


def prior_of(params):
    """The prior object of an estimator's ``prior`` parameter."""
    from .priors import make_prior

    return make_prior(params.prior)
