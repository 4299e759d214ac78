"""Calibration of the predictive uncertainties, and the outliers among the observations.

Every observation gets a predictive z-score

    z = (Iobs − Ipred) / σpred,   σpred² = σ'² + SD(Ipred)²,

where σ' is its σ after the fitted error model (σ itself without one) and SD(Ipred) the
spread of its prediction over the posterior and the scale, the uncertainty of its image's
own scale weights included (``VariationalMerger.predict`` with ``return_std=True``). On
observations held out of the fit, z has standard deviation 1 and the intervals
Ipred ± 1·σpred and Ipred ± 1.96·σpred hold 68 % and 95 % of them when the uncertainties
are honest; :func:`calibration_report` checks this per resolution shell and per bin of
Ipred.

Outliers are judged on every observation: an observation is an outlier when
``|z|`` > 4·max(1, rSD), rSD the robust standard deviation (1.4826·MAD) of the z of every
observation of its data set. With honest σ that is ``|z|`` > 4; when every σ is understated
by a common factor (which the calibration table shows), the limit grows with the
scatter of the bulk instead of calling a large part of the data outliers; and it never
falls below 4, although the observations the fit saw have smaller z than new ones. The
rule is the same whatever the likelihood, and nothing is removed. Images are listed when
most of their observations are outliers, when their scale is far from that of their
neighbours (robustly, against a rolling median over the image order), or when their
observations scatter about the predictions far more widely than the typical image's (the
robust SD of their z against the images' median): a still of the wrong crystal, indexed
wrongly or with its intensities garbled, has few gross outliers and an unremarkable scale,
but none of its observations agree with the rest.

A data set whose predictions do not fit in memory (a streamed merge of an observation
store) is calibrated piece by piece by :func:`streamed_calibration`, with the report of
the whole table: its robust SD and quantiles are exact order statistics found in a few
passes over the pieces (:func:`order_statistics`).

The per-observation ``Weight`` column of the predictions file is the posterior mean
precision weight E[w] = (ν + 1)/(ν + z²) that a Student-t likelihood with ν degrees of
freedom gives the observation: the fit's own ν with a Student-t likelihood, else ν = 16,
so that the column reads the same whatever the likelihood.
"""

import itertools
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from .errors import InputError
from .io.writers import evaluation_rows
from .shells import ResolutionShells, make_shells

__all__ = ["Calibration", "calibration_report", "coverage", "likelihood_law", "normal_score", "order_statistics",
           "outlier_weight", "predictive_z", "refined_sigma", "robust_sd", "streamed_calibration"]

OUTLIER_LIMIT = 4.0
"""An outlier lies beyond this many robust standard deviations of its data set's z, and
beyond this |z|."""
REFERENCE_DOF = 16.0
"""ν of the ``Weight`` column for likelihoods that have none (careless's choice for data
with outliers)."""
OUTLIER_IMAGE_FRACTION = 0.5
"""An image is listed when more than this fraction of its observations are outliers."""
SCALE_WINDOW = 9
"""Images in the rolling median that an image's scale is compared with."""
SCALE_LIMIT = 5.0
"""An image is listed when its log scale is more than this many robust SDs (over the
images) from the rolling median, and ..."""
SCALE_MIN_RATIO = 1.5
"""... at least this factor from it: smooth scales give tiny robust SDs."""
SPREAD_LIMIT = 5.0
"""An image is listed when the robust SD of its z exceeds the images' median by more than
this many robust SDs over the images and this many of its own sampling errors, and ..."""
SPREAD_MIN_RATIO = 1.5
"""... is at least this factor above the median."""
SPREAD_MIN_OBSERVATIONS = 3
"""Images with fewer observations have no robust SD of z (NaN): one observation's is 0,
which, where most images hold one (XDS's example: 300 observations on 185 images), made
the images' median 0 and listed every other image as scattered."""
_MAD_SD_ERROR = 1.166  # the SD of the MAD estimate of a normal law's SD from n values: 1.166·σ/√n
LEVELS = (0.68, 0.95)
"""Probabilities of the predictive intervals whose coverage is reported."""
HISTOGRAM_EDGES = np.linspace(-6.0, 6.0, 49)
"""Bins of the stored z histograms; values beyond them count in the outer bins."""
_MAD_TO_SD = 1.4826  # 1/Φ⁻¹(3/4): the MAD of a normal law times this is its SD


# --------------------------------------------------------------------- the scores
def predictive_z(iobs, ipred, sigma, ipred_sd):
    """Predictive z-scores (Iobs − Ipred)/σpred with σpred² = σ² + SD(Ipred)².

    Parameters
    ----------
    iobs, ipred : array-like of shape (n,)
        Observed and predicted intensities.
    sigma : array-like of shape (n,)
        The observations' σ, after the fitted error model (:func:`refined_sigma`).
    ipred_sd : array-like of shape (n,)
        Standard deviation of each prediction.

    Examples
    --------
    >>> from skmerge.calibration import predictive_z
    >>> predictive_z([10.0, 0.0], [7.0, 4.0], [4.0, 3.0], [0.0, 4.0]).tolist()
    [0.75, -0.8]
    """
    iobs, ipred, sigma, ipred_sd = (np.asarray(a, dtype=np.float64) for a in (iobs, ipred, sigma, ipred_sd))
    return (iobs - ipred) / np.sqrt(sigma**2 + ipred_sd**2)


def normal_score(z, likelihood):
    """The residuals z (in units of σpred) as standard-normal scores of their predictive
    tail probability: Φ⁻¹ of the law's CDF at z. With a Student-t likelihood a residual
    of 2 is less surprising than with a normal one; expressed this way, the same normal
    intervals and the same outlier limit test every likelihood's own predictive law.

    Parameters
    ----------
    z : array-like
        (Iobs − Ipred)/σpred (:func:`predictive_z`).
    likelihood : dict
        The law: ``{"dof": ν}`` (Student-t), ``{"dof_below": ν₋, "dof_above": ν₊}``
        (two-piece Student-t), ``{"outlier_fraction": π, "outlier_scale": κ}`` (normal
        mixture; with ``"dof"`` too, a mixture of Student-t's), ``{"laplace": True}``, or
        empty (normal: z is returned as it is).

    Examples
    --------
    >>> from skmerge.calibration import normal_score
    >>> normal_score([1.0, -3.0], {}).tolist()
    [1.0, -3.0]
    >>> [round(float(v), 3) for v in normal_score([2.015, -2.015], {"dof": 5.0})]  # t₅'s 95 % quantile
    [1.645, -1.645]
    """
    z = np.asarray(z, dtype=np.float64)
    size = np.abs(z)
    if "outlier_fraction" in likelihood:
        core = scipy_stats.t(likelihood["dof"]) if "dof" in likelihood else scipy_stats.norm
        fraction, scale = likelihood["outlier_fraction"], likelihood["outlier_scale"]
        tail = (1 - fraction) * core.sf(size) + fraction * core.sf(size / scale)
    elif "dof" in likelihood or "dof_below" in likelihood:
        dof, width = _student_t_side(z, likelihood)
        tail = scipy_stats.t.sf(size / width, dof)
    elif likelihood.get("laplace"):
        tail = 0.5 * np.exp(-np.sqrt(2.0) * size)
    else:
        return z
    return np.sign(z) * scipy_stats.norm.isf(tail)


def _student_t_side(z, likelihood):
    """ν and width (in units of σ) of the Student-t each residual z falls under: a
    two-piece Student-t's side (each half holds probability ½, so the tail beyond z is its
    side's), the likelihood's own ν at width 1, or :data:`REFERENCE_DOF` for a likelihood
    without one."""
    if "dof_below" not in likelihood:
        return likelihood.get("dof", REFERENCE_DOF), 1.0
    below, above = likelihood["dof_below"], likelihood["dof_above"]
    half_gap = 0.5 * (scipy_stats.t.logpdf(0.0, below) - scipy_stats.t.logpdf(0.0, above))
    return np.where(z < 0, below, above), np.exp(np.where(z < 0, half_gap, -half_gap))


def likelihood_law(merger):
    """The predictive law of a fitted merger's likelihood, as :func:`normal_score` takes
    it (learned parameters where the fit learned them)."""
    from .model.fitted import learned_likelihood
    from .model.likelihoods import (LaplaceLikelihood, MixtureLikelihood, StudentTLikelihood,
                                    TwoPieceStudentTLikelihood, make_likelihood)

    likelihood = make_likelihood(merger.likelihood)
    if isinstance(likelihood, StudentTLikelihood):
        return {"dof": float(likelihood.dof), **learned_likelihood(merger)}
    if isinstance(likelihood, TwoPieceStudentTLikelihood):
        return {"dof_below": float(likelihood.dof_below), "dof_above": float(likelihood.dof_above),
                **learned_likelihood(merger)}
    if isinstance(likelihood, MixtureLikelihood):
        core = {} if likelihood.core_dof is None else {"dof": float(likelihood.core_dof)}
        return {"outlier_fraction": float(likelihood.outlier_fraction),
                "outlier_scale": float(likelihood.outlier_scale), **core, **learned_likelihood(merger)}
    return {"laplace": True} if isinstance(likelihood, LaplaceLikelihood) else {}


def robust_sd(values):
    """1.4826 × the median absolute deviation from the median: the SD of a normal law,
    unmoved by a few wild values. NaN for no value.

    Examples
    --------
    >>> from skmerge.calibration import robust_sd
    >>> round(robust_sd([-1.0, 0.0, 1.0, 100.0]), 4)
    1.4826
    """
    values = np.asarray(values, dtype=np.float64)
    if not len(values):
        return float("nan")
    return float(_MAD_TO_SD * np.median(np.abs(values - np.median(values))))


def coverage(z, level):
    """Fraction of the z-scores inside the central normal interval of probability
    ``level`` (``|z|`` ≤ Φ⁻¹((1 + level)/2), 1.96 for 0.95). NaN for no value.

    Examples
    --------
    >>> from skmerge.calibration import coverage
    >>> coverage([0.5, -1.5, 2.5, 1.9], 0.95)
    0.75
    """
    z = np.asarray(z, dtype=np.float64)
    if not len(z):
        return float("nan")
    return float(np.mean(np.abs(z) <= scipy_stats.norm.ppf((1 + level) / 2)))


def outlier_weight(z, dof=REFERENCE_DOF):
    """The posterior mean E[w] = (ν + 1)/(ν + z²) of the precision weight of an
    observation at z under a Student-t likelihood with ν = ``dof`` (a normal law whose
    precision is scaled by w ~ Gamma(ν/2, ν/2)): 1 + 1/ν at z = 0, small for outliers.

    Examples
    --------
    >>> from skmerge.calibration import outlier_weight
    >>> outlier_weight([0.0, 1.0, 8.0], dof=4).tolist()
    [1.25, 1.0, 0.07352941176470588]
    """
    z = np.asarray(z, dtype=np.float64)
    return (dof + 1) / (dof + z**2)


def refined_sigma(merger, sigma, ipred):
    """The observations' σ' after a fitted merger's error model (``sigma`` itself
    without one), evaluated at the predicted intensities, in the input's units.

    The error model is rebuilt from the fitted weights and applied exactly as the fit
    applies it, in the model's standardised units.
    """
    from .model.error_model import make_error_model
    from .model.fitted import Weights

    error_model = make_error_model(merger.error_model)
    sigma = np.asarray(sigma, dtype=np.float64)
    if error_model is None:
        return sigma
    c = merger.intensity_scale_
    module = error_model.build(*Weights.from_attributes(merger).error_model)
    refined = module(np.float32(sigma / c), np.float32(np.asarray(ipred, dtype=np.float64) / c))
    return np.asarray(refined, dtype=np.float64) * c


def observation_scores(merger, X, ipred, ipred_sd):
    """The ``Z`` and ``Weight`` columns of the predictions file for the observations X
    of a fitted merger, given their predictions (``merger.predict(X, return_std=True)``).

    ``Z`` is the residual (Iobs − Ipred)/σpred as a normal score under the likelihood's
    own law (:func:`normal_score`; the residual itself for a normal likelihood).
    ``Weight`` is :func:`outlier_weight` of the residual with the ν of the merger's
    Student-t likelihood (the learned ``likelihood_dof_`` when it learned ν; a two-piece
    Student-t's ν and width of the residual's side), or
    :data:`REFERENCE_DOF` for likelihoods without one.
    """
    sigma = refined_sigma(merger, X["SIGIobs"].to_numpy(np.float64), ipred)
    residual = predictive_z(X["Iobs"].to_numpy(np.float64), ipred, sigma, ipred_sd)
    law = likelihood_law(merger)
    dof, width = _student_t_side(residual, law)
    return normal_score(residual, law), outlier_weight(residual / width, dof)


# ------------------------------------------------------------------------ the report
@dataclass
class Calibration:
    """Calibration and outliers of one data set (:func:`calibration_report`).

    Attributes
    ----------
    shells : pandas.DataFrame
        One row per resolution shell (1 … n), then ``overall``: d_max, d_min (Å), then
        the columns of :data:`COLUMNS`.
    intensity : pandas.DataFrame
        The same per equal-count bin of Ipred (1 … n, then ``overall``), with the bin's
        limits as I_min, I_max instead of d_max, d_min.
    images : pandas.DataFrame
        One row per image (index image_id): n_obs, n_outliers, outlier_fraction, scale
        (median over its observations), scale_ratio (to the rolling median of its
        neighbours'), z_robust_sd (of its observations' z), spread_ratio (that over the
        images' median), reason ("" unless the image is listed).
    histogram : dict
        Counts of z in :data:`HISTOGRAM_EDGES` (``edges``): ``test`` (held-out) and
        ``fitted`` observations.
    z_limit : float
        ``|z|`` beyond which an observation counts as an outlier: 4·max(1, robust SD of the
        z of every observation).
    n_test : int
        Held-out observations (0: no calibration, only outliers).
    """

    shells: pd.DataFrame
    intensity: pd.DataFrame
    images: pd.DataFrame
    histogram: dict
    z_limit: float
    n_test: int

    @property
    def flagged(self):
        """The listed images: their rows of :attr:`images`."""
        return self.images[self.images["reason"] != ""]

    def summary(self):
        """One line: the held-out z and coverage overall, the outliers, the listed images."""
        overall = self.shells.loc["overall"]
        text = (f"held-out SD(z) {overall['z_sd']:.2f} (robust {overall['z_robust_sd']:.2f}), "
                f"68%/95% intervals hold {overall['coverage_68']:.1%}/{overall['coverage_95']:.1%}; "
                if self.n_test else "no held-out observations; ")
        return text + (f"{overall['n_outliers']:,.0f} outliers (|z| > {self.z_limit:.2f}) of "
                       f"{overall['n_obs']:,.0f} observations; {len(self.flagged)} of {len(self.images)} images listed")

    def to_string(self, title=None):
        """The calibration tables and the listed images as text."""
        lines = [title] if title else []
        n_obs = int(self.shells.loc["overall", "n_obs"])
        lines.append(f"Calibration on {self.n_test:,} held-out observations: z = (Iobs - Ipred)/sigma_pred; "
                     f"outliers: |z| > {self.z_limit:.2f} among all {n_obs:,}")
        if not self.n_test:
            lines.append("(no held-out observations: give --test-fraction for the calibration columns)")
        for table, low, high, fmt in ((self.shells, "d_max", "d_min", "{:.2f}"),
                                      (self.intensity, "Ipred>=", "Ipred<", "{:.4g}")):
            lines.extend(_table_lines(table, low, high, fmt))
        flagged = self.flagged
        lines.append(f"{len(flagged)} of {len(self.images)} images listed" + (":" if len(flagged) else ""))
        for image_id, row in flagged.iterrows():
            lines.append(f"  image_id {image_id}: {row['reason']}")
        return "\n".join(lines)

    def __str__(self):
        return self.to_string()

    def to_dict(self):
        """A JSON-serialisable description; :meth:`from_dict` inverts it."""
        return {
            "z_limit": self.z_limit, "n_test": self.n_test,
            "shells": _records(self.shells), "intensity": _records(self.intensity),
            "images": _records(self.images),
            "flagged_images": [int(i) for i in self.flagged.index],
            "histogram": {k: np.asarray(v).tolist() for k, v in self.histogram.items()},
        }

    @classmethod
    def from_dict(cls, data):
        """Inverse of :meth:`to_dict`."""
        def table(records):
            frame = pd.DataFrame(records).set_index("row")
            frame.index = pd.Index([i if i == "overall" else int(i) for i in frame.index], name="row")
            return frame.astype(float)

        images = pd.DataFrame(data["images"]).set_index("image_id")
        images["reason"] = images["reason"].fillna("")
        histogram = {k: np.asarray(v, dtype=np.float64) for k, v in data["histogram"].items()}
        return cls(table(data["shells"]), table(data["intensity"]), images, histogram, data["z_limit"],
                   data["n_test"])


# Per-bin columns: (heading, width, format).
COLUMNS = {
    "n_test": ("#test", 7, "{:.0f}"),
    "z_mean": ("<z>", 6, "{:.2f}"),
    "z_sd": ("SD(z)", 6, "{:.2f}"),
    "z_robust_sd": ("rSD(z)", 7, "{:.2f}"),
    "coverage_68": ("in68%", 6, "{:.1%}"),
    "coverage_95": ("in95%", 6, "{:.1%}"),
    "n_obs": ("#obs", 8, "{:.0f}"),
    "n_outliers": ("#outl", 7, "{:.0f}"),
    "outlier_fraction": ("outl%", 6, "{:.2%}"),
}


def calibration_report(predictions, shells=10, n_bins=10):
    """Calibration of the held-out observations and outliers among all, per resolution
    shell, per bin of Ipred and per image.

    Parameters
    ----------
    predictions : DataFrame
        One row per observation with Z (:func:`predictive_z`), Ipred, test (1 for
        held-out observations), image_id, Scale, [file_id], and dHKL or an H, K, L index
        with a cell (the predictions table of a merge, or an ``OUT_predictions_<i>.mtz``
        file).
    shells : int or ResolutionShells, default=10
        The resolution shells, or a number of equal-count shells over the observed
        reflections.
    n_bins : int, default=10
        Equal-count bins of Ipred over the held-out observations (over all of them
        without a test set).

    Returns
    -------
    Calibration

    Notes
    -----
    Per shell and bin, over the held-out observations: n_test, the mean, SD and robust
    SD (:func:`robust_sd`) of z, and the fractions inside the 68 % and 95 % normal
    predictive intervals (:func:`coverage`; the normal intervals for every likelihood).
    Over all observations: n_obs, n_outliers (\\|z\\| > ``z_limit``, see the module
    docstring) and their fraction.
    A z computed on observations the fit saw is smaller than on new ones, so only the
    held-out ones measure calibration.

    Examples
    --------
    >>> import numpy as np
    >>> import pandas as pd
    >>> from skmerge.calibration import calibration_report
    >>> rng = np.random.default_rng(0)
    >>> n = 4000
    >>> z = rng.normal(size=n)
    >>> z[:40] = 30.0  # 1 % gross outliers
    >>> predictions = pd.DataFrame({"Z": z, "Ipred": rng.exponential(100, n), "test": rng.random(n) < 0.5,
    ...                             "image_id": np.arange(n) // 200, "Scale": 1.0,
    ...                             "dHKL": rng.uniform(2, 10, n)})
    >>> report = calibration_report(predictions, shells=2, n_bins=2)
    >>> report.shells.loc["overall", ["n_outliers", "coverage_95"]].round(2).tolist()
    [40.0, 0.95]
    >>> report.flagged.index.tolist()  # the first image holds the outliers, but not mostly
    []
    """
    if not isinstance(shells, ResolutionShells):
        _check_columns(predictions)
        shells = make_shells(np.unique(_resolution(predictions)), shells)
    return streamed_calibration(lambda columns=None: [predictions], shells, n_bins)


def streamed_calibration(pieces, shells, n_bins=10):
    """:func:`calibration_report` of a data set whose predictions come piece by piece,
    never all at once: the same report as of the pieces put together.

    The robust SD of z (the outlier limit) and the limits of the bins of Ipred are
    exact order statistics of the values found in passes over the pieces
    (:func:`order_statistics`); the counts and histograms are summed piece by piece, and
    only the held-out observations' z are kept.

    Parameters
    ----------
    pieces : callable
        ``pieces(columns)`` returns a new iterable over the data set's predictions, in
        tables with the columns :func:`calibration_report` reads (at least ``columns``
        when it is a list; all of them when None), each holding whole images. It is
        called once per pass.
    shells : ResolutionShells
        The resolution shells (:func:`skmerge.merge_outputs.resolution_shells` of the
        data set's statistics).
    n_bins : int, default=10
        As in :func:`calibration_report`.

    Returns
    -------
    Calibration

    Examples
    --------
    >>> import numpy as np
    >>> import pandas as pd
    >>> from skmerge.calibration import calibration_report, streamed_calibration
    >>> from skmerge.shells import ResolutionShells
    >>> rng = np.random.default_rng(0)
    >>> n = 3000
    >>> predictions = pd.DataFrame({"Z": rng.standard_t(3, n), "Ipred": rng.exponential(100, n),
    ...                             "test": rng.random(n) < 0.2, "image_id": np.arange(n) // 100, "Scale": 1.0,
    ...                             "dHKL": rng.uniform(2, 10, n)})
    >>> shells = ResolutionShells(np.array([10.0, 4.0, 2.0]) ** -2.0)
    >>> pieces = lambda columns: (predictions[predictions["image_id"] // 10 == k] for k in range(3))
    >>> streamed = streamed_calibration(pieces, shells, n_bins=4)
    >>> streamed.shells.equals(calibration_report(predictions, shells, n_bins=4).shells)
    True
    """
    def values(column, held_out_only=False):
        def batches():
            for piece in pieces([column, "test"]):
                _check_columns(piece, (column, "test"))
                found = piece[column].to_numpy(np.float64)
                yield found[evaluation_rows(piece)] if held_out_only else found
        return batches

    z_limit = OUTLIER_LIMIT * max(1.0, _robust_sd_of(values("Z")))
    n_test = sum(int(evaluation_rows(piece).sum()) for piece in pieces(["test"]))  # Z's pass checked the column
    # Binned by the prediction, not by Iobs: bins of Iobs would select by the noise.
    edges = _equal_count_edges(values("Ipred", held_out_only=n_test > 0), n_bins)
    tally = _Tally(shells, edges, z_limit)
    for piece in pieces(None):
        _check_columns(piece)
        tally.add(piece)
    return tally.calibration()


def order_statistics(batches, ranks):
    """The values at the positions ``ranks`` (from 0) of the sorted values of all the
    batches, NaN left out, exactly and in memory independent of their number.

    One batch is partitioned in memory; several are read four times, each pass fixing
    16 more bits of the wanted values' sortable 64-bit keys (a radix selection).

    Parameters
    ----------
    batches : callable
        ``batches()`` returns a new iterable of 1-D float arrays.
    ranks : array-like of int
        Positions below the number of non-NaN values.

    Returns
    -------
    ndarray of float64

    Examples
    --------
    >>> import numpy as np
    >>> from skmerge.calibration import order_statistics
    >>> parts = [np.array([5.0, -1.0, 3.0]), np.array([0.0, 2.0, np.nan])]
    >>> order_statistics(lambda: parts, [0, 2, 4]).tolist()
    [-1.0, 2.0, 5.0]
    """
    ranks = np.asarray(ranks, np.int64).ravel()
    first_two = list(itertools.islice(iter(batches()), 2))
    if len(first_two) < 2:
        values = np.concatenate([np.asarray(v, np.float64).ravel() for v in first_two] or [np.empty(0)])
        values = values[~np.isnan(values)]
        return np.partition(values, ranks)[ranks] if len(ranks) else np.empty(0)
    prefixes, remaining = np.zeros(len(ranks), np.uint64), ranks.copy()
    for shift in (48, 32, 16, 0):
        known = np.unique(prefixes)
        counts = {prefix: np.zeros(1 << 16, np.int64) for prefix in known}
        for batch in batches():
            keys = _sortable_keys(batch)
            high = None if shift == 48 else keys >> np.uint64(shift + 16)
            for prefix in known:
                # The keys that share the bits found so far with this prefix.
                chosen = keys if high is None else keys[high == prefix >> np.uint64(shift + 16)]
                digits = ((chosen >> np.uint64(shift)) & np.uint64(0xFFFF)).astype(np.intp)
                counts[prefix] += np.bincount(digits, minlength=1 << 16)
        found = prefixes.copy()
        for j, prefix in enumerate(prefixes):
            cumulative = np.cumsum(counts[prefix])
            digit = int(np.searchsorted(cumulative, remaining[j], side="right"))
            remaining[j] -= cumulative[digit - 1] if digit else 0
            found[j] = prefix | (np.uint64(digit) << np.uint64(shift))
        prefixes = found
    sign = np.uint64(1 << 63)
    bits = np.where(prefixes & sign, prefixes & ~sign, ~prefixes)
    return bits.view(np.float64)


def _sortable_keys(values):
    """Unsigned 64-bit keys in the order of the float values (NaN left out)."""
    values = np.asarray(values, np.float64).ravel()
    bits = np.ascontiguousarray(values[~np.isnan(values)]).view(np.uint64)
    sign = np.uint64(1 << 63)
    return np.where(bits & sign, ~bits, bits | sign)


def _median_of(batches, n):
    """The median of n values given in batches, as ``numpy.median`` computes it."""
    middle = order_statistics(batches, [(n - 1) // 2, n // 2])
    return float(np.mean(middle[:1] if n % 2 else middle))


def _robust_sd_of(batches):
    """:func:`robust_sd` of the values of all the batches (NaN if any is NaN, as
    ``numpy.median`` gives)."""
    n, missing = 0, False
    for batch in batches():
        nan = np.isnan(batch)
        n, missing = n + int((~nan).sum()), missing or bool(nan.any())
    if missing or not n:
        return float("nan")
    median = _median_of(batches, n)
    deviation = _median_of(lambda: (np.abs(batch - median) for batch in batches()), n)
    return float(_MAD_TO_SD * deviation)


def _equal_count_edges(batches, n_bins):
    """The limits of ``n_bins`` equal-count bins of the values of all the batches: their
    quantiles, interpolated linearly between order statistics, without repeats."""
    n = sum(int((~np.isnan(batch)).sum()) for batch in batches())
    if not n:
        return np.zeros(1)
    positions = np.linspace(0.0, 1.0, n_bins + 1) * (n - 1)
    low, high = np.floor(positions).astype(np.int64), np.ceil(positions).astype(np.int64)
    ranks = np.unique(np.r_[low, high])
    value = dict(zip(ranks.tolist(), order_statistics(batches, ranks)))
    below, above = np.array([value[r] for r in low]), np.array([value[r] for r in high])
    return np.unique(below + (above - below) * (positions - low))


class _Tally:
    """The counts of :class:`Calibration`, summed over pieces of whole images, and the
    held-out observations' z with their shell and bin of Ipred."""

    def __init__(self, shells, edges, z_limit):
        self.shells, self.edges, self.z_limit = shells, edges, z_limit
        n_bins = max(len(edges) - 1, 0)
        # Per shell then over all shells, per bin of Ipred then overall: observations, outliers.
        self.by_shell, self.by_intensity = np.zeros((shells.n + 1, 2), np.int64), np.zeros((n_bins + 1, 2), np.int64)
        self.held_out = []
        self.histogram = {"test": np.zeros(len(HISTOGRAM_EDGES) - 1, np.int64),
                          "fitted": np.zeros(len(HISTOGRAM_EDGES) - 1, np.int64)}
        self.images = []

    def add(self, predictions):
        z = predictions["Z"].to_numpy(np.float64)
        test = evaluation_rows(predictions)
        outlier = np.abs(z) > self.z_limit
        shell = self.shells.assign(_resolution(predictions))
        ipred = predictions["Ipred"].to_numpy(np.float64)
        n_bins = len(self.by_intensity) - 1
        # With every Ipred equal the edges are one value and there is no bin: only the overall row.
        intensity_bin = np.clip(np.searchsorted(self.edges, ipred, side="right") - 1, 0, max(len(self.edges) - 2, 0))
        for table, group, inside, n in ((self.by_shell, shell, shell >= 0, self.shells.n),
                                        (self.by_intensity, intensity_bin, np.ones(len(z), bool), n_bins)):
            table[:n, 0] += np.bincount(group[inside], minlength=n)[:n]
            table[:n, 1] += np.bincount(group[inside & outlier], minlength=n)[:n]
            table[n] += (int(inside.sum()), int((inside & outlier).sum()))
        self.held_out.append((z[test], shell[test], intensity_bin[test]))
        self.histogram["test"] += _histogram(z[test])
        self.histogram["fitted"] += _histogram(z[~test])
        self.images.append(_image_counts(predictions, outlier))

    def calibration(self):
        z, shell, intensity_bin = (np.concatenate(parts) for parts in zip(*self.held_out))
        by_shell = _summaries(z, [shell == i for i in range(self.shells.n)] + [shell >= 0], self.by_shell)
        by_shell.insert(0, "d_min", [*self.shells.d_min, self.shells.d_min[-1]])
        by_shell.insert(0, "d_max", [*self.shells.d_max, self.shells.d_max[0]])
        n_bins = len(self.by_intensity) - 1
        by_intensity = _summaries(z, [intensity_bin == i for i in range(n_bins)] + [np.ones(len(z), bool)],
                                  self.by_intensity)
        edges = self.edges
        by_intensity.insert(0, "I_max", [*edges[1:], edges[-1]])
        by_intensity.insert(0, "I_min", [*edges[:-1], edges[0]])
        histogram = {"edges": HISTOGRAM_EDGES, **self.histogram}
        images = _listed_images(pd.concat(self.images).sort_index())
        return Calibration(by_shell, by_intensity, images, histogram, self.z_limit, len(z))


def image_report(predictions, outlier):
    """Outliers and scale per image, and the images to list (see :class:`Calibration`).

    An image is listed when more than half its observations are outliers; when its
    scale (the median of its observations') differs from the rolling median over the
    :data:`SCALE_WINDOW` images around it (in image order, within its file) by more than
    :data:`SCALE_LIMIT` robust SDs of that log ratio over all images and by a factor of
    at least :data:`SCALE_MIN_RATIO`; or when the robust SD of its z (of images with at
    least :data:`SPREAD_MIN_OBSERVATIONS` observations) exceeds the median
    over the images by a factor of at least :data:`SPREAD_MIN_RATIO` and by more than
    :data:`SPREAD_LIMIT` times the larger of that SD's robust spread over the images and
    its sampling error (1.166·median/√n for n observations). Fitted observations have z
    below 1, so the images are compared with each other, not with 1.
    """
    return _listed_images(_image_counts(predictions, outlier))


def _image_counts(predictions, outlier):
    """Per image of the predictions: file_id, n_obs, n_outliers and scale (the median)."""
    frame = pd.DataFrame({
        "image_id": predictions["image_id"].to_numpy(np.int64),
        "file_id": predictions["file_id"].to_numpy(np.int64) if "file_id" in predictions.columns else 0,
        "outlier": outlier, "scale": predictions["Scale"].to_numpy(np.float64),
        "z": predictions["Z"].to_numpy(np.float64),
    })
    by_image = frame.groupby("image_id", sort=True)
    # robust_sd of every image's z at once: two grouped medians instead of a Python call per image.
    frame["z_deviation"] = (frame["z"] - by_image["z"].transform("median")).abs()
    counts = by_image.agg(file_id=("file_id", "first"), n_obs=("outlier", "size"), n_outliers=("outlier", "sum"),
                          scale=("scale", "median"), z_robust_sd=("z_deviation", "median"))
    counts["z_robust_sd"] = (_MAD_TO_SD * counts["z_robust_sd"]).where(counts["n_obs"] >= SPREAD_MIN_OBSERVATIONS)
    return counts


def _listed_images(images):
    """:func:`image_report` of the per-image counts of :func:`_image_counts`."""
    images = images.copy()
    images["outlier_fraction"] = images["n_outliers"] / images["n_obs"]
    with np.errstate(invalid="ignore", divide="ignore"):
        log_scale = np.log(images["scale"].where(images["scale"] > 0))
    neighbours = log_scale.groupby(images["file_id"]).transform(
        lambda s: s.rolling(SCALE_WINDOW, center=True, min_periods=1).median())
    deviation = log_scale - neighbours
    images["scale_ratio"] = np.exp(deviation)
    limit = max(SCALE_LIMIT * robust_sd(deviation.dropna()), math.log(SCALE_MIN_RATIO))
    spread_limit, typical_spread = _spread_limits(images)
    images["spread_ratio"] = images["z_robust_sd"] / typical_spread
    reasons = []
    for fraction, ratio, dev, spread, spread_ratio, too_wide in zip(
            images["outlier_fraction"], images["scale_ratio"], deviation, images["z_robust_sd"],
            images["spread_ratio"], spread_limit):
        parts = []
        if fraction > OUTLIER_IMAGE_FRACTION:
            parts.append(f"{fraction:.0%} of its observations are outliers")
        if abs(dev) > limit:  # False for NaN: an image without a positive scale
            parts.append(f"scale {ratio:.2f}x its neighbours'")
        if spread > too_wide:
            parts.append(f"its observations scatter {spread_ratio:.1f}x as widely as the typical image's "
                         f"(robust SD of z {spread:.2f} against {typical_spread:.2f})")
        reasons.append("; ".join(parts))
    images["reason"] = reasons
    return images.drop(columns="file_id")


def _spread_limits(images):
    """Per image, the robust SD of z beyond which it is listed (:func:`image_report`),
    and the images' median of it."""
    spread = images["z_robust_sd"].to_numpy(np.float64)
    spread = spread[np.isfinite(spread)]
    typical = float(np.median(spread)) if len(spread) else np.nan
    over_images = robust_sd(spread)
    with np.errstate(divide="ignore"):
        sampling = _MAD_SD_ERROR * typical / np.sqrt(images["n_obs"].to_numpy(np.float64))
    return np.maximum(SPREAD_MIN_RATIO * typical, typical + SPREAD_LIMIT * np.fmax(over_images, sampling)), typical


# -------------------------------------------------------------------------- helpers
def _check_columns(predictions, columns=("Z", "Ipred", "test", "image_id", "Scale")):
    for needed in columns:
        if needed not in predictions.columns:
            raise InputError(f"the predictions table has no column {needed!r}; calibration needs the predictions "
                             "file of skmerge 0.x or later (with Z)")


def _summaries(held_z, held_groups, counts):
    """One row per group: the held-out observations' z statistics (``held_groups``:
    masks of ``held_z``) and the observation and outlier ``counts``."""
    rows = []
    for held_in, (n_obs, n_outliers) in zip(held_groups, counts):
        held = held_z[held_in]
        rows.append({
            "n_test": len(held), "z_mean": float(np.mean(held)) if len(held) else np.nan,
            "z_sd": float(np.std(held)) if len(held) > 1 else np.nan, "z_robust_sd": robust_sd(held),
            "coverage_68": coverage(held, LEVELS[0]), "coverage_95": coverage(held, LEVELS[1]),
            "n_obs": int(n_obs), "n_outliers": int(n_outliers),
            "outlier_fraction": n_outliers / n_obs if n_obs else np.nan,
        })
    frame = pd.DataFrame(rows, index=[*range(1, len(rows)), "overall"], dtype=np.float64)
    frame.index.name = "row"
    return frame


def _histogram(z):
    return np.histogram(np.clip(z, HISTOGRAM_EDGES[0], HISTOGRAM_EDGES[-1]), HISTOGRAM_EDGES)[0]


def _resolution(predictions):
    if "dHKL" in predictions.columns:
        return predictions["dHKL"].to_numpy(np.float64)
    cell = getattr(predictions, "cell", None)
    if cell is None:
        raise InputError("the predictions table has neither dHKL nor a unit cell.")
    return cell.calculate_d_array(predictions.reset_index()[["H", "K", "L"]].to_numpy(np.int32))


def _table_lines(table, low, high, fmt):
    columns = [c for c in COLUMNS if c in table.columns]
    heading = f"{low:>9} {high:>9}" + "".join(f"{COLUMNS[c][0]:>{COLUMNS[c][1] + 1}}" for c in columns)
    lines = ["", heading, "-" * len(heading)]
    for label, row in table.iterrows():
        if label == "overall":
            lines.append("-" * len(heading))
        text = "".join(f"{'inf' if np.isinf(v) else fmt.format(v):>9} " for v in row.iloc[:2])
        for c in columns:
            _, width, cell_format = COLUMNS[c]
            cell = "-" if not np.isfinite(row[c]) else cell_format.format(row[c]).rstrip("%")
            text += f"{cell:>{width + 1}}"
        lines.append(text.rstrip() + ("  overall" if label == "overall" else ""))
    return lines


def _records(frame):
    """The rows of a table with its index as a column, NaN as None (JSON has no NaN)."""
    return [{k: None if isinstance(v, float) and not math.isfinite(v) else getattr(v, "item", lambda: v)()
             for k, v in record.items()} for record in frame.reset_index().to_dict("records")]
