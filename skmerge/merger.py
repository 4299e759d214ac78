"""VariationalMerger: the variational merging model as a scikit-learn estimator.

The estimator holds the parameters and the fitted state; encoding tables
(:mod:`skmerge.model.data`), assembling and training the model (:mod:`skmerge.model.build`,
:mod:`skmerge.model.fitting`) and the model's pieces (:mod:`skmerge.model`) live apart.
"""

import copy
import os
import warnings
from numbers import Integral, Real

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import HasMethods, Interval, InvalidParameterError, StrOptions
from sklearn.utils.validation import check_is_fitted

from . import __version__
from ._persistence import PersistentMixin
from .ambiguity import (REINDEX_COLUMN, Operators, assign_operators, candidate_operators, parse_operator, reindex,
                        setting_probabilities)
from .errors import InputError, ParameterError
from .features import split_metadata
from .laue import check_spectrum
from .model.build import restore_model
from .model.data import check_compatible, check_table
from .model.decay import rotation_reference_b
from .model.fitted import FitState, Weights, evaluation_chunks, heads_asked_for, layers_asked_for
from .model.fitting import (OPTIONAL_ATTRIBUTES, fit_model, joined_with_previous, values_on_union,
                            with_posterior_corrections)
from .model.streaming import StoreSource, as_source, evaluate_store, store_keys

_SCORE_SAMPLES = 32
# Rounds of moving images to their most probable setting and refitting.
_MAX_SETTING_ROUNDS = 2


def _is_path(X):
    """Whether X names a file or folder (an observation store, or an error), or is a
    selection of a store, rather than being a table."""
    return isinstance(X, (str, os.PathLike, StoreSource))


def _no_reindexing(image_ids):
    """The reindexing attributes of a fit without ambiguity."""
    return {"reindexing_operators_": ["h,k,l"], "image_operators_": np.zeros(len(image_ids), np.int64),
            "image_operator_probabilities_": np.ones((len(image_ids), 1))}


class VariationalMerger(PersistentMixin, TransformerMixin, BaseEstimator):
    """Merge unmerged intensities into structure-factor amplitudes by variational inference.

    The model (see ``docs/model.md``): one amplitude F_h per ASU reflection with a
    Wilson, double-Wilson or reference prior; one scale Σᵢ per observation from a neural
    network on the observation's metadata (plus per-image offsets, or an embedding of
    each image computed from its own observations); and a
    likelihood of each observed intensity around Σᵢ·F_h², with σ refined by an error
    model. The defaults need no choice per kind of data (rotation, stills, Laue): a
    Student-t likelihood whose degrees of freedom are learned (robust to outliers, normal
    where there are none), the error model, and the double-Wilson prior between Friedel
    mates of anomalous data (bench/RESULTS.md has the measurements). The surrogate posterior of each F_h is a normal
    truncated to [0, ∞); the ELBO is maximised with Adam. Intensities are standardised
    internally, so any magnitude trains alike; outputs are returned in the input's units.

    Parameters
    ----------
    prior : {"double-wilson", "wilson"} or prior object, default="double-wilson"
        :class:`~skmerge.WilsonPrior`, :class:`~skmerge.ReferencePrior` or
        :class:`~skmerge.DoubleWilsonPrior` (Friedel mates, or files of a time series,
        drawn together; its correlations are learned: ``prior_r_``). "double-wilson" is
        ``DoubleWilsonPrior()``: Friedel mates tied when ``anomalous``, otherwise
        Wilson's prior (files are tied only with ``DoubleWilsonPrior(parents=...)``).
    likelihood : {"normal", "laplace", "studentt", "mixture", "t-mixture", "two-piece"} or object, default="studentt"
        :class:`~skmerge.NormalLikelihood`, :class:`~skmerge.LaplaceLikelihood`,
        :class:`~skmerge.StudentTLikelihood` (``"studentt"`` is
        ``StudentTLikelihood(learn_dof=True)``: its degrees of freedom are learned,
        ``likelihood_dof_``, from 16), :class:`~skmerge.MixtureLikelihood` (a core and
        a component of gross outliers κ times as wide; ``"mixture"`` has a normal core,
        ``"t-mixture"`` a Student-t core whose ν is learned from 16) or
        :class:`~skmerge.TwoPieceStudentTLikelihood` (``"two-piece"``: a learned ν on
        each side of the prediction).
    error_model : ErrorModel, bool or None, default=True
        Refine the observations' σ as SdFac·√(σ² + (SdAdd·Ipred)²), with SdFac and SdAdd
        learned with the rest of the model from the starting values of the
        :class:`~skmerge.ErrorModel` (``True`` is ``ErrorModel()``: the reported σ); the
        fitted values are ``sdfac_`` and ``sdadd_``. None or False: the reported σ as
        they are. Serial stills need it (their σ leave out the error of the
        partiality), and integration programs' σ are rarely honest.
    metadata : list of str or transformer, default=None
        Columns of X that drive the scale model, or a ready (unfitted) transformer such
        as a ``ColumnTransformer`` that maps X to numeric features. None uses ``["dHKL"]``.
        The default transformer turns dHKL into 1/d² and standardises every column;
        ``"image_id"`` in the list gives every image a scale of its own (as
        ``image_scales``) instead of being a number.
    positional_encoding : int, default=0
        Frequencies of :class:`~skmerge.features.PositionalEncoding` applied to every
        metadata column by the default transformer (0: none).
    mlp_layers : int or "auto", default="auto"
        Depth of the scale network. "auto" gives serial stills with image layers six
        layers, and everything else (rotation series, Laue data, stills without image
        layers) twenty (careless's default): a still's own image layers
        (``image_layers``) carry what is each image's own, and a deep shared network
        then fits noise (thermolysin's CCanom 0.10–0.13 with twenty layers, 0.20–0.26
        with six, CC1/2 0.94–0.96 → 0.96, and a step 0.62× as long; simulated stills
        lose a little), whereas hypf's rotation data lose a little anomalous signal
        with fewer (bench/RESULTS.md). The images are stills as ``image_layers`` says;
        the choice is ``mlp_layers_``.
    mlp_width : int, default=10
        Width of the scale network (careless's default).
    image_scales : bool, default=True
        Give every image a scale of its own, of the kind ``image_model`` says.
    image_model : {"offsets", "encoder"}, default="offsets"
        How images get their own scale. "offsets": a learned log-scale offset per image
        of the fit (an image the fit never saw is predicted as each of the fit's images
        in turn: :meth:`predict` and :meth:`score` give that mixture). "encoder": an
        embedding of each image, appended to the scale network's input, that a set
        encoder computes from the image's own observations (their metadata features,
        asinh(I/⟨I⟩) and log(σ/⟨I⟩), ⟨I⟩ the mean intensity at their resolution), so
        that the model's size does not depend on the number of images and images the
        fit never saw (``predict``, ``score``, a validation set) get scales of their own.
    image_layers : int or "auto", default="auto"
        Residual layers of ``mlp_width`` units after the shared scale network whose
        weights belong to each image (careless's ``--image-layers``): every image can
        then bend the metadata's effect on its scale its own way (e.g. its own
        absorption or detector response), at the cost of ``mlp_width² + mlp_width``
        weights per image and layer. An image the fit never saw is predicted with the
        weights of each of the fit's images in turn (at most 64 of them), a mixture.
        "auto" gives three to serial stills (each still's partiality depends on its own
        mosaic spread and bandwidth, which no column reports: thermolysin's CC1/2
        0.921 → 0.939 and CCanom 0.043 → 0.101 against image heads, the previous
        default for stills), unless ``image_heads=True`` asks for heads instead, and
        none to rotation series or Laue data (on simulated rotation data they make SIGF
        less honest; PYP's Laue images do not gain; bench/RESULTS.md). The images are
        stills when the beam directions that consecutive images' spots give in the
        crystal's frame differ by more than 20° in the median
        (:func:`skmerge.geometry.recorded_as_stills`); the choice is ``image_layers_``.
        Needs ``image_model="offsets"``.
    image_heads : "auto" or bool, default="auto"
        Give each image of the fit its own weights on three learned combinations of the
        scale network's last hidden layer, added to its log-scale: lighter than image
        layers, and Bayesian — the weights have a Gaussian posterior and a prior whose
        width per combination is fitted to how much the images' heads differ, so that
        images bend their scales only as far as the data show they must, and the heads'
        uncertainty widens the scales'. Images the fit never saw draw a head from that
        prior. "auto" gives heads to serial stills that ``image_layers`` gives no layers
        (``image_layers=0``; thermolysin's CC1/2 0.855 → 0.921), and not to rotation
        series or Laue data (Laue data lose; on rotation data a bad image's observations
        pass for sound ones under a wide scale, and tied Friedel mates' SIGDANO is
        overstated; bench/RESULTS.md); the choice is ``image_heads_``. True needs
        ``image_model="offsets"``.
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
    spectrum : array-like of shape (n, 2), optional
        The incident spectrum of Laue data, rows of wavelength (Å) and relative flux
        (careless's ``--spectral-file``, read by :func:`skmerge.laue.read_spectrum`):
        every harmonic's scale is the flux at its wavelength times the scale model's,
        which then learns only what the spectrum leaves.
    lorentz_correction : bool, default=False
        Multiply every Laue harmonic's scale by its Lorentz factor λ⁴/sin²θ (careless's
        ``--lorentz-correction``).
    posterior_init : {"data", "prior"}, float, DataFrame or Path, default="data"
        Start the posterior from a quick scaled merge (French–Wilson amplitudes), from
        the prior, from Wilson's mean amplitude with this number times Wilson's standard
        deviation as width (careless's start), or from a merged table: amplitudes and
        their σ (``F``/``SIGF``, the first amplitude column and its σ partner, or
        intensities; ``F(+)``/``F(-)`` for anomalous fits), e.g. another merger's
        ``transform``, or the ``pathlib.Path`` of a merged MTZ of skmerge or careless
        (which a merger saved in the safe format can keep). Each reflection the table
        holds starts at a posterior of that mean and standard deviation, brought to the
        data's units by one factor; the others start from the data.
    warm_start : bool or "scales", default=False
        Start from the previous fit: True reuses the scale model and the posterior of
        reflections seen before; "scales" reuses only the scale model (the posterior is
        started as ``posterior_init`` says under those scales; with the default "data" on
        the very observations of the previous fit — same images, same reflections, each
        as often — the previous posterior, the answer to the same question). The scale
        network's shape and metadata must be the previous fit's. A warm start on new
        images only forgets the old ones; :meth:`partial_fit` adds them to the merge.
    freeze : {None, "scales", "posterior"}, default=None
        Keep that part of the model fixed during the fit: "scales" (with a warm start)
        the scale model and the noise model; "posterior" the amplitudes of a warm start
        or of a ``posterior_init`` table.
    kl_weight : float, default=1.0
        Weight of the KL divergence of the amplitudes relative to the likelihood in the
        loss (1 is the evidence lower bound).
    marginals : {"variational", "grid"}, default="variational"
        What the merged table reports. "variational": the fitted truncated normals'
        moments (under the double-Wilson prior, with their linear-response widths).
        "grid": after training, every reflection's posterior given the fitted scales,
        error model and likelihood, integrated on a grid of F (a family tied by the
        double-Wilson prior by messages between grids; :mod:`skmerge.model.marginals`)
        — its mean between the modes where a few observations disagree several-fold,
        and a SIGF that spans them, where the fit's truncated normal keeps one mode
        with a width that excludes the others. Measured (bench/RESULTS.md), "grid"
        calibrates SIGF on simulated data with outliers (z SD 1.25 → 1.10) and raises
        CC(F, truth), CC1/2 and CCanom a little on rotation and stills data, but on Laue
        data with two observations per reflection it lowers CC1/2 within shells and
        CCdiff (its exact posterior gives weight to a low mode the robust fit avoids),
        so it is not the default. Not with ``freeze="posterior"`` (amplitudes held at
        given values).
    beta_1, beta_2 : float, default=0.9, 0.99
        Adam's decay rates of the gradient's first and second moments.
    clipnorm, clipvalue, global_clipnorm : float, default=None
        Clip each variable's gradient to this norm, every gradient element to this
        absolute value, all gradients together to this norm (as Keras's optimisers do).
    epsilon : float, default=1e-4
        Floor added to the scale of every amplitude's posterior, in standardised units
        (⟨F²/ε⟩ ≈ 1), for numerical stability.
    scale_bijector : {"softplus", "exp"}, default="softplus"
        The function that keeps the spread of each observation's log-scale positive.
    standardize_metadata : bool, default=True
        The default metadata transformer turns every column into z-scores; False passes
        the columns (and 1/d²) as they are.
    positional_encoding_keys : list of str, default=None
        The metadata columns that ``positional_encoding`` expands (None: every column).
    validation_frequency : int, default=10
        Steps between evaluations of the held-out loss when ``fit`` is given
        ``X_held_out``.
    reindexing : {"auto", "none"} or list of str, default="auto"
        Resolve the indexing ambiguity of images whose lattice has more symmetry than
        the space group (serial stills are indexed in one of its settings at random):
        "auto" considers the twin laws of the lattice (:func:`gemmi.find_twin_laws`) and
        does nothing when there are none; a list gives the operators (e.g.
        ``["-h,-k,l"]``); "none" merges the images as indexed. Each image's operator is
        chosen before the fit by the agreement of the images' intensities
        (:func:`skmerge.ambiguity.assign_operators`), then checked against the fitted
        model: images more probable in another setting are moved and the model refitted
        from where it was (``image_operator_probabilities_``). When every image is found
        in one setting already, or the intensities are (nearly) symmetric under the
        operators so that the settings cannot be told apart (a ``DataWarning`` says so),
        the fit proceeds as with "none".
    reindexing_reference : rs.DataSet or path, optional
        Merged data (F or I) of the same crystal form whose setting the merge takes;
        otherwise the setting of most images.
    jit_compile : bool, default=False
        Compile the training loop with XLA. On CPUs TensorFlow's graph execution is
        faster and saves seconds of compilation per fit (bench/RESULTS.md); XLA may pay
        off on accelerators.
    random_state : int, RandomState instance or None, default=None
        Makes the fit repeatable.
    verbose : int, default=0
        Show a progress bar with the loss when positive.

    Attributes
    ----------
    reflections_ : Reflections
        The ASU reflections with parameters (:class:`skmerge.model.data.Reflections`).
    reflection_counts_ : ndarray of shape (n_reflections,)
        Observations (Laue: harmonic rows) of each reflection used in the fit.
    image_ids_ : ndarray
        image_id of the images of the fit (those with a scale offset of their own).
    intensity_scale_ : float
        The unit of the standardised intensities (mean I/ε of the training data).
    metadata_transformer_ : transformer
        The fitted metadata transformer.
    n_metadata_features_ : int
        Number of features it makes (the scale network's inputs).
    wilson_curve_ : (ndarray, ndarray)
        Mean 1/d² and mean I/ε of the resolution shells of the quick merge: the Σ of the
        Wilson prior, in standardised units.
    mlp_layers_ : int
        The scale network's depth (``mlp_layers``, "auto" decided from the data).
    image_layers_ : int
        The number of layers of their own the images have (``image_layers``, "auto"
        decided from the data).
    image_heads_ : bool
        Whether the images have heads (``image_heads``, "auto" decided from the data).
    reference_b_ : float
        For a rotation series, the B (Å²) by which the scales of its least-decayed
        images fall off against the model's amplitudes (:mod:`skmerge.model.decay`);
        :meth:`transform` reports the amplitudes as those images record them, F and
        SIGF times exp(−B/(4d²)), I and SIGI times exp(−B/(2d²)), and
        :meth:`predict`'s scales are divided by the latter. 0 for stills and Laue data.
    wavelength_bands_, dmin_ : (float, float) or dict, float
        Laue only: the band (per file_id when taken from the data) and the resolution
        limit of the harmonic expansion.
    posterior_weights_, scale_weights_ : dict, list
        The weights of the posterior and of the scale network (the dense layers, then
        the image encoder's, then the per-image offsets: empty without them).
    sdfac_, sdadd_ : float
        The fitted error model (with ``error_model`` only).
    marginal_moments_ : ndarray of shape (4, n_reflections)
        With ``marginals="grid"``: E[F], E[F²], E[F⁴] of every reflection's marginal
        posterior and its covariance with its double-Wilson parent (0 for roots), in
        standardised units.
    sandwich_ratio_ : float
        J/H of the fitted likelihood on the training data: the variance of its score
        over its curvature, pooled over the reflections with two or more observations
        (:mod:`skmerge.model.sandwich`). Where it is above 1 the posterior variances of
        the reflections the fit saw are multiplied by it in :meth:`transform`'s SIGF and
        SIGI (Friedel halves sharing the extra variance, so that SIGDANO stands).
    image_weight_ratio_ : ndarray of shape (n_reflections,)
        When the scale model has weights of each image's own (offsets, image layers):
        the factor of each reflection's posterior variance for their uncertainty, the
        information about its amplitude that its images' weights take
        (:mod:`skmerge.model.scale_uncertainty`). :meth:`transform` multiplies the
        variances behind SIGF and SIGI by it (and by the sandwich's J/H); Friedel halves
        share the extra variance (the prior ties them, so an image's scale error moves
        both), so that SIGDANO stands.
    image_scale_variance_ : ndarray of shape (n_images,)
        With those weights: per image, the variance of its observations' log Σ that the
        uncertainty of its weights gives, averaged over its observations
        (:mod:`skmerge.model.scale_uncertainty`). :meth:`predict`'s standard deviations
        of I and Σ and :meth:`score`'s draws of Σ carry it; an image the fit never saw
        is the mixture of the fit's images, each with its own.
    prior_r_ : ndarray of shape (n_files, n_shells)
        With a :class:`~skmerge.DoubleWilsonPrior`: the correlation of each file's
        amplitudes with their parents' (Friedel mates for the roots of anomalous data),
        per resolution shell; NaN where no reflection has a parent.
    likelihood_dof_ : float
        With ``StudentTLikelihood(learn_dof=True)`` or a learned Student-t core of a
        :class:`~skmerge.MixtureLikelihood`: the learned degrees of freedom.
    likelihood_dof_below_, likelihood_dof_above_ : float
        With a learned :class:`~skmerge.TwoPieceStudentTLikelihood`: ν below and above
        the prediction.
    likelihood_outlier_fraction_, likelihood_outlier_scale_ : float
        With a learned :class:`~skmerge.MixtureLikelihood`: the fraction π of gross
        outliers and how many times κ wider their law is than the core.
    reindexing_operators_ : list of str
        The settings considered, as h,k,l triplets (the identity first; only it when
        there is no ambiguity).
    image_operators_ : ndarray of int, shape (n_images,)
        The operator (index into ``reindexing_operators_``) that brought each image of
        ``image_ids_`` into the merge's setting.
    image_operator_probabilities_ : ndarray of shape (n_images, n_operators)
        The posterior probability of every operator for every image under the fitted
        model (equal prior probabilities); :meth:`image_reindexing` tabulates them.
    loss_curve_ : ndarray of shape (`n_iter_`, 3)
        Loss (−ELBO per observation), its negative log-likelihood and KL parts, per step.
    n_iter_ : int
        Steps taken by the last fit.
    converged_ : bool
        Whether the last fit stopped on its convergence criterion (a
        ``ConvergenceWarning`` says when ``max_iter`` stopped it instead).
    validation_scores_ : ndarray
        With ``early_stopping``: the held-out images' mean log predictive density per
        observation (in the input's units, as :meth:`score`) after every 50 steps of the
        first fit.
    best_validation_score_ : float
        With ``early_stopping``: the best of them, which chose the number of steps.
    held_out_loss_curve_ : ndarray of shape (n_evaluations, 2)
        With ``X_held_out`` in ``fit``: the step and the held-out observations' expected
        negative log-likelihood per observation under the posterior, every
        ``validation_frequency`` steps (the ``nll`` of ``loss_curve_``, on data the fit
        does not see).
    seed_ : int
        The seed the fit drew from ``random_state`` (Monte Carlo draws of ``score``).
    skmerge_version_ : str
        The skmerge version that made the fit (checked when a saved merger is loaded).
    n_features_in_ : int
        Number of columns of the X of the fit.
    feature_names_in_ : ndarray of str
        The columns of the X of the fit; the X of ``transform``, ``predict`` and
        ``score`` must have them too.

    See Also
    --------
    skmerge.read_unmerged : builds the observation table X.
    skmerge.merge_inverse_variance : the unscaled baseline.
    skmerge.run_merge : the command line's whole workflow from Python.

    Examples
    --------
    >>> from skmerge import VariationalMerger
    >>> from skmerge.datasets import make_unmerged
    >>> X, truth = make_unmerged(n_images=20, random_state=0)
    >>> merger = VariationalMerger(mlp_layers=2, max_iter=100, random_state=0).fit(X)
    >>> merged = merger.transform(X)
    >>> list(merged.columns)
    ['F', 'SIGF', 'I', 'SIGI', 'N']
    >>> merger.posterior().batch_shape == (len(merger.reflections_),)
    True
    """

    _parameter_constraints = {
        "prior": [StrOptions({"wilson", "double-wilson"}), HasMethods(["build"])],
        "likelihood": [StrOptions({"normal", "laplace", "studentt", "mixture", "t-mixture", "two-piece"}), HasMethods(["log_prob"])],
        "error_model": [None, "boolean", HasMethods(["build"])],
        "metadata": [None, list, tuple, HasMethods(["fit", "transform"])],
        "positional_encoding": [Interval(Integral, 0, None, closed="left")],
        "mlp_layers": [StrOptions({"auto"}), Interval(Integral, 1, None, closed="left")],
        "mlp_width": [Interval(Integral, 1, None, closed="left")],
        "image_scales": ["boolean"],
        "image_model": [StrOptions({"offsets", "encoder"})],
        "image_layers": [StrOptions({"auto"}), Interval(Integral, 0, None, closed="left")],
        "image_heads": [StrOptions({"auto"}), "boolean"],
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
        "spectrum": [None, "array-like"],
        "lorentz_correction": ["boolean"],
        "posterior_init": [StrOptions({"data", "prior"}), pd.DataFrame, Path, Interval(Real, 0, None, closed="neither")],
        "warm_start": ["boolean", StrOptions({"scales"})],
        "freeze": [None, StrOptions({"scales", "posterior"})],
        "kl_weight": [Interval(Real, 0, None, closed="left")],
        "marginals": [StrOptions({"grid", "variational"})],
        "beta_1": [Interval(Real, 0, 1, closed="left")],
        "beta_2": [Interval(Real, 0, 1, closed="left")],
        "clipnorm": [None, Interval(Real, 0, None, closed="neither")],
        "clipvalue": [None, Interval(Real, 0, None, closed="neither")],
        "global_clipnorm": [None, Interval(Real, 0, None, closed="neither")],
        "epsilon": [Interval(Real, 0, None, closed="neither")],
        "scale_bijector": [StrOptions({"softplus", "exp"})],
        "standardize_metadata": ["boolean"],
        "positional_encoding_keys": [None, list, tuple],
        "validation_frequency": [Interval(Integral, 1, None, closed="left")],
        "reindexing": [StrOptions({"auto", "none"}), list, tuple],
        "reindexing_reference": "no_validation",
        "jit_compile": ["boolean"],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
    }

    def __init__(
        self, *, prior="double-wilson", likelihood="studentt", error_model=True, metadata=None, positional_encoding=0,
        mlp_layers="auto", mlp_width=10, image_scales=True, image_model="offsets", image_layers="auto", image_heads="auto",
        mc_samples=1, batch_size=None, max_iter=2000,
        learning_rate=0.003, tol=1e-3, n_iter_no_change=200, early_stopping=False, validation_fraction=0.1,
        anomalous=False, separate_files=False, laue=False, wavelength_key="Wavelength", wavelength_range=None,
        spectrum=None, lorentz_correction=False, posterior_init="data", warm_start=False, freeze=None, kl_weight=1.0,
        marginals="variational", beta_1=0.9, beta_2=0.99, clipnorm=None, clipvalue=None, global_clipnorm=None,
        epsilon=1e-4, scale_bijector="softplus", standardize_metadata=True,
        positional_encoding_keys=None, validation_frequency=10, reindexing="auto", reindexing_reference=None,
        jit_compile=False, random_state=None, verbose=0,
    ):
        self.prior = prior
        self.likelihood = likelihood
        self.error_model = error_model
        self.metadata = metadata
        self.positional_encoding = positional_encoding
        self.mlp_layers = mlp_layers
        self.mlp_width = mlp_width
        self.image_scales = image_scales
        self.image_model = image_model
        self.image_layers = image_layers
        self.image_heads = image_heads
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
        self.spectrum = spectrum
        self.lorentz_correction = lorentz_correction
        self.posterior_init = posterior_init
        self.warm_start = warm_start
        self.freeze = freeze
        self.kl_weight = kl_weight
        self.marginals = marginals
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.clipnorm = clipnorm
        self.clipvalue = clipvalue
        self.global_clipnorm = global_clipnorm
        self.epsilon = epsilon
        self.scale_bijector = scale_bijector
        self.standardize_metadata = standardize_metadata
        self.positional_encoding_keys = positional_encoding_keys
        self.validation_frequency = validation_frequency
        self.reindexing = reindexing
        self.reindexing_reference = reindexing_reference
        self.jit_compile = jit_compile
        self.random_state = random_state
        self.verbose = verbose

    def fit(self, X, y=None, X_held_out=None):
        """Fit the model to an observation table.

        Parameters
        ----------
        X : rs.DataSet or path
            Observation table from :func:`skmerge.read_unmerged` (or any DataFrame with
            its columns and ``spacegroup``/``cell``), or an observation store
            (:func:`skmerge.store.write_store`) or a selection of one
            (:class:`~skmerge.model.streaming.StoreSource`), which is fitted in
            minibatches of ``batch_size`` images read from it in bounded memory
            (:mod:`skmerge.model.streaming`; without reindexing, early stopping, Laue
            data and the image encoder).
        y : array-like of shape (n_observations,), optional
            Intensities to use instead of ``X["Iobs"]``.
        X_held_out : rs.DataSet, optional
            Observations kept out of the fit whose loss is recorded every
            ``validation_frequency`` steps (``held_out_loss_curve_``) without steering
            the fit.

        Returns
        -------
        self
            Fitted. A fit that raises leaves the estimator as it was.
        """
        self._check_params()
        if _is_path(X):
            return self._fit_store(X, y, X_held_out)
        previous = self._previous_fit(X)
        if X_held_out is not None:
            check_table(X_held_out)
        self._set_fitted(X, *self._fit_table(X, y, previous, X_held_out))
        return self

    def partial_fit(self, X, y=None):
        """Update the merge with a new chunk of images, without the images fitted before.

        For data that arrive during an experiment. The first call on an unfitted merger
        is :meth:`fit`. Later calls apply Bayes' rule one chunk at a time (assumed
        density filtering): every reflection fitted before gets its fitted posterior
        (the truncated normal of :meth:`posterior`) as its prior instead of the
        merger's ``prior``, so the earlier images' evidence enters through it and they
        need not be kept; reflections new in the chunk get the merger's prior. The scale
        model, the error model and the likelihood's learned parameters continue from
        the previous fit (as with ``warm_start=True``, whatever ``warm_start`` says);
        new images get offsets of their own. Under a
        :class:`~skmerge.DoubleWilsonPrior` a reflection fitted before keeps its
        posterior as its prior, which unties it from its parent; a new reflection stays
        tied to its parent, old or new (nothing is counted twice; what an old child
        says about a new parent is left out).

        Afterwards the fitted state covers every reflection and image fitted so far:
        reflections absent from the chunk keep their posterior untouched, the
        observation counts (``reflection_counts_``, N) add up, and
        :meth:`transform`, :meth:`predict` and :meth:`score` work on all of them (as
        after :meth:`fit`, images never fitted are predicted as a mixture of the fitted
        ones). ``loss_curve_``,
        ``n_iter_`` and ``converged_`` describe the last update.

        Parameters
        ----------
        X : rs.DataSet
            Observations of the new images (a table, as for :meth:`fit`), in the space
            group of the fit and an isomorphous cell. Images fitted before may appear
            again; their observations then count twice.
        y : array-like of shape (n_observations,), optional
            Intensities to use instead of ``X["Iobs"]``.

        Returns
        -------
        self

        Raises
        ------
        ParameterError
            If the parameters cannot continue the previous fit (another scale network,
            metadata or image model; ``anomalous``, ``separate_files`` or ``laue``
            changed), or X is an observation store.
        InputError
            If X is in another space group or its cell is not isomorphous.

        Examples
        --------
        >>> from skmerge import VariationalMerger
        >>> from skmerge.datasets import make_unmerged
        >>> X, truth = make_unmerged(n_images=12, random_state=0)
        >>> merger = VariationalMerger(mlp_layers=2, max_iter=50, random_state=0)
        >>> for first in (0, 6):  # two chunks of six images
        ...     merger = merger.partial_fit(X[(X["image_id"] >= first) & (X["image_id"] < first + 6)])
        >>> len(merger.image_ids_)
        12
        >>> int(merger.reflection_counts_.sum()) == len(X)
        True
        """
        if not hasattr(self, "posterior_weights_"):
            return self.fit(X, y)
        self._check_params()
        if _is_path(X):
            raise ParameterError("partial_fit takes a table of the new images; read the chunk into memory "
                                 "(an observation store is fitted whole, with fit).")
        previous = self._previous_fit(X, continuing=True)
        result, seed, settings = self._fit_table(X, y, previous, previous_as_prior=True)
        joined = joined_with_previous(self, *previous, result)
        images = joined.state.image_ids
        old_images, new_images = self.image_ids_, result.state.image_ids
        for name in ("image_operators_", "image_operator_probabilities_"):
            settings[name] = values_on_union(images, old_images, getattr(self, name), new_images, settings[name])
        self._set_fitted(X, joined, seed, settings)
        return self

    def _fit_table(self, X, y, previous, X_held_out=None, previous_as_prior=False):
        """Train on the table X (from ``previous``, a warm start's (FitState, Weights),
        or from scratch), resolving the indexing ambiguity; returns the training result,
        the seed drawn from ``random_state`` and the reindexing attributes of its
        images."""
        rng = check_random_state(self.random_state)
        seed = int(rng.randint(2**31 - 1))
        if previous is not None:
            operators, X_fit = self._operators(), self.reindex(X)
        else:
            operators = candidate_operators(self.reindexing, X.spacegroup, X.cell)
            X_fit = X
            if operators is not None:
                image_ids, image_operator = assign_operators(X, operators, self.reindexing_reference, seed)
                if image_operator.any():
                    X_fit = reindex(X, operators, image_operator, image_ids, self.anomalous)
                else:  # every image in one setting already: nothing to resolve, nothing to pay
                    operators = None
        result = fit_model(self, X_fit, y, rng, seed, previous=previous, X_held_out=X_held_out,
                           previous_as_prior=previous_as_prior)
        settings = _no_reindexing(result.state.image_ids)
        if operators is not None:
            result, X_fit, settings = self._refine_settings(X, y, result, X_fit, operators, rng, seed,
                                                            0 if previous is not None else _MAX_SETTING_ROUNDS)
        # Once, for the final model (not for each round of settings).
        model, state = result.model, result.state
        with_posterior_corrections(self, model,
                                   lambda: evaluation_chunks(model, state.evaluation_data(self, X_fit, y)[0]),
                                   len(state.reflections))
        if previous is None and self.freeze is None:
            state.reference_b = rotation_reference_b(self, model, state, lambda: iter([X_fit]))
        return result, seed, settings

    def _fit_store(self, store, y, X_held_out):
        """Fit to an observation store in minibatches read from it (see
        :mod:`skmerge.model.streaming`)."""
        import gemmi

        from .model.streaming import check_streamable, fit_store

        check_streamable(self, y, X_held_out)
        source = as_source(store)
        manifest = source.manifest
        if candidate_operators(self.reindexing, gemmi.SpaceGroup(manifest["spacegroup"]),
                               gemmi.UnitCell(*manifest["cell"])) is not None:
            raise ParameterError(f"{store}: its lattice allows other indexing settings, which a fit on an observation "
                                 "store does not resolve; set reindexing='none' (--disable-index-disambiguation) "
                                 "for data indexed in one setting, or read the store into memory.")
        previous = self._previous_fit(source.head())
        rng = check_random_state(self.random_state)
        seed = int(rng.randint(2**31 - 1))
        result, head = fit_store(self, source, rng, seed, previous)
        self._set_fitted(head, result, seed, _no_reindexing(result.state.image_ids))
        return self

    def _previous_fit(self, X, continuing=False):
        """The (FitState, Weights) of the fit a warm start (or, ``continuing``, an
        online update) continues, or None, after checking that X (a table) can continue
        it and that ``freeze`` has a fit to keep."""
        warm = (continuing or bool(self.warm_start)) and hasattr(self, "reflections_")
        table_start = isinstance(self.posterior_init, (pd.DataFrame, Path))
        if self.freeze is not None and not warm and not (self.freeze == "posterior" and table_start):
            raise ParameterError(f"freeze={self.freeze!r} needs warm_start=True or 'scales' and a previous fit"
                                 + (" (or a posterior_init table)." if self.freeze == "posterior" else "."))
        if warm:
            self._check_warm_start()
        if warm and continuing:
            self._check_same_reflections()
        check_table(X)
        if not warm:
            return None
        check_compatible(X, self.reflections_)
        return FitState.from_attributes(self), Weights.from_attributes(self)

    def _refine_settings(self, X, y, result, X_fit, operators, rng, seed, rounds):
        """Check every image's setting against the trained model: move the images more
        probable in another setting there and refit the model from where it stands
        (amplitudes, scales and noise model kept), up to ``rounds`` times. Returns the
        final training result, table and reindexing attributes."""
        for round_ in range(rounds + 1):
            fitted = self._with_fit(result)
            image_ids, relative = setting_probabilities(FitState.from_attributes(fitted), fitted, result.model,
                                                        X_fit, operators, seed)
            moved = np.argmax(relative, axis=1)
            current = X_fit[REINDEX_COLUMN].to_numpy(np.int64)[
                np.unique(X_fit["image_id"].to_numpy(np.int64), return_index=True)[1]]
            if not moved.any() or round_ == rounds:
                break
            X_fit = reindex(X.drop(columns=[REINDEX_COLUMN], errors="ignore"), operators,
                            operators.product[current, moved], image_ids, self.anomalous)
            fitted.warm_start = True
            result = fit_model(fitted, X_fit, y, rng, seed,
                               previous=(FitState.from_attributes(fitted), Weights.from_attributes(fitted)))
        # Relative to each image's setting → per operator.
        probabilities = np.zeros_like(relative)
        for k in range(len(operators)):
            probabilities[np.arange(len(current)), operators.product[current, k]] = relative[:, k]
        order = np.searchsorted(image_ids, result.state.image_ids)
        return result, X_fit, {"reindexing_operators_": list(operators.names), "image_operators_": current[order],
                               "image_operator_probabilities_": probabilities[order]}

    def _with_fit(self, result):
        """A shallow copy of the estimator holding a training result's fitted attributes
        (to evaluate a model before it is set on the estimator)."""
        fitted = copy.copy(self)
        for name in OPTIONAL_ATTRIBUTES:
            fitted.__dict__.pop(name, None)
        fitted.__dict__.update(result.attributes())
        return fitted

    def _set_fitted(self, X, result, seed, settings):
        """Every fitted attribute at once, after training has succeeded."""
        for name in OPTIONAL_ATTRIBUTES:
            self.__dict__.pop(name, None)
        self.__dict__.update(result.attributes())
        self.__dict__.update(settings)
        self.feature_names_in_ = np.asarray([str(c) for c in X.columns if c != REINDEX_COLUMN], dtype=object)
        self.n_features_in_ = len(self.feature_names_in_)
        self.seed_, self.skmerge_version_ = seed, __version__
        self._model = result.model
        if not self.converged_:
            warnings.warn(f"training stopped at max_iter={self.max_iter} steps before the loss converged; "
                          "raise max_iter (or learning_rate).", ConvergenceWarning, stacklevel=3)

    def _operators(self):
        """The fit's reindexing operators, or None when it had no ambiguity."""
        if len(self.reindexing_operators_) == 1:
            return None
        return Operators([parse_operator(name) for name in self.reindexing_operators_], self.reflections_.spacegroup)

    def reindex(self, X):
        """X with every image in the setting of the merge.

        Images of the fit take the operator the fit chose; other images the one under
        which the fitted model finds them most probable. The table gets a
        ``reindex_op`` column (the operator of each row, an index into
        ``reindexing_operators_``) and is returned unchanged when it has one already or
        when the fit had no ambiguity to resolve.

        Parameters
        ----------
        X : rs.DataSet
            Observation table.

        Returns
        -------
        rs.DataSet
        """
        check_is_fitted(self, "posterior_weights_")
        operators = self._operators()
        if operators is None or REINDEX_COLUMN in X.columns:
            return X
        check_table(X)
        image_ids = np.unique(X["image_id"].to_numpy(np.int64))
        row = np.minimum(np.searchsorted(self.image_ids_, image_ids), len(self.image_ids_) - 1)
        known = self.image_ids_[row] == image_ids
        image_operator = np.where(known, self.image_operators_[row], 0)
        if not known.all():
            new = np.isin(X["image_id"].to_numpy(np.int64), image_ids[~known])
            X_new = X.iloc[np.flatnonzero(new)]
            _, probabilities = setting_probabilities(FitState.from_attributes(self), self, self._get_model(), X_new,
                                                     operators, self.seed_)
            image_operator[~known] = np.argmax(probabilities, axis=1)
        return reindex(X, operators, image_operator, image_ids, self.anomalous)

    def image_reindexing(self):
        """Each image's operator and its posterior probability, as a table.

        Returns
        -------
        pandas.DataFrame
            Indexed by image_id, with columns ``operator`` (h,k,l triplet) and
            ``probability``, and one column of probability per operator.
        """
        import pandas as pd

        check_is_fitted(self, "image_operators_")
        names = np.asarray(self.reindexing_operators_, dtype=object)
        rows = np.arange(len(self.image_operators_))
        table = pd.DataFrame({"operator": names[self.image_operators_],
                              "probability": self.image_operator_probabilities_[rows, self.image_operators_]},
                             index=pd.Index(self.image_ids_, name="image_id"))
        for k, name in enumerate(names):
            table[f"p({name})"] = self.image_operator_probabilities_[:, k]
        return table

    # --------------------------------------------------------------- evaluation
    def posterior(self):
        """The fitted posterior of the amplitudes of ``reflections_`` in standardised
        units (F² in units of ``intensity_scale_``) and in the model's frame (before
        :meth:`transform`'s factor for ``reference_b_``), a ``tfp.distributions``
        distribution of batch shape (n_reflections,)."""
        check_is_fitted(self, "posterior_weights_")
        return self._get_model().posterior.distribution()

    def transform(self, X):
        """Merged amplitudes and intensities of the reflections observed in X.

        Returns
        -------
        rs.DataSet
            Indexed by the ASU H, K, L, with F, SIGF (posterior mean and standard
            deviation of F, widened by ``image_weight_ratio_`` and by ``sandwich_ratio_``
            where it is above 1),
            I = E[F²], SIGI = √(E[F⁴] − I²) (widened alike) and N
            (observations used in the fit). With ``anomalous=True`` also F(±), SIGF(±),
            I(±), SIGI(±), N(±), DANO = F(+) − F(−) and SIGDANO. With
            ``separate_files=True`` a ``file_id`` column tells the files apart (the
            index repeats across files). Reflections the fit never saw carry their
            prior's moments and N = 0.
        """
        if _is_path(X):
            state, source = self._check_store(X)
            return state.table(self, self._get_model(), store_keys(self, state, source))
        state = self._check_input(X)
        return state.merged(self, self._get_model(), self.reindex(X))

    def predict(self, X, return_std=False, return_scale=False):
        """Predicted intensity E[Σ]·E[F²] of each observation of X, in X's row order and
        the input's units (for Laue data, of each spot: the sum over its harmonics).
        With ``image_model="encoder"`` the scales come from the images' observed
        intensities, which X must then hold.

        With ``return_std`` also its standard deviation (a Laue spot adds the variances
        of its harmonics); with ``return_scale`` also each observation's scale Σ and its
        standard deviation (a Laue spot's are its first harmonic's). Returns ``mean``,
        or the tuple ``(mean[, std][, scale, scale_std])``.

        With images' own weights, an observation of an image the fit never saw gets
        the mean and standard deviation of the mixture of its predictions as each of
        the fit's images (at most 64): a skewed law when the images' scales differ
        widely, for which mean ± 2 SD is not a 95 % interval (:meth:`score_samples`
        gives its density).
        """
        if _is_path(X):
            state, source = self._check_store(X)
            mean, std, scale, scale_std = evaluate_store(
                source, lambda chunk: state.predict(self, self._get_model(), self.reindex(chunk)))
        else:
            state = self._check_input(X)
            mean, std, scale, scale_std = state.predict(self, self._get_model(), self.reindex(X))
        result = (mean,) + ((std,) if return_std else ()) + ((scale, scale_std) if return_scale else ())
        return result if len(result) > 1 else result[0]

    def score_samples(self, X, y=None):
        """Log predictive density log p(Iᵢ | training data) of each observation of X, in
        the units of the input intensities, estimated with 32 Monte Carlo samples."""
        if _is_path(X):
            if y is not None:
                raise InputError("y cannot replace the intensities of an observation store.")
            state, source = self._check_store(X)
            return evaluate_store(source, lambda chunk: (state.log_predictive(
                self, self._get_model(), self.reindex(chunk), None, _SCORE_SAMPLES, self.seed_),))[0]
        state = self._check_input(X)
        return state.log_predictive(self, self._get_model(), self.reindex(X), y, _SCORE_SAMPLES, self.seed_)

    def score(self, X, y=None):
        """Mean log predictive density per observation of X (higher is better).

        Each observation's likelihood is averaged over the posterior of its reflection
        (the prior for reflections the fit never saw) and over its scale, with the
        uncertainty of its image's own weights (an image the fit never saw is the
        mixture, with equal weights, of the predictions as each of the fit's images, at
        most 64 of them; with the image encoder, every image
        gets the scale of its own observations); the log of that average is then
        averaged over observations. Densities are per unit of the input intensities, so
        scores of different models on the same data compare directly.
        """
        return float(np.mean(self.score_samples(X, y)))

    def get_feature_names_out(self, input_features=None):
        """Names of the columns :meth:`transform` returns (``file_id`` last with
        ``separate_files``)."""
        names = ["F", "SIGF", "I", "SIGI", "N"]
        if self.anomalous:
            names += ["F(+)", "SIGF(+)", "F(-)", "SIGF(-)", "I(+)", "SIGI(+)", "I(-)", "SIGI(-)", "N(+)", "N(-)",
                      "DANO", "SIGDANO"]
        if self.separate_files:
            names.append("file_id")
        return np.array(names, dtype=object)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # X must be an observation table (a DataFrame with named columns and symmetry),
        # not an arbitrary 2-D array, and fitting needs no target.
        tags.input_tags.two_d_array = False
        tags.target_tags.required = False
        tags.transformer_tags.preserves_dtype = []
        return tags

    def save(self, path):
        """Save the fitted merger in the safe format: one ``.npz`` file of its weights and
        parameters, read without pickle (so loading it runs no code from the file).

        Raises :class:`~skmerge.errors.NotSerializableError` for what only joblib can
        store (a metadata transformer of your own, a reference data set in memory).
        Returns the path written.
        """
        from ._safe_format import save

        return save(self, path)

    @classmethod
    def load(cls, path):
        """A merger saved by :meth:`save`, predicting exactly as the saved one did.

        A damaged or foreign file raises :class:`~skmerge.errors.DamagedFileError` naming
        it; a file of another skmerge version :class:`~skmerge.errors.IncompatibleVersionError`.
        """
        from ._safe_format import load

        return load(cls, path)

    def _check_params(self):
        """scikit-learn's parameter validation, of the model pieces given as objects too,
        raising skmerge's ParameterError."""
        try:
            self._validate_params()
            for piece in (self.prior, self.likelihood, self.error_model):
                if hasattr(piece, "_parameter_constraints"):
                    piece._validate_params()
        except InvalidParameterError as exc:
            raise ParameterError(str(exc)) from None
        if (layers_asked_for(self) or heads_asked_for(self)) and self.image_model != "offsets":
            own = f"image_layers={self.image_layers}" if layers_asked_for(self) else "image_heads=True"
            raise ParameterError(f"{own} gives each image of the fit weights of its own; the image encoder has none "
                                 "(use image_model=\"offsets\", or image_layers=0 and image_heads=False).")
        if (self.spectrum is not None or self.lorentz_correction) and not self.laue:
            raise ParameterError("spectrum and lorentz_correction describe polychromatic data; set laue=True.")
        if self.spectrum is not None:
            try:
                check_spectrum(self.spectrum)
            except InputError as exc:
                raise ParameterError(str(exc)) from None

    def _check_warm_start(self):
        """ParameterError unless the previous fit's model has the shape the parameters
        ask for, so that its weights can start this fit."""
        if self.error_model and not hasattr(self, "sdfac_"):
            raise ParameterError("error_model cannot warm-start from a fit made without it; refit from scratch.")
        # The shared stack's kernels come first, then its biases (one axis).
        layers = next(i for i, w in enumerate(self.scale_weights_) if np.ndim(w) == 1)
        width = self.scale_weights_[0].shape[1]
        asked = (layers if self.mlp_layers == "auto" else self.mlp_layers, self.mlp_width)
        if (layers, width) != asked:
            raise ParameterError(f"the previous fit's scale network has mlp_layers={layers}, mlp_width={width}; a "
                                 f"warm start needs the same (or mlp_layers=\"auto\"), not {self.mlp_layers}, "
                                 f"{self.mlp_width}.")
        if isinstance(self.metadata, (list, tuple)):
            fitted = [name for name, _, _ in self.metadata_transformer_.transformers_ if name != "remainder"]
            if fitted != split_metadata(self.metadata)[0]:
                raise ParameterError(f"the previous fit's scale model reads the metadata {fitted}; a warm start "
                                     f"needs the same, not {list(self.metadata)}.")

    def _check_same_reflections(self):
        """ParameterError unless the parameters describe reflections as the previous fit
        did: an online update joins its posterior to that fit's, reflection by
        reflection."""
        fitted = {"anomalous": self.reflections_.anomalous, "separate_files": self.reflections_.group is not None,
                  "laue": hasattr(self, "dmin_")}
        for name, value in fitted.items():
            if getattr(self, name) != value:
                raise ParameterError(f"the previous fit was made with {name}={value}; partial_fit adds to its "
                                     f"reflections and needs the same, not {name}={getattr(self, name)} (refit "
                                     "from scratch with fit).")

    def _check_input(self, X):
        """The fit state, after checking that X is a table of the fit's kind."""
        check_is_fitted(self, "posterior_weights_")
        check_table(X)
        missing = [c for c in self.feature_names_in_ if c not in X.columns]
        if missing:
            raise InputError(f"X lacks column(s) {', '.join(missing)} that the fit's table had.")
        check_compatible(X, self.reflections_)
        return FitState.from_attributes(self)

    def _check_store(self, store):
        """The fit state and the store as a source of pieces, after checking that the
        store holds tables of the fit's kind."""
        source = as_source(store)
        return self._check_input(source.head()), source

    def _get_model(self):
        """The TensorFlow model, rebuilt from the stored weights when needed (after
        unpickling)."""
        if getattr(self, "_model", None) is None:
            self._model = restore_model(self, FitState.from_attributes(self), Weights.from_attributes(self))
        return self._model
