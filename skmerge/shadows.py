"""Detector shadows: regions of the detector where spots come out far weaker than the
fit predicts, on every image.

A beam-stop, its arm or a cryo-nozzle in front of the detector extinguishes the spots
behind it. Integration programs mask such regions when told to; when they are not, the
shadowed spots enter the merge as gross low outliers. A heavy-tailed likelihood copes
with them where a reflection has other observations, but it fattens the tail it learns
for every observation, and in a half-dataset merge (or any reflection seen once or
twice) a shadowed spot may be all there is. On PYP's Laue data an unmasked beam-stop
arm held 438 of the 483 strong observations (I_pred ≥ 10σ) that came out below a fifth
of their prediction, in 1.3 % of the observations.

:func:`find_shadows` finds such regions after a fit from the observations' detector
positions and their predictions: the detector is cut into a grid of cells and a cell is
shadowed when its strongly predicted observations are extinguished (below a fifth of
their prediction) far more often than the detector's as a whole — a binomial tail
probability below 1 % divided by the number of cells tested — and so is a neighbour of
a shadowed cell whose own tail probability is below 1 % (hysteresis: a shadow's faint
edges join it, isolated chance cells do not). The rule looks at where
the outliers are, never at which reflections they belong to, so a shadow is found
whatever the data's kind; stills, whose partialities make every prediction
uncertain, have a high extinction rate everywhere and no cell stands out.

The spots closest to the direct beam are wrong in both directions rather than
extinguished: the beam-stop's penumbra, the direct beam's scatter and overloaded
low-resolution spots make them disagree several-fold between images. There are too few
per grid cell for the rule above, so :func:`find_shadows` also looks for a disc around
the beam (the median position of the lowest-resolution spots) within which strongly
predicted observations come out more than twice or less than half their prediction far
more often than beyond it. On PYP's Laue data 7 of the 99 strong spots within 148 pixels
of the beam did (0.4 % beyond): the two or three observations of each of its
lowest-resolution reflections disagreed 2-4× between images, and which half dataset got
which decided the half datasets' CC1/2.
"""

from dataclasses import dataclass

import numpy as np
from scipy.stats import binom

from .errors import InputError

__all__ = ["BeamZone", "ShadowMask", "detector_columns", "find_shadows", "strongly_predicted"]

# Observed positions before calculated ones: MTZ (XDET), Laue and careless (X), DIALS
# tables (xobs), XDS_ASCII.HKL (XD), INTEGRATE.HKL (XOBS, then XCAL).
DETECTOR_COLUMNS = (("XDET", "YDET"), ("X", "Y"), ("xobs", "yobs"), ("XD", "YD"), ("XOBS", "YOBS"),
                    ("XCAL", "YCAL"), ("xcal", "ycal"))
"""Pairs of detector-position columns, in the order they are looked for."""

# An observation is strongly predicted at I_pred ≥ 5 σ and extinguished below a fifth
# of its prediction: a shadow takes 90-99 % of a spot (PYP's arm: the median ratio of
# its spots is 0.01), while an honest observation at 5 σ comes out that low only 4 σ
# below its prediction. (At 10 σ too few spots are tested where a fit's scales have
# absorbed part of the shadow: a simulated arm's spots were found at a rate of 0.76
# against 0.84 at 5 σ and 0.87 at 3 σ, with no shadow found in hypf, thermolysin or
# a simulation without an arm at any of the three.)
_STRONG_OVER_SIGMA = 5.0
_EXTINCT_RATIO = 0.2
# Cells per side of the grid over the observed positions (32 pixels on a 2,048-pixel
# detector, about the width of a beam-stop arm's shadow).
_GRID = 64
# A shadowed cell has at least this many extinguished observations and this fraction of
# its strong ones extinguished.
_MIN_EXTINCT = 3
_MIN_FRACTION = 0.25
_FAMILY_ALPHA = 0.01
# A cell next to a shadowed one joins it at this binomial tail probability (with one
# extinguished observation or more and the same fraction).
_CELL_ALPHA = 0.01
# The beam zone. Its centre is the median position of the lowest-resolution percent of
# the observations. A strong spot is discordant beyond a factor 2 either way; the zone's
# radius is the most significant of 40 (the distances of the k-th nearest strong spots,
# k from 10 to a quarter of them on a geometric grid) at which the zone holds 3
# discordant spots or more at 5× the rate beyond it, at a binomial tail probability
# below 1 % over the 40 radii. (hypf's rotation data: 3 % of its 113 strong spots within
# 100 pixels are discordant against 2.5 % over the detector, no zone; thermolysin's stills
# 7-8 % everywhere.)
_LOWEST_RESOLUTION_QUANTILE = 0.99
_DISCORDANT_FACTOR = 2.0
_ZONE_RADII = 40
_ZONE_MIN_SPOTS = 10
_ZONE_MIN_DISCORDANT = 3
_ZONE_RATE_FACTOR = 5.0


@dataclass(frozen=True)
class ShadowMask:
    """Shadowed cells of a grid over the detector, and a discordant zone around the beam.

    Attributes
    ----------
    columns : tuple of str
        The detector-position columns (x, y).
    origin : ndarray of shape (2,)
        Position of the grid's corner.
    cell_size : ndarray of shape (2,)
        Size of a cell along x and y, in the columns' units.
    cells : ndarray of shape (n_cells, 2)
        Integer (column, row) of every shadowed cell.
    n_strong, n_extinct : ndarray of shape (n_cells,)
        The cells' strongly predicted and extinguished observations.
    extinct_rate : float
        The fraction of strongly predicted observations extinguished over the detector.
    beam_zone : BeamZone or None
        The disc around the beam whose spots disagree with their prediction, if any.
    """

    columns: tuple
    origin: np.ndarray
    cell_size: np.ndarray
    cells: np.ndarray
    n_strong: np.ndarray
    n_extinct: np.ndarray
    extinct_rate: float
    beam_zone: object = None

    def contains(self, X):
        """Whether each observation of X lies in a shadowed cell or in the beam zone (an
        array of bool)."""
        positions = X[list(self.columns)].to_numpy(np.float64)
        finite = np.isfinite(positions).all(axis=1)
        inside = np.zeros(len(positions), dtype=bool)
        cells = _grid_cells(positions[finite], self.origin, self.cell_size)
        inside[finite] = np.isin(_cell_keys(cells), _cell_keys(self.cells))
        if self.beam_zone is not None:
            inside[finite] |= self.beam_zone.contains(positions[finite])
        return inside

    def describe(self):
        """One line for the log: where, and how the spots there disagree with the fit."""
        x, y = self.columns
        parts = []
        if len(self.cells):
            low = self.origin + self.cells.min(axis=0) * self.cell_size
            high = self.origin + (self.cells.max(axis=0) + 1) * self.cell_size
            parts.append(f"{len(self.cells)} cells of {self.cell_size[0]:.4g} × {self.cell_size[1]:.4g} "
                         f"({x} {low[0]:.5g}–{high[0]:.5g}, {y} {low[1]:.5g}–{high[1]:.5g}) where "
                         f"{int(self.n_extinct.sum()):,} of {int(self.n_strong.sum()):,} strongly predicted "
                         f"observations came out below {_EXTINCT_RATIO:g} of their prediction "
                         f"({self.extinct_rate:.1%} elsewhere on the detector)")
        if self.beam_zone is not None:
            parts.append(self.beam_zone.describe(self.columns))
        return "a detector shadow: " + "; and ".join(parts)

    def to_dict(self):
        """A JSON-ready description (the statistics document's ``shadow``)."""
        return {"columns": list(self.columns), "origin": self.origin.tolist(), "cell_size": self.cell_size.tolist(),
                "cells": self.cells.tolist(), "n_strong": self.n_strong.tolist(),
                "n_extinct": self.n_extinct.tolist(), "extinct_rate": self.extinct_rate,
                "beam_zone": None if self.beam_zone is None else self.beam_zone.to_dict()}


@dataclass(frozen=True)
class BeamZone:
    """A disc around the direct beam whose spots disagree with their prediction.

    Attributes
    ----------
    centre : ndarray of shape (2,)
        The beam's position: the median position of the lowest-resolution observations.
    radius : float
        The disc's radius, in the position columns' units.
    n_strong, n_discordant : int
        The disc's strongly predicted observations, and those more than a factor 2 from
        their prediction.
    discordant_rate : float
        The fraction of strongly predicted observations discordant beyond the disc.
    """

    centre: np.ndarray
    radius: float
    n_strong: int
    n_discordant: int
    discordant_rate: float

    def contains(self, positions):
        """Whether each (x, y) row of positions lies within the disc."""
        return np.hypot(*(np.asarray(positions, dtype=np.float64) - self.centre).T) <= self.radius

    def describe(self, columns):
        """The zone for the log, in the position columns' names."""
        x, y = columns
        return (f"the disc of radius {self.radius:.4g} around the beam ({x} {self.centre[0]:.5g}, "
                f"{y} {self.centre[1]:.5g}), where {self.n_discordant:,} of {self.n_strong:,} strongly predicted "
                f"observations came out more than {_DISCORDANT_FACTOR:g}× from their prediction "
                f"({self.discordant_rate:.1%} beyond)")

    def to_dict(self):
        """A JSON-ready description (the statistics document's ``shadow.beam_zone``)."""
        return {"centre": self.centre.tolist(), "radius": self.radius, "n_strong": self.n_strong,
                "n_discordant": self.n_discordant, "discordant_rate": self.discordant_rate}


def detector_columns(X, columns=None):
    """The detector-position columns of X: ``columns`` when given (checked), else the
    first pair of :data:`DETECTOR_COLUMNS` present, else None.

    Examples
    --------
    >>> import pandas as pd
    >>> from skmerge.shadows import detector_columns
    >>> detector_columns(pd.DataFrame({"XDET": [1.0], "YDET": [2.0], "dHKL": [3.0]}))
    ('XDET', 'YDET')
    """
    if columns is not None:
        columns = tuple(columns)
        missing = [c for c in columns if c not in X.columns]
        if len(columns) != 2 or missing:
            raise InputError(f"detector columns {columns!r}: need two position columns of the data"
                             + (f"; {', '.join(map(repr, missing))} missing" if missing else ""))
        return columns
    return next((pair for pair in DETECTOR_COLUMNS if all(c in X.columns for c in pair)), None)


def find_shadows(X, ipred, columns=None):
    """The detector's shadowed cells and its discordant zone around the beam, or None
    when there is neither.

    Parameters
    ----------
    X : DataFrame
        Observations with Iobs, SIGIobs and detector positions (and dHKL, without which
        no zone around the beam is looked for).
    ipred : array-like of shape (n_observations,)
        The fit's predicted intensity of each observation.
    columns : pair of str, optional
        The detector-position columns (default: the first of :data:`DETECTOR_COLUMNS`
        present; None is returned when the data have none).

    Returns
    -------
    ShadowMask or None

    Examples
    --------
    >>> from skmerge.datasets import make_unmerged
    >>> from skmerge.shadows import find_shadows
    >>> X, truth = make_unmerged(n_images=90, beamstop_arm=True, random_state=0)
    >>> mask = find_shadows(X, truth.Itrue)  # the truth as a perfect fit's prediction
    >>> bool(mask.contains(X)[truth.shadowed].mean() > 0.9)
    True
    """
    columns = detector_columns(X, columns)
    if columns is None or len(X) == 0:
        return None
    positions = X[list(columns)].to_numpy(np.float64)
    finite = np.isfinite(positions).all(axis=1)
    if not finite.any():
        return None
    origin = positions[finite].min(axis=0)
    cell_size = np.maximum(np.ptp(positions[finite], axis=0) / _GRID, 1e-12)
    ipred = np.asarray(ipred, dtype=np.float64)
    strong = finite & strongly_predicted(X, ipred)
    if not strong.any():
        return None
    extinct = strong & (X["Iobs"].to_numpy(np.float64) < _EXTINCT_RATIO * ipred)
    keys, inverse = np.unique(_cell_keys(_grid_cells(positions[strong], origin, cell_size)), return_inverse=True)
    n_strong = np.bincount(inverse, minlength=len(keys))
    n_extinct = np.bincount(inverse, weights=extinct[strong], minlength=len(keys)).astype(np.int64)
    rate = extinct.sum() / strong.sum()
    p = binom.sf(n_extinct - 1, n_strong, rate)
    elevated = (n_extinct >= 1) & (n_extinct >= _MIN_FRACTION * n_strong) & (p < _CELL_ALPHA)
    seeds = elevated & (n_extinct >= _MIN_EXTINCT) & (p < _FAMILY_ALPHA / len(keys))
    shadowed = _grow(_key_cells(keys), seeds, elevated)
    in_cells = np.zeros(len(X), dtype=bool)
    in_cells[strong] = shadowed[inverse]
    zone = _beam_zone(X, positions, finite, strong & ~in_cells, ipred)
    if not shadowed.any() and zone is None:
        return None
    outside = extinct.sum() - n_extinct[shadowed].sum()
    return ShadowMask(columns, origin, cell_size, _key_cells(keys[shadowed]), n_strong[shadowed],
                      n_extinct[shadowed], float(outside / max(strong.sum() - n_strong[shadowed].sum(), 1)), zone)


def _beam_zone(X, positions, finite, strong, ipred):
    """The disc around the beam whose strong spots are discordant far more often than
    beyond it (module docstring), or None."""
    if "dHKL" not in X.columns or not strong.any():
        return None
    resolution = X["dHKL"].to_numpy(np.float64)
    known = finite & np.isfinite(resolution)
    if not known.any():
        return None
    lowest = known & (resolution >= np.quantile(resolution[known], _LOWEST_RESOLUTION_QUANTILE))
    centre = np.median(positions[lowest], axis=0)
    ratio = X["Iobs"].to_numpy(np.float64)[strong] / ipred[strong]
    discordant = (ratio > _DISCORDANT_FACTOR) | (ratio < 1.0 / _DISCORDANT_FACTOR)
    distance = np.hypot(*(positions[strong] - centre).T)
    order = np.argsort(distance, kind="stable")
    distance, discordant = distance[order], discordant[order]
    n = len(distance)
    if n // 4 < _ZONE_MIN_SPOTS:
        return None
    k = np.unique(np.round(np.geomspace(_ZONE_MIN_SPOTS, n // 4, _ZONE_RADII)).astype(np.int64))
    inside = np.cumsum(discordant)[k - 1]
    beyond = (discordant.sum() - inside) / (n - k)
    p = binom.sf(inside - 1, k, np.maximum(beyond, 1.0 / n))
    candidate = ((inside >= _ZONE_MIN_DISCORDANT) & (inside >= _ZONE_RATE_FACTOR * beyond * k)
                 & (p < _FAMILY_ALPHA / len(k)))
    if not candidate.any():
        return None
    best = np.argmin(np.where(candidate, p, np.inf))
    return BeamZone(centre, float(distance[k[best] - 1]), int(k[best]), int(inside[best]), float(beyond[best]))


def strongly_predicted(X, ipred):
    """Whether each observation of X is predicted at 5 σ (its SIGIobs) or more: those
    whose extinction a shadow is told by (an array of bool)."""
    return np.asarray(ipred, dtype=np.float64) >= _STRONG_OVER_SIGMA * X["SIGIobs"].to_numpy(np.float64)


def _grow(cells, seeds, elevated):
    """The elevated cells connected (by edges or corners) to a seed through elevated
    cells: hysteresis, so that a shadow found by its surest cells keeps its fainter
    edges without admitting isolated chance cells."""
    index = {key: i for i, key in enumerate(_cell_keys(cells))}
    shadowed = seeds.copy()
    frontier = list(np.flatnonzero(seeds))
    while frontier:
        i = frontier.pop()
        for dx in (-1, 0, 1):
            for dy in (-1, 0, 1):
                j = index.get(int(_cell_keys(cells[i] + (dx, dy))[0]))
                if j is not None and elevated[j] and not shadowed[j]:
                    shadowed[j] = True
                    frontier.append(j)
    return shadowed


def _grid_cells(positions, origin, cell_size):
    return np.floor((positions - origin) / cell_size).astype(np.int64)


# Cell indices of positions within a million cells of the grid pack into one int64.
_KEY_BASE = 1 << 24


def _cell_keys(cells):
    cells = np.clip(np.asarray(cells, dtype=np.int64).reshape(-1, 2), 1 - _KEY_BASE // 2, _KEY_BASE // 2 - 1)
    return (cells[:, 0] + _KEY_BASE // 2) * _KEY_BASE + (cells[:, 1] + _KEY_BASE // 2)


def _key_cells(keys):
    return np.stack([keys // _KEY_BASE - _KEY_BASE // 2, keys % _KEY_BASE - _KEY_BASE // 2], axis=1)
