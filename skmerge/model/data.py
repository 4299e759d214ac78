"""The observation table → the arrays a model needs.

One encoding step, run once per table a merger sees: every observation's reflection key
(its ASU index, and its file when files are merged separately), its image, intensity and
σ; for Laue data the harmonic rows of every spot. The reflections a model has parameters
for (:class:`Reflections`) are built from those keys with the table's own H, K, L,
CENTRIC and EPSILON columns (``skmerge.read_unmerged`` maps to the ASU once; nothing here
maps again unless the table was read in the other Friedel convention, or lacks them).
"""

from dataclasses import dataclass

import gemmi
import numpy as np
import reciprocalspaceship as rs

from ..errors import InputError
from ..symmetry import isomorphous, map_to_asu, pack_hkl, reflection_flags, resolution, unpack_group, unpack_hkl

# Rows per evaluation call: bounds the memory of predict, score and transform.
EVAL_CHUNK = 200_000


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
    def from_keys(cls, keys, spacegroup, cell, anomalous, separate, centric=None, epsilon=None):
        """The reflections of sorted keys made by :func:`skmerge.symmetry.pack_hkl`;
        centric flags and ε are computed unless given."""
        hkl = unpack_hkl(keys)
        if centric is None:
            centric, epsilon = reflection_flags(hkl, spacegroup)
        group = unpack_group(keys) if separate else None
        return cls(hkl, np.asarray(centric, bool), np.asarray(epsilon, np.float32), resolution(hkl, cell),
                   spacegroup, cell, anomalous, group)

    @property
    def keys(self):
        return pack_hkl(self.hkl, self.group)

    def __len__(self):
        return len(self.hkl)


@dataclass
class Observations:
    """A table encoded for a model.

    ``rows`` are reflection contributions (the table itself, or for Laue data the
    harmonics of every spot), each with the ``key`` of its reflection and its
    ``image_id``; ``intensity`` and ``sigma`` belong to observations. ``spot`` maps each
    row to its observation in Laue data; otherwise rows and observations coincide.
    """

    rows: object
    keys: np.ndarray
    image_id: np.ndarray
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

    def reflections(self, anomalous, separate):
        """The distinct reflections of the rows and each row's position among them."""
        keys, first, refl = np.unique(self.keys, return_index=True, return_inverse=True)
        rows = self.rows
        flags = {}
        if {"CENTRIC", "EPSILON"} <= set(rows.columns):
            flags = {"centric": rows["CENTRIC"].to_numpy(bool)[first],
                     "epsilon": rows["EPSILON"].to_numpy(np.float32)[first]}
        reflections = Reflections.from_keys(keys, rows.spacegroup, rows.cell, anomalous, separate, **flags)
        return reflections, refl.ravel()


def check_table(X):
    """InputError unless X is an observation table with symmetry and the columns a model
    needs."""
    if not hasattr(X, "columns"):
        raise InputError(
            "X must be an observation table (an rs.DataSet from skmerge.read_unmerged), "
            f"not {type(X).__name__}."
        )
    missing = [] if "image_id" in X.columns else ["image_id"]
    if not ({"Hobs", "Kobs", "Lobs"} <= set(X.columns) or {"H", "K", "L"} <= set(X.columns)):
        missing.append("Hobs/Kobs/Lobs")
    if missing:
        raise InputError(f"X lacks column(s) {', '.join(missing)}; build it with skmerge.read_unmerged.")
    if len(X) == 0:
        raise InputError("X has no observations.")
    if getattr(X, "spacegroup", None) is None or getattr(X, "cell", None) is None:
        raise InputError("X has no space group or cell; build it with skmerge.read_unmerged.")


def check_compatible(X, reflections):
    """InputError unless X is in the space group of a fit's ``reflections`` and its cell is
    isomorphous with the fit's (tolerances of :func:`skmerge.symmetry.isomorphous`)."""
    fitted = reflections.spacegroup
    if X.spacegroup.xhm() != fitted.xhm():
        raise InputError(f"X is in space group {X.spacegroup.xhm()}, the merger was fitted in {fitted.xhm()}; "
                         "read X in the fit's space group (spacegroup=, on the command line --spacegroups).")
    if not isomorphous(reflections.cell, X.cell):
        raise InputError(f"X's cell {tuple(round(v, 2) for v in X.cell.parameters)} is not isomorphous with the "
                         f"fit's {tuple(round(v, 2) for v in reflections.cell.parameters)}; merge isomorphous data.")


def encode(X, y=None, *, anomalous, separate_files, harmonics=None):
    """Encode an observation table for a model.

    Parameters
    ----------
    X : rs.DataSet
        Observation table (:func:`skmerge.read_unmerged`).
    y : array-like, optional
        Intensities to use instead of ``X["Iobs"]``.
    anomalous, separate_files : bool
        Keep Friedel mates apart; give every file its own reflections.
    harmonics : dict, optional
        For Laue data, the keywords of :func:`skmerge.laue.expand_harmonics`
        (wavelength_key, wavelength_range, dmin) that expand X's spots; X is used as it
        is when it already holds harmonics (a ``spot_id`` column).

    Returns
    -------
    Observations
    """
    check_table(X)
    intensity, sigma = _intensities(X, y)
    rows, spot = X, None
    if harmonics is not None:
        from ..laue import SPOT_ID, expand_harmonics

        if SPOT_ID in X.columns:
            _, first, spot = np.unique(X[SPOT_ID].to_numpy(), return_index=True, return_inverse=True)
            intensity, sigma = intensity[first], sigma[first]
            # Rows of one spot next to each other, spots in order: evaluation chunks rely on it.
            order = np.argsort(spot.ravel(), kind="stable")
            rows, spot = X.iloc[order], spot.ravel()[order]
        else:
            rows = expand_harmonics(X, anomalous=anomalous, **harmonics)
            spot = rows[SPOT_ID].to_numpy()
        spot = spot.ravel()
    group = None
    if separate_files:
        if "file_id" not in rows.columns:
            raise InputError("separate_files=True needs a file_id column; build X with skmerge.read_unmerged.")
        group = rows["file_id"].to_numpy(np.int64)
    keys = pack_hkl(asu_hkl(rows, anomalous), group)
    return Observations(rows, keys, rows["image_id"].to_numpy(np.int64), intensity, sigma, spot)


def asu_hkl(X, anomalous):
    """The ASU Miller index of every row in the Friedel convention asked for.

    The table's own H, K, L are used when they are in that convention (a table read with
    ``anomalous=True`` serves a merger without it by folding the negated Friedel-minus
    indices back); the observed indices are mapped only when the table lacks H, K, L or
    was read without Friedel mates apart for an anomalous merger.
    """
    if {"H", "K", "L"} <= set(X.columns):
        hkl = X[["H", "K", "L"]].to_numpy(np.int32)
        unique, inverse = np.unique(pack_hkl(hkl), return_inverse=True)
        unique_hkl = unpack_hkl(unique)
        # Friedel-minus acentrics of an anomalous table carry a negated ASU index, which
        # lies outside the ASU.
        negated = ~np.asarray(rs.utils.in_asu(unique_hkl, X.spacegroup))
        if negated.any() == anomalous:
            return hkl
        if not anomalous:
            unique_hkl[negated] = -unique_hkl[negated]
            return unique_hkl[inverse.ravel()]
    if not {"Hobs", "Kobs", "Lobs"} <= set(X.columns):
        raise InputError("anomalous=True needs the observed indices Hobs, Kobs, Lobs; build X with "
                         "skmerge.read_unmerged(..., anomalous=True).")
    return map_to_asu(X[["Hobs", "Kobs", "Lobs"]].to_numpy(np.int32), X.spacegroup, anomalous)[0]


def _intensities(X, y):
    for column in ("Iobs", "SIGIobs"):
        if column not in X.columns and (column == "SIGIobs" or y is None):
            raise InputError(f"X lacks column {column!r}; build it with skmerge.read_unmerged.")
    intensity = X["Iobs"].to_numpy(np.float64) if y is None else np.asarray(y, dtype=np.float64).ravel()
    sigma = X["SIGIobs"].to_numpy(np.float64)
    if len(intensity) != len(X):
        raise InputError(f"y has {len(intensity)} values for {len(X)} observations.")
    bad = ~np.isfinite(intensity) | ~np.isfinite(sigma) | ~(sigma > 0)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise InputError(
            f"{int(bad.sum())} observation(s) have a non-finite intensity or σ, or σ ≤ 0 (first at row {first}: "
            f"{'Iobs' if y is None else 'y'}={intensity[first]}, SIGIobs={sigma[first]}); "
            "drop them (skmerge.read_unmerged(..., drop_invalid=True) does)."
        )
    return intensity, sigma


def laue_band(X, wavelength_key, wavelength_range):
    """The band(s) and resolution limit of the harmonic expansion, fixed at fit time so
    that every later expansion (held-out data, predictions) uses the same: the given
    range, else each file's smallest and largest wavelength; the data's smallest dHKL."""
    if wavelength_key not in X.columns:
        raise InputError(
            f"laue=True needs a wavelength column; {wavelength_key!r} is not one of "
            f"{', '.join(map(str, X.columns))}. Set wavelength_key= (--wavelength-key)."
        )
    if wavelength_range is not None:
        bands = tuple(float(v) for v in wavelength_range)
    else:
        wavelength = X[wavelength_key].to_numpy(np.float64)
        file_id = X["file_id"].to_numpy() if "file_id" in X.columns else np.zeros(len(X), int)
        bands = {
            int(f): (float(wavelength[file_id == f].min()), float(wavelength[file_id == f].max()))
            for f in np.unique(file_id)
        }
    return bands, float(X["dHKL"].min())


def tensor_data(refl, image, features, intensity, sigma, spot=None, image_inputs=None, log_known_scale=None,
                log_scale_variance=None):
    """The dict of tensors a :class:`~skmerge.model.training.MergingModel` reads
    (``image_inputs``: what an image encoder reads of each row besides its features;
    ``log_known_scale``: the log of a factor each row's scale is known to carry;
    ``log_scale_variance``: a variance each row's log scale has besides the scale
    model's own spread)."""
    from .._tf import tf

    data = {
        "refl": tf.constant(refl, tf.int32),
        "image": tf.constant(image, tf.int32),
        "features": tf.constant(features, tf.float32),
        "intensity": tf.constant(intensity, tf.float32),
        "sigma": tf.constant(sigma, tf.float32),
    }
    if spot is not None:
        data["spot"] = tf.constant(spot, tf.int32)
    if image_inputs is not None:
        data["image_inputs"] = tf.constant(image_inputs, tf.float32)
    if log_known_scale is not None:
        data["log_known_scale"] = tf.constant(log_known_scale, tf.float32)
    if log_scale_variance is not None:
        data["log_scale_variance"] = tf.constant(log_scale_variance, tf.float32)
    return data


def chunks(data):
    """Pieces of evaluation data of about EVAL_CHUNK rows, never splitting a spot; a
    table of every image's embedding (``image_embedding``) goes whole with each."""
    n_rows = int(data["refl"].shape[0])
    if n_rows <= EVAL_CHUNK:
        yield data
        return
    row_keys = [k for k in data if k not in ("intensity", "sigma", "image_embedding")]
    spot = data["spot"].numpy() if "spot" in data else np.arange(n_rows)
    start = 0
    while start < n_rows:
        stop = min(start + EVAL_CHUNK, n_rows)
        while stop < n_rows and spot[stop] == spot[stop - 1]:
            stop += 1
        first, last = spot[start], spot[stop - 1] + 1
        chunk = {k: data[k][start:stop] for k in row_keys}
        chunk["intensity"], chunk["sigma"] = data["intensity"][first:last], data["sigma"][first:last]
        if "spot" in data:
            chunk["spot"] = chunk["spot"] - first
        if "image_embedding" in data:
            chunk["image_embedding"] = data["image_embedding"]
        yield chunk
        start = stop
