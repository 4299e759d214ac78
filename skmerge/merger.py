"""VariationalMerger: the variational merging model as a scikit-learn estimator."""

import copy
import gc
import math
from dataclasses import dataclass
from numbers import Integral, Real

import gemmi
import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import HasMethods, Interval, InvalidParameterError, StrOptions
from sklearn.utils.validation import check_is_fitted

from . import __version__
from .errors import IncompatibleVersionError, InputError, ParameterError
from .features import check_metadata_columns, make_metadata_transformer, split_metadata
from .merged import anomalous_table, merged_table
from .symmetry import lookup_keys, map_to_asu, pack_hkl, reflection_flags, resolution, unpack_group, unpack_hkl

_SCORE_SAMPLES = 32
_EVAL_CHUNK = 200_000
_PERSISTENCE_FORMAT = 1


@dataclass
class Reflections:
    """The ASU reflections a model has parameters for (numpy only, picklable)."""

    hkl: np.ndarray
    centric: np.ndarray
    epsilon: np.ndarray
    dhkl: np.ndarray
    spacegroup: gemmi.SpaceGroup
    cell: gemmi.UnitCell
    anomalous: bool
    group: np.ndarray = None
    """The file each reflection belongs to when files are merged separately, else None."""
    mean_intensity: np.ndarray = None
    """Mean I/ε at each reflection's resolution, in standardised units (the Wilson Σ)."""

    @classmethod
    def from_keys(cls, keys, spacegroup, cell, anomalous, separate):
        """The reflections of sorted keys made by :func:`skmerge.symmetry.pack_hkl`."""
        hkl = unpack_hkl(keys)
        centric, epsilon = reflection_flags(hkl, spacegroup)
        group = unpack_group(keys) if separate else None
        return cls(hkl, centric, epsilon.astype(np.float32), resolution(hkl, cell), spacegroup, cell, anomalous, group)

    @property
    def keys(self):
        return pack_hkl(self.hkl, self.group)

    def __len__(self):
        return len(self.hkl)


class VariationalMerger(TransformerMixin, BaseEstimator):
    """Merge unmerged intensities into structure-factor amplitudes by variational inference.

    The model (see ``docs/model.md``): one amplitude F_h per ASU reflection with a
    Wilson or reference prior; one scale Σᵢ per observation from a neural network on the
    observation's metadata (plus optional per-image offsets); and a likelihood of each
    observed intensity around Σᵢ·F_h². The surrogate posterior of each F_h is a normal
    truncated to [0, ∞); the ELBO is maximised with Adam. Intensities are standardised
    internally, so any magnitude trains alike; outputs are returned in the input's units.

    Parameters
    ----------
    prior : "wilson" or prior object, default="wilson"
        :class:`~skmerge.WilsonPrior` or :class:`~skmerge.ReferencePrior`.
    likelihood : {"normal", "laplace", "studentt"} or likelihood object, default="normal"
    dof : float, default=16.0
        Degrees of freedom of the Student-t likelihood.
    error_model : bool, default=False
        Refine the observations' σ as SdFac·√(σ² + (SdAdd·Ipred)²): SdFac and SdAdd
        start at 1 and 0.01 (the reported σ) and are learned with the rest of the model
        (:class:`~skmerge.model.likelihoods.ErrorModel`); the fitted values are ``sdfac_``
        and ``sdadd_``. Serial stills need it: their σ leave out the error of the
        partiality.
    metadata : list of str or transformer, default=None
        Columns of X that drive the scale model, or a ready (unfitted) transformer such
        as a ``ColumnTransformer`` that maps X to numeric features. None uses ``["dHKL"]``.
        The default transformer turns dHKL into 1/d² and standardises every column;
        ``"image_id"`` in the list switches on per-image offsets instead of being a number.
    positional_encoding : int, default=0
        Frequencies of :class:`~skmerge.features.PositionalEncoding` applied to every
        metadata column by the default transformer (0: none).
    mlp_layers, mlp_width : int, default=20, 10
        Depth and width of the scale network (careless's defaults).
    image_scales : bool, default=True
        Give every image its own scale offset.
    mc_samples : int, default=1
        Monte Carlo samples per step for the expected log-likelihood.
    batch_size : int, default=None
        Images per optimisation step. None uses every observation in every step (full
        batch); a number draws that many whole images at random for each step, with the
        likelihood and KL terms scaled so that the loss stays an unbiased estimate —
        the cost of a step and its memory then no longer grow with the data.
    max_iter : int, default=2000
        Maximum number of optimisation steps.
    learning_rate : float, default=0.003
        Adam step size.
    tol : float, default=1e-3
        Progress, in nats per observation, that keeps training going: it stops when the
        mean loss of the last ``n_iter_no_change`` steps is less than ``tol`` below that
        of the ``n_iter_no_change`` steps before (with early stopping: when the held-out
        loss has not improved by ``tol`` for ``n_iter_no_change`` steps).
    n_iter_no_change : int, default=200
    early_stopping : bool, default=False
        Choose the number of steps on held-out images instead of the training loss: fit
        with ``validation_fraction`` of the images held out until their predictive
        log-likelihood has not improved for ``n_iter_no_change`` steps, then refit on
        every image for the number of steps that gave the best held-out value (so every
        image is merged). It helps serial stills fitted without ``error_model``, whose
        fit otherwise worsens with training.
    validation_fraction : float, default=0.1
    anomalous : bool, default=False
        Keep acentric Friedel mates apart and output the anomalous columns.
    separate_files : bool, default=False
        Give every file (``file_id``) its own amplitudes while sharing the scale model:
        time points or derivatives scaled together and merged separately. ``transform``
        then adds a ``file_id`` column.
    laue : bool, default=False
        Polychromatic data: every spot is expanded into its harmonics
        (:func:`skmerge.laue.expand_harmonics`, unless X already is) and its intensity is
        compared with the sum of Σ·F² over them. ``predict`` and ``score`` then work per
        spot.
    wavelength_key : str, default="Wavelength"
        The wavelength column of Laue data (also usable as metadata).
    wavelength_range : (float, float), optional
        The beam's band in Å; by default each file's smallest and largest wavelength.
    posterior_init : {"data", "prior"}, default="data"
        Start the posterior from a quick scaled merge (French–Wilson amplitudes), or from
        the prior.
    warm_start : bool or "scales", default=False
        Start from the previous fit: True reuses the scale model and the posterior of
        reflections seen before; "scales" reuses only the scale model (the posterior is
        started afresh from the data under those scales).
    freeze : {None, "scales", "posterior"}, default=None
        Keep that part of a warm-started model fixed during the fit.
    jit_compile : bool, default=False
        Compile the training loop with XLA. On CPUs TensorFlow's graph execution is
        faster (25 vs 66 ms per step on hypf) and saves seconds of compilation per fit;
        XLA may pay off on accelerators.
    random_state : int, RandomState instance or None, default=None
        Makes the fit repeatable.
    verbose : int, default=0
        Show a progress bar with the loss when positive.

    Attributes
    ----------
    reflections_ : Reflections
        The ASU reflections with parameters.
    reflection_counts_ : ndarray of shape (n_reflections,)
        Observations of each reflection used in the fit.
    image_ids_ : ndarray
        image_id of the images with their own scale offset.
    intensity_scale_ : float
        The unit of the standardised intensities (mean I/ε of the training data).
    metadata_transformer_ : transformer
        The fitted metadata transformer.
    loss_curve_ : ndarray of shape (n_iter_, 3)
        Loss (−ELBO per observation), its negative log-likelihood and KL parts, per step.
    n_iter_ : int
        Steps taken by the last fit.
    converged_ : bool
        Whether the last fit stopped on its convergence criterion.
    n_features_in_ : int
    feature_names_in_ : ndarray of str

    See Also
    --------
    skmerge.read_unmerged : builds the observation table X.
    skmerge.merge_inverse_variance : the unscaled baseline.

    Examples
    --------
    >>> from skmerge import VariationalMerger
    >>> from skmerge.datasets import make_unmerged
    >>> X, truth = make_unmerged(n_images=40, random_state=0)
    >>> merger = VariationalMerger(mlp_layers=4, max_iter=300, random_state=0).fit(X)
    >>> merged = merger.transform(X)
    >>> list(merged.columns)
    ['F', 'SIGF', 'I', 'SIGI', 'N']
    """

    _parameter_constraints = {
        "prior": [StrOptions({"wilson"}), HasMethods(["build"])],
        "likelihood": [StrOptions({"normal", "laplace", "studentt"}), HasMethods(["log_prob"])],
        "dof": [Interval(Real, 0, None, closed="neither")],
        "error_model": ["boolean"],
        "metadata": [None, list, tuple, HasMethods(["fit", "transform"])],
        "positional_encoding": [Interval(Integral, 0, None, closed="left")],
        "mlp_layers": [Interval(Integral, 1, None, closed="left")],
        "mlp_width": [Interval(Integral, 1, None, closed="left")],
        "image_scales": ["boolean"],
        "mc_samples": [Interval(Integral, 1, None, closed="left")],
        "batch_size": [None, Interval(Integral, 1, None, closed="left")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "learning_rate": [Interval(Real, 0, None, closed="neither")],
        "tol": [Interval(Real, 0, None, closed="left")],
        "n_iter_no_change": [Interval(Integral, 1, None, closed="left")],
        "early_stopping": ["boolean"],
        "validation_fraction": [Interval(Real, 0, 1, closed="neither")],
        "anomalous": ["boolean"],
        "separate_files": ["boolean"],
        "laue": ["boolean"],
        "wavelength_key": [str],
        "wavelength_range": [None, tuple, list],
        "posterior_init": [StrOptions({"data", "prior"})],
        "warm_start": ["boolean", StrOptions({"scales"})],
        "freeze": [None, StrOptions({"scales", "posterior"})],
        "jit_compile": ["boolean"],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
    }

    def __init__(
        self,
        *,
        prior="wilson",
        likelihood="normal",
        dof=16.0,
        error_model=False,
        metadata=None,
        positional_encoding=0,
        mlp_layers=20,
        mlp_width=10,
        image_scales=True,
        mc_samples=1,
        batch_size=None,
        max_iter=2000,
        learning_rate=0.003,
        tol=1e-3,
        n_iter_no_change=200,
        early_stopping=False,
        validation_fraction=0.1,
        anomalous=False,
        separate_files=False,
        laue=False,
        wavelength_key="Wavelength",
        wavelength_range=None,
        posterior_init="data",
        warm_start=False,
        freeze=None,
        jit_compile=False,
        random_state=None,
        verbose=0,
    ):
        self.prior = prior
        self.likelihood = likelihood
        self.dof = dof
        self.error_model = error_model
        self.metadata = metadata
        self.positional_encoding = positional_encoding
        self.mlp_layers = mlp_layers
        self.mlp_width = mlp_width
        self.image_scales = image_scales
        self.mc_samples = mc_samples
        self.batch_size = batch_size
        self.max_iter = max_iter
        self.learning_rate = learning_rate
        self.tol = tol
        self.n_iter_no_change = n_iter_no_change
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.anomalous = anomalous
        self.separate_files = separate_files
        self.laue = laue
        self.wavelength_key = wavelength_key
        self.wavelength_range = wavelength_range
        self.posterior_init = posterior_init
        self.warm_start = warm_start
        self.freeze = freeze
        self.jit_compile = jit_compile
        self.random_state = random_state
        self.verbose = verbose

    # ------------------------------------------------------------------ fitting
    def fit(self, X, y=None):
        """Fit the model to an observation table.

        Parameters
        ----------
        X : rs.DataSet
            Observation table from :func:`skmerge.read_unmerged` (or any DataFrame with
            its columns and ``spacegroup``/``cell``).
        y : array-like of shape (n_observations,), optional
            Intensities to use instead of ``X["Iobs"]``.

        Returns
        -------
        self
        """
        self._check_params()
        warm = bool(self.warm_start) and hasattr(self, "reflections_")
        if self.freeze is not None and not warm:
            raise ParameterError(f"freeze={self.freeze!r} needs warm_start=True or 'scales' and a previous fit.")
        if warm and self.error_model and not hasattr(self, "sdfac_"):
            raise ParameterError("error_model=True cannot warm-start from a fit made without it; refit from scratch.")
        _check_table(X)
        _symmetry(X)
        self.feature_names_in_ = np.asarray([str(c) for c in X.columns], dtype=object)
        self.n_features_in_ = len(self.feature_names_in_)
        rng = check_random_state(self.random_state)
        self.seed_ = int(rng.randint(2**31 - 1))
        if self.laue and not warm:
            self._fit_band(X)
        if not (warm and self.error_model):
            for name in ("sdfac_", "sdadd_"):
                self.__dict__.pop(name, None)

        every_row = np.ones(len(X), dtype=bool)
        previous = self._state() if warm else None
        if self.early_stopping:
            train = _training_rows(X["image_id"].to_numpy(np.int64), self.validation_fraction, rng)
            _, _, converged, best_step = self._train(X, y, train, rng, previous, self.max_iter, validation=~train)
            gc.collect()  # the first model's TensorFlow functions sit in reference cycles
            # The held-out images chose the number of steps; the merge uses every image.
            model, history, _, _ = self._train(X, y, every_row, rng, previous, best_step, stop=False)
        else:
            model, history, converged, _ = self._train(X, y, every_row, rng, previous, self.max_iter)
        self.loss_curve_ = history
        self.n_iter_ = len(history)
        self.converged_ = bool(converged)
        self.posterior_weights_ = model.posterior.get_weights()
        self.scale_weights_ = model.scale_network.get_weights()
        if model.error_model is not None:
            self.sdfac_, self.sdadd_ = model.error_model.get_weights()
        self.skmerge_version_ = __version__
        self._model = model
        return self

    def _train(self, X, y, rows, rng, previous, max_iter, *, validation=None, stop=True):
        """Build the model on the ``rows`` of X and optimise it for up to ``max_iter`` steps:
        until the training loss levels off, until the loss of the ``validation`` rows
        stops improving (the best state is kept), or, with ``stop=False``, for exactly
        ``max_iter`` steps. Returns the model, the loss history, whether training
        converged and the number of steps that led to the kept state."""
        from .model.training import ImageBatches, Trainer

        observations = self._observations(_rows(X, rows), None if y is None else np.asarray(y)[rows])
        model, data = self._build_model(observations, rng, previous)

        variables = []
        if self.freeze != "posterior":
            variables += [model.posterior.loc_raw, model.posterior.scale_raw]
        if self.freeze != "scales":
            variables += list(model.scale_network.trainable_variables)
            if model.error_model is not None:
                variables += list(model.error_model.trainable_variables)
        else:
            data["mu"], data["spread"] = model.scale_network(data["features"], data["image"])
        if self.batch_size is not None and self.batch_size < len(self.image_ids_):
            data = ImageBatches(
                data, data["image"].numpy(), self.reflection_counts_[data["refl"].numpy()], self.batch_size,
                spot=observations.spot,
            )
        trainer = Trainer(model, variables, data, learning_rate=self.learning_rate, seed=self.seed_, jit_compile=self.jit_compile)
        monitor = None
        if validation is not None:
            monitor = self._validation_monitor(model, _rows(X, validation), None if y is None else np.asarray(y)[validation])
        with _progress(max_iter, self.verbose) as progress:
            history, converged = trainer.run(
                max_iter, tol=self.tol, n_iter_no_change=self.n_iter_no_change if stop else max_iter,
                progress=progress, monitor=monitor,
            )
        return model, history, converged, trainer.kept_step

    def _build_model(self, observations, rng, previous):
        """Reflections, features, starting values and the TensorFlow model for a fit.

        A fresh fit standardises the intensities, fits the metadata transformer, scales
        the images quickly and estimates the Wilson curve; a warm start keeps all four.
        Starting values come from the observations that hold one reflection each (in
        Laue data, the spots without harmonic overlap)."""
        from .model.initialisation import evaluate_curve, quick_image_scales, wilson_curve

        X = observations.rows
        keys, refl = np.unique(self._reflection_keys(X, X.spacegroup), return_inverse=True)
        reflections = Reflections.from_keys(keys, X.spacegroup, X.cell, self.anomalous, self.separate_files)
        image_ids, image_row = np.unique(X["image_id"].to_numpy(np.int64), return_inverse=True)
        single = observations.single_rows()
        if previous is None:
            self.intensity_scale_ = _intensity_scale(
                observations.intensity[observations.of_row(single)], reflections.epsilon[refl[single]]
            )
            self.metadata_transformer_ = self._make_transformer(X).fit(X)
        c = self.intensity_scale_
        intensity, sigma = observations.intensity / c, observations.sigma / c
        features = self._features(X)
        self.n_metadata_features_ = features.shape[1]
        image_scale = None
        if previous is None:
            obs = observations.of_row(single)
            image_scale, merged, _ = quick_image_scales(
                refl[single], image_row[single], intensity[obs], sigma[obs], len(reflections), len(image_ids)
            )
            seen = np.isfinite(merged)
            self.wilson_curve_ = wilson_curve(reflections.dhkl[seen], merged[seen] / reflections.epsilon[seen])
        reflections.mean_intensity = evaluate_curve(self.wilson_curve_, reflections.dhkl)
        self.reflections_ = reflections
        self.image_ids_ = image_ids
        self.reflection_counts_ = np.bincount(refl, minlength=len(reflections))

        data = _tensor_data(refl, image_row, features, intensity, sigma, observations.spot)
        scale_network = self._build_scale_network(features.shape[1], rng, previous, image_scale)
        start = _tensor_data(refl[single], image_row[single], features[single], *(
            v[observations.of_row(single)] for v in (intensity, sigma)))
        posterior = self._build_posterior(previous, scale_network, start)
        return self._merging_model(posterior, scale_network, fresh=previous is None), data

    def _merging_model(self, posterior, scale_network, fresh):
        """The posterior and scale network joined with the prior, the likelihood and the
        error model: at its starting values (``fresh``) or at the fitted SdFac and SdAdd."""
        from .model.likelihoods import ErrorModel
        from .model.training import MergingModel

        error_model = None
        if self.error_model:
            error_model = ErrorModel().build() if fresh else ErrorModel().build(self.sdfac_, self.sdadd_)
        prior = _make_prior(self.prior).build(self.reflections_)
        likelihood = _make_likelihood(self.likelihood, self.dof)
        return MergingModel(posterior, prior, likelihood, scale_network, self.mc_samples, error_model)

    def _observations(self, X, y=None):
        """X's rows and observations: for Laue data the harmonics of every spot (X is
        expanded unless it already is) and the spots."""
        intensity, sigma = _intensities(X, y)
        if not self.laue:
            return _Observations(X, intensity, sigma, None)
        from .laue import SPOT_ID, expand_harmonics

        if SPOT_ID in X.columns:
            _, first, spot = np.unique(X[SPOT_ID].to_numpy(), return_index=True, return_inverse=True)
            intensity, sigma = intensity[first], sigma[first]
            # Rows of one spot next to each other, spots in order: evaluation chunks rely on it.
            order = np.argsort(spot.ravel(), kind="stable")
            rows, spot = X.iloc[order], spot.ravel()[order]
        else:
            rows = expand_harmonics(
                X, wavelength_key=self.wavelength_key, wavelength_range=self.wavelength_bands_,
                dmin=self.dmin_, anomalous=self.anomalous,
            )
            spot = rows[SPOT_ID].to_numpy()
        return _Observations(rows, intensity, sigma, spot.ravel())

    def _fit_band(self, X):
        """The band and resolution limit of the harmonic expansion, fixed at fit time so
        that every later expansion (held-out data, predictions) uses the same."""
        if self.wavelength_key not in X.columns:
            raise InputError(
                f"laue=True needs a wavelength column; {self.wavelength_key!r} is not one of "
                f"{', '.join(map(str, X.columns))}. Set wavelength_key=."
            )
        if self.wavelength_range is not None:
            self.wavelength_bands_ = tuple(float(v) for v in self.wavelength_range)
        else:
            wavelength = X[self.wavelength_key].to_numpy(np.float64)
            file_id = X["file_id"].to_numpy() if "file_id" in X.columns else np.zeros(len(X), int)
            self.wavelength_bands_ = {
                int(f): (float(wavelength[file_id == f].min()), float(wavelength[file_id == f].max()))
                for f in np.unique(file_id)
            }
        self.dmin_ = float(X["dHKL"].min())

    def _check_params(self):
        try:
            self._validate_params()
        except InvalidParameterError as exc:
            raise ParameterError(str(exc)) from None

    def _make_transformer(self, X):
        if self.metadata is not None and not isinstance(self.metadata, (list, tuple)):
            return copy.deepcopy(self.metadata)
        columns, _ = split_metadata(self.metadata)
        check_metadata_columns(X, columns)
        return make_metadata_transformer(columns, self.positional_encoding)

    def _uses_image_offsets(self):
        if isinstance(self.metadata, (list, tuple)):
            return self.image_scales or split_metadata(self.metadata)[1]
        return self.image_scales

    def _features(self, X):
        if isinstance(self.metadata, (list, tuple)) or self.metadata is None:
            check_metadata_columns(X, split_metadata(self.metadata)[0])
        try:
            features = np.asarray(self.metadata_transformer_.transform(X), dtype=np.float32)
        except (KeyError, ValueError) as exc:
            raise InputError(f"the metadata transformer failed on X: {exc}") from exc
        if features.ndim != 2 or len(features) != len(X):
            raise InputError("the metadata transformer must return one row of numbers per observation.")
        if not np.isfinite(features).all():
            raise InputError("the metadata transformer produced NaN or infinite features; check the metadata columns.")
        return features

    def _build_scale_network(self, n_features, rng, previous, image_scale):
        from .model.scaling import ScaleNetwork

        n_images = len(self.image_ids_) if self._uses_image_offsets() else 0
        offsets = np.log(image_scale) if previous is None and n_images else None
        network = ScaleNetwork(n_features, self.mlp_layers, self.mlp_width, n_images, rng, offsets)
        if previous is not None:
            weights = list(previous["scale_weights"])
            if n_images:
                old = dict(zip(previous["image_ids"], weights[-1])) if len(weights[-1]) else {}
                fallback = float(np.mean(weights[-1])) if len(weights[-1]) else 0.0
                weights[-1] = np.array([old.get(i, fallback) for i in self.image_ids_], np.float32)
            else:
                weights[-1] = np.zeros(0, np.float32)
            network.set_weights(weights)
        return network

    def _build_posterior(self, previous, scale_network, data):
        from .baseline import inverse_variance_mean
        from .model.initialisation import french_wilson
        from .model.posterior import TruncatedNormalPosterior

        reflections = self.reflections_
        prior_mean = np.sqrt(reflections.epsilon.astype(np.float64))
        if self.posterior_init == "prior" and previous is None:
            loc, scale = 0.8 * prior_mean, 0.5 * prior_mean
        else:
            mu, spread = (t.numpy().astype(np.float64) for t in scale_network(data["features"], data["image"]))
            scale_mean = np.exp(mu + spread**2 / 2)
            refl = data["refl"].numpy()
            merged, merged_sigma = inverse_variance_mean(
                refl, data["intensity"].numpy() / scale_mean, data["sigma"].numpy() / scale_mean, len(reflections)
            )
            loc, scale = french_wilson(reflections, merged, merged_sigma)
            bad = ~np.isfinite(loc) | ~np.isfinite(scale) | (scale <= 0)
            loc = np.where(bad, 0.8 * prior_mean, np.maximum(loc, 1e-3))
            scale = np.where(bad, 0.5 * prior_mean, scale)
        posterior = TruncatedNormalPosterior(loc, scale)
        if previous is not None and self.warm_start is True:
            rows = lookup_keys(previous["keys"], reflections.keys)
            known = rows >= 0
            weights = posterior.get_weights()
            for key in weights:
                weights[key][known] = previous["posterior_weights"][key][rows[known]]
            posterior.set_weights(weights)
        return posterior

    def _state(self):
        return {
            "keys": self.reflections_.keys,
            "posterior_weights": self.posterior_weights_,
            "scale_weights": self.scale_weights_,
            "image_ids": self.image_ids_,
        }

    def _validation_monitor(self, model, X_val, y_val):
        """A function returning the current mean negative log predictive density of the
        held-out images (what early stopping watches)."""
        from ._tf import tf

        self._model = model
        data, extra = self._evaluation_data(X_val, y_val)
        seed = tf.constant([self.seed_, 1])
        evaluate = tf.function(
            lambda: -tf.reduce_mean(model.log_predictive(data, 4, seed, extra)), jit_compile=self.jit_compile
        )
        return lambda: float(evaluate())

    # --------------------------------------------------------------- evaluation
    def _get_model(self):
        """The TensorFlow model, rebuilt from the stored numpy weights when needed (after
        unpickling)."""
        model = getattr(self, "_model", None)
        if model is not None:
            return model
        from .model.posterior import TruncatedNormalPosterior
        from .model.scaling import ScaleNetwork

        posterior = TruncatedNormalPosterior(np.ones(len(self.reflections_)), np.ones(len(self.reflections_)))
        posterior.set_weights(self.posterior_weights_)
        n_images = len(self.scale_weights_[-1])
        network = ScaleNetwork(self.n_metadata_features_, self.mlp_layers, self.mlp_width, n_images, np.random.RandomState(0))
        network.set_weights(self.scale_weights_)
        self._model = self._merging_model(posterior, network, fresh=False)
        return self._model

    def _locate(self, keys):
        """Rows of reflection ``keys`` among the model's; reflections the fit never saw
        are numbered after them and get the prior returned alongside (else None)."""
        known = self.reflections_
        refl = lookup_keys(known.keys, keys)
        unseen = refl < 0
        if not unseen.any():
            return refl, None
        from .model.initialisation import evaluate_curve

        new_keys, new_row = np.unique(keys[unseen], return_inverse=True)
        refl[unseen] = len(known) + new_row.ravel()
        union = Reflections.from_keys(
            np.concatenate([known.keys, new_keys]), known.spacegroup, known.cell, self.anomalous, self.separate_files
        )
        union.mean_intensity = evaluate_curve(self.wilson_curve_, union.dhkl)
        # Built on the union so that a reference prior is normalised as in the fit.
        prior = _make_prior(self.prior).build(union).take(np.arange(len(known), len(union)))
        return refl, prior

    def _reflection_keys(self, X, spacegroup=None):
        """The packed (file, ASU index) key of each observation's reflection, in the
        fitted model's space group unless another is given."""
        _check_table(X)
        spacegroup = spacegroup or self.reflections_.spacegroup
        hkl, _ = map_to_asu(_observed_hkl(X), spacegroup, self.anomalous)
        group = None
        if self.separate_files:
            if "file_id" not in X.columns:
                raise InputError("separate_files=True needs a file_id column; build X with skmerge.read_unmerged.")
            group = X["file_id"].to_numpy(np.int64)
        return pack_hkl(hkl, group)

    def _evaluation_data(self, X, y=None):
        """Tensors for evaluating X, and the prior of reflections the fit never saw."""
        observations = self._observations(X, y)
        rows = observations.rows
        refl, extra = self._locate(self._reflection_keys(rows))
        image_id = rows["image_id"].to_numpy(np.int64)
        found = np.minimum(np.searchsorted(self.image_ids_, image_id), len(self.image_ids_) - 1)
        image = np.where(self.image_ids_[found] == image_id, found, -1)
        c = self.intensity_scale_
        data = _tensor_data(
            refl, image, self._features(rows), observations.intensity / c, observations.sigma / c, observations.spot
        )
        return data, extra

    def transform(self, X):
        """Merged amplitudes and intensities of the reflections observed in X.

        Returns
        -------
        rs.DataSet
            Indexed by the ASU H, K, L, with F, SIGF (posterior mean and standard
            deviation of F), I = E[F²] = F² + SIGF², SIGI = √(E[F⁴] − I²) and N
            (observations used in the fit). With ``anomalous=True`` also F(±), SIGF(±),
            I(±), SIGI(±), N(±), DANO = F(+) − F(−) and SIGDANO. With
            ``separate_files=True`` a ``file_id`` column tells the files apart (the
            index repeats across files). Reflections the fit never saw carry their
            prior's moments and N = 0.
        """
        check_is_fitted(self, "posterior_weights_")
        keys = np.unique(self._reflection_keys(self._observations(X).rows))
        refl, extra = self._locate(keys)
        moments = self._get_model().amplitude_moments(extra)
        m1, m2, m3, m4 = (m.numpy().astype(np.float64)[refl] for m in moments)
        counts = np.append(self.reflection_counts_, 0)[np.minimum(refl, len(self.reflections_))]
        columns = _amplitude_columns(m1, m2, m3, m4, counts.astype(np.int32), self.intensity_scale_)
        hkl = unpack_hkl(keys)
        group = unpack_group(keys) if self.separate_files else None
        if self.anomalous:
            return anomalous_table(hkl, columns, self.reflections_.spacegroup, self.reflections_.cell, group)
        if group is not None:
            columns["file_id"] = group
        return merged_table(hkl, columns, self.reflections_.spacegroup, self.reflections_.cell)

    def predict(self, X):
        """Predicted intensity E[Σ]·E[F²] of each observation of X, in X's row order (for
        Laue data, of each spot: the sum over its harmonics)."""
        return self.predict_with_uncertainty(X)[0]

    def predict_with_uncertainty(self, X):
        """Predicted intensity, its standard deviation, and the scale and its standard
        deviation, per observation of X (intensities in the input's units). For a Laue
        spot the intensity sums its harmonics (their variances added) and the scale is
        that of its first harmonic."""
        check_is_fitted(self, "posterior_weights_")
        data, extra = self._evaluation_data(X)
        model = self._get_model()
        outputs = [[] for _ in range(4)]
        for chunk in _chunks(data):
            for out, value in zip(outputs, model.predict(chunk, extra)):
                out.append(value.numpy().astype(np.float64))
        mean, sd, scale, scale_sd = (np.concatenate(o) for o in outputs)
        if "spot" in data:
            spot = data["spot"].numpy()
            n_obs = int(data["intensity"].shape[0])
            first = np.unique(spot, return_index=True)[1]
            mean = np.bincount(spot, weights=mean, minlength=n_obs)
            sd = np.sqrt(np.bincount(spot, weights=sd**2, minlength=n_obs))
            scale, scale_sd = scale[first], scale_sd[first]
        c = self.intensity_scale_
        return mean * c, sd * c, scale, scale_sd

    def score_samples(self, X, y=None):
        """Log predictive density log p(Iᵢ | training data) of each observation of X, in
        the units of the input intensities, estimated with 32 Monte Carlo samples."""
        from ._tf import tf

        check_is_fitted(self, "posterior_weights_")
        data, extra = self._evaluation_data(X, y)
        model = self._get_model()
        seed = tf.constant([self.seed_, 2])
        values = [model.log_predictive(chunk, _SCORE_SAMPLES, seed, extra).numpy() for chunk in _chunks(data)]
        return np.concatenate(values).astype(np.float64) - math.log(self.intensity_scale_)

    def score(self, X, y=None):
        """Mean log predictive density per observation of X (higher is better).

        Each observation's likelihood is averaged over the posterior of its reflection
        (the prior for reflections the fit never saw) and over its scale (images without
        an offset of their own use the mean offset); the log of that average is then
        averaged over observations. Densities are per unit of the input intensities, so
        scores of different models on the same data compare directly.
        """
        return float(np.mean(self.score_samples(X, y)))

    def get_feature_names_out(self, input_features=None):
        """Names of the columns :meth:`transform` returns."""
        names = ["F", "SIGF", "I", "SIGI", "N"]
        if self.anomalous:
            names += [
                "F(+)", "SIGF(+)", "F(-)", "SIGF(-)", "I(+)", "SIGI(+)", "I(-)", "SIGI(-)",
                "N(+)", "N(-)", "DANO", "SIGDANO",
            ]
        return np.array(names, dtype=object)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # X must be an observation table (a DataFrame with named columns and symmetry),
        # not an arbitrary 2-D array, and fitting needs no target.
        tags.input_tags.two_d_array = False
        tags.target_tags.required = False
        tags.transformer_tags.preserves_dtype = []
        return tags

    # -------------------------------------------------------------- persistence
    def __getstate__(self):
        # object.__getstate__ hands back the live __dict__: copy before editing.
        state = dict(super().__getstate__())
        state.pop("_model", None)
        state["_skmerge_persistence"] = _PERSISTENCE_FORMAT
        return state

    def __setstate__(self, state):
        fmt = state.pop("_skmerge_persistence", None)
        version = state.get("skmerge_version_")
        if version is not None and (fmt != _PERSISTENCE_FORMAT or version.split(".")[:2] != __version__.split(".")[:2]):
            raise IncompatibleVersionError(
                f"this merger was saved by skmerge {version} (format {fmt}); skmerge "
                f"{__version__} cannot load it. Refit it, or install skmerge {version}."
            )
        super().__setstate__(state)


# ---------------------------------------------------------------------- helpers
def _make_prior(prior):
    from .model.priors import make_prior

    return make_prior(prior)


def _make_likelihood(likelihood, dof):
    from .model.likelihoods import StudentTLikelihood, make_likelihood

    return StudentTLikelihood(dof) if likelihood == "studentt" else make_likelihood(likelihood)


_REQUIRED = ("image_id",)


def _check_table(X):
    if not hasattr(X, "columns"):
        raise InputError(
            "X must be an observation table (an rs.DataSet from skmerge.read_unmerged), "
            f"not {type(X).__name__}."
        )
    missing = [c for c in _REQUIRED if c not in X.columns]
    if not ({"Hobs", "Kobs", "Lobs"} <= set(X.columns) or {"H", "K", "L"} <= set(X.columns)):
        missing.append("Hobs/Kobs/Lobs")
    if missing:
        raise InputError(
            f"X lacks column(s) {', '.join(missing)}; build it with skmerge.read_unmerged."
        )
    if len(X) == 0:
        raise InputError("X has no observations.")


def _symmetry(X):
    spacegroup, cell = getattr(X, "spacegroup", None), getattr(X, "cell", None)
    if spacegroup is None or cell is None:
        raise InputError("X has no space group or cell; build it with skmerge.read_unmerged.")
    return spacegroup, cell


def _observed_hkl(X):
    keys = ["Hobs", "Kobs", "Lobs"] if "Hobs" in X.columns else ["H", "K", "L"]
    return X[keys].to_numpy(np.int32)


def _intensities(X, y):
    _check_table(X)
    for column in ("Iobs", "SIGIobs"):
        if column not in X.columns and (column == "SIGIobs" or y is None):
            raise InputError(f"X lacks column {column!r}; build it with skmerge.read_unmerged.")
    intensity = X["Iobs"].to_numpy(np.float64) if y is None else np.asarray(y, dtype=np.float64).ravel()
    sigma = X["SIGIobs"].to_numpy(np.float64)
    if len(intensity) != len(X):
        raise InputError(f"y has {len(intensity)} values for {len(X)} observations.")
    bad = ~np.isfinite(intensity) | ~np.isfinite(sigma) | ~(sigma > 0)
    if bad.any():
        raise InputError(
            f"{int(bad.sum())} observation(s) have a non-finite intensity or σ, or σ ≤ 0; "
            "drop them (skmerge.read_unmerged(..., drop_invalid=True) does)."
        )
    return intensity, sigma


def _intensity_scale(intensity, epsilon):
    scale = float(np.mean(intensity / epsilon))
    if not scale > 0:
        raise InputError("the mean intensity is not positive; these data hold no signal to merge.")
    return scale


def _training_rows(image, fraction, rng):
    images = np.unique(image)
    if len(images) < 2:
        raise ParameterError("early_stopping needs at least two images to hold one out.")
    n_val = min(max(1, int(round(fraction * len(images)))), len(images) - 1)
    held_out = rng.choice(images, n_val, replace=False)
    return ~np.isin(image, held_out)


@dataclass
class _Observations:
    """Rows (reflection contributions) and observations of a table. ``spot`` maps each
    row to its observation in Laue data; otherwise rows and observations coincide."""

    rows: object
    intensity: np.ndarray
    sigma: np.ndarray
    spot: np.ndarray = None

    def of_row(self, rows):
        """The observation of each of the given rows."""
        return rows if self.spot is None else self.spot[rows]

    def single_rows(self):
        """Rows that are their observation's only row."""
        if self.spot is None:
            return np.arange(len(self.intensity))
        return np.flatnonzero(np.bincount(self.spot)[self.spot] == 1)


def _rows(X, mask):
    return X if mask.all() else X.iloc[np.flatnonzero(mask)]


def _tensor_data(refl, image, features, intensity, sigma, spot=None):
    from ._tf import tf

    data = {
        "refl": tf.constant(refl, tf.int32),
        "image": tf.constant(image, tf.int32),
        "features": tf.constant(features, tf.float32),
        "intensity": tf.constant(intensity, tf.float32),
        "sigma": tf.constant(sigma, tf.float32),
    }
    if spot is not None:
        data["spot"] = tf.constant(spot, tf.int32)
    return data


def _chunks(data):
    """Pieces of evaluation data of about _EVAL_CHUNK rows, never splitting a spot."""
    n_rows = int(data["refl"].shape[0])
    if n_rows <= _EVAL_CHUNK:
        yield data
        return
    row_keys = [k for k in data if k not in ("intensity", "sigma")]
    spot = data["spot"].numpy() if "spot" in data else np.arange(n_rows)
    start = 0
    while start < n_rows:
        stop = min(start + _EVAL_CHUNK, n_rows)
        while stop < n_rows and spot[stop] == spot[stop - 1]:
            stop += 1
        first, last = spot[start], spot[stop - 1] + 1
        chunk = {k: data[k][start:stop] for k in row_keys}
        chunk["intensity"], chunk["sigma"] = data["intensity"][first:last], data["sigma"][first:last]
        if "spot" in data:
            chunk["spot"] = chunk["spot"] - first
        yield chunk
        start = stop


def _amplitude_columns(m1, m2, m3, m4, counts, intensity_scale):
    """F, SIGF, I, SIGI, N in the input's units from the raw moments of F."""
    root = math.sqrt(intensity_scale)
    sigf = np.sqrt(np.maximum(m2 - m1**2, 0.0))
    sigi = np.sqrt(np.maximum(m4 - m2**2, 0.0))
    return {"F": m1 * root, "SIGF": sigf * root, "I": m2 * intensity_scale, "SIGI": sigi * intensity_scale, "N": counts}


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
