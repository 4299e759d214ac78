"""Laue (polychromatic) data: the harmonic expansion of spots.

In a polychromatic beam, reflection h diffracts at wavelength λ and its multiples n·h at
λ/n along the same ray, so one spot on the detector can hold several harmonics. A spot
indexed H at wavelength λ has the fundamental H₀ = H/n₀ (n₀ = gcd of H's indices), which
diffracts at λ₁ = n₀·λ; its harmonic n·H₀ diffracts at λ₁/n. The spot holds every
harmonic whose wavelength lies in the beam's band and whose resolution is within the
data's limit.
"""

import numpy as np
import pandas as pd

from .errors import InputError
from .symmetry import systematically_absent
from .table import assemble_table, with_symmetry

SPOT_ID = "spot_id"
HARMONIC = "harmonic"
_TOLERANCE = 1e-6
_INDEX_COLUMNS = ("H", "K", "L", "Hobs", "Kobs", "Lobs", "asu_index", "CENTRIC", "EPSILON")


def expand_harmonics(X, *, wavelength_key="Wavelength", wavelength_range=None, dmin=None, anomalous=False):
    """One row per harmonic of every spot of an observation table.

    Parameters
    ----------
    X : rs.DataSet
        Observation table of Laue spots (:func:`skmerge.read_unmerged`), one row per spot,
        with a wavelength column.
    wavelength_key : str, default="Wavelength"
        Column with the wavelength (Å) at which each spot's indexed reflection diffracts.
    wavelength_range : (float, float) or dict, optional
        The band [λmin, λmax] of the beam in Å, or a dict from file_id to each file's
        band. By default the smallest and largest wavelength recorded in each file.
    dmin : float, optional
        Resolution limit in Å of the harmonics kept. By default the smallest dHKL of the
        spots.
    anomalous : bool, default=False
        Friedel convention of the H, K, L columns of the result.

    Returns
    -------
    rs.DataSet
        The observation table of the harmonics: Hobs, Kobs, Lobs (the harmonic's index),
        H, K, L, asu_index, CENTRIC, EPSILON and dHKL of the harmonic, the wavelength
        column set to the harmonic's wavelength, ``spot_id`` (the row of the spot in X)
        and ``harmonic`` (n). The spot's Iobs, SIGIobs, image and metadata are repeated on
        each of its rows. A spot keeps its indexed reflection even when that lies outside
        the band.

    Examples
    --------
    >>> from skmerge.datasets import make_unmerged
    >>> X, truth = make_unmerged(n_images=4, laue=True, random_state=0)
    >>> rows = expand_harmonics(X, wavelength_range=(0.9, 1.9), dmin=2.0)
    >>> bool((rows.groupby("spot_id").size() > 1).any())
    True
    """
    if wavelength_key not in X.columns:
        raise InputError(
            f"Laue data need a wavelength column; {wavelength_key!r} is not one of "
            f"{', '.join(map(str, X.columns))}. Pass wavelength_key=."
        )
    if SPOT_ID in X.columns:
        raise InputError("X is already expanded into harmonics (it has a spot_id column).")
    hkl = X[["Hobs", "Kobs", "Lobs"]].to_numpy(np.int64)
    wavelength = X[wavelength_key].to_numpy(np.float64)
    dhkl = X["dHKL"].to_numpy(np.float64)
    file_id = X["file_id"].to_numpy(np.int64)
    if not (np.isfinite(wavelength).all() and (wavelength > 0).all()):
        raise InputError(f"wavelength column {wavelength_key!r} must hold positive numbers.")
    low, high = _band(wavelength, file_id, wavelength_range)
    dmin = float(dhkl.min()) if dmin is None else float(dmin)

    n0 = np.gcd.reduce(np.abs(hkl), axis=1)
    lam1 = wavelength * n0
    d0 = dhkl * n0
    n_low = np.ceil(lam1 / high - _TOLERANCE).astype(np.int64)
    n_high = np.minimum(np.floor(lam1 / low + _TOLERANCE), np.floor(d0 / dmin + _TOLERANCE)).astype(np.int64)
    n_low, n_high = np.minimum(np.maximum(n_low, 1), n0), np.maximum(n_high, n0)

    count = n_high - n_low + 1
    spot = np.repeat(np.arange(len(X)), count)
    n = n_low[spot] + np.arange(len(spot)) - np.repeat(np.cumsum(count) - count, count)
    hkl_rows = (hkl[spot] // n0[spot][:, None]) * n[:, None]
    # Harmonics the space group forbids contribute nothing.
    allowed = ~systematically_absent(hkl_rows, X.spacegroup)
    spot, n, hkl_rows = spot[allowed], n[allowed], hkl_rows[allowed]
    rows = X.drop(columns=[c for c in _INDEX_COLUMNS if c in X.columns]).iloc[spot].reset_index(drop=True)
    rows = pd.DataFrame({c: rows[c].array for c in rows.columns})
    rows["dHKL"] = d0[spot] / n
    rows[wavelength_key] = (lam1[spot] / n).astype(np.float32)
    rows[SPOT_ID] = spot.astype(np.int32)
    rows[HARMONIC] = n.astype(np.int32)
    # The spots' image ids stay as given: numbered anew, the images of a subset of X (a
    # fold of whole images, one image) would become those of the first images of the fit.
    return assemble_table(with_symmetry(rows, hkl_rows.astype(np.int32), X.spacegroup, anomalous), X.spacegroup,
                          X.cell, image_id=rows["image_id"].to_numpy(np.int64))


def _band(wavelength, file_id, wavelength_range):
    """(λmin, λmax) of every spot: the given band, or its file's recorded extremes."""
    if wavelength_range is not None and not isinstance(wavelength_range, dict):
        low, high = (float(v) for v in wavelength_range)
        if not 0 < low < high:
            raise InputError(f"wavelength_range={wavelength_range!r} must be two increasing positive numbers.")
        return np.full(len(wavelength), low), np.full(len(wavelength), high)
    bands = dict(wavelength_range or {})
    files = np.unique(file_id)
    for f in files:
        bands.setdefault(int(f), (wavelength[file_id == f].min(), wavelength[file_id == f].max()))
    lows = np.array([bands[int(f)][0] for f in files])
    highs = np.array([bands[int(f)][1] for f in files])
    row = np.searchsorted(files, file_id)
    return lows[row], highs[row]


def read_spectrum(path):
    """The incident spectrum of a text file of two columns, wavelength in Å and relative
    flux (careless's ``--spectral-file``), separated by spaces, tabs or commas; lines
    starting with ``#`` are comments.

    Returns
    -------
    ndarray of shape (n, 2)
        Wavelength and flux, sorted by wavelength.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "spectrum.txt"
    >>> _ = path.write_text("# wavelength flux\\n1.2, 0.5\\n1.0, 1.0\\n")
    >>> read_spectrum(path)
    array([[1. , 1. ],
           [1.2, 0.5]])
    """
    try:
        with open(path) as handle:
            lines = [line.replace(",", " ").split() for line in handle if line.strip() and not line.lstrip()
                     .startswith("#")]
        table = np.array(lines, dtype=np.float64)
    except OSError as exc:
        raise InputError(f"spectral file {path}: {exc.strerror or exc}") from None
    except ValueError:
        raise InputError(f"spectral file {path}: every line must hold two numbers, wavelength (Å) and flux") from None
    check_spectrum(table, f"spectral file {path}")
    return table[np.argsort(table[:, 0], kind="stable")]


def check_spectrum(spectrum, where="spectrum"):
    """InputError unless ``spectrum`` is a table of (wavelength > 0, flux ≥ 0) rows, at
    least two, with distinct wavelengths and some flux."""
    table = np.asarray(spectrum, dtype=np.float64) if np.size(spectrum) else np.zeros((0, 2))
    if table.ndim != 2 or table.shape[1] != 2 or len(table) < 2:
        raise InputError(f"{where}: give at least two rows of two numbers, wavelength (Å) and flux "
                         f"(got shape {table.shape})")
    if not np.isfinite(table).all() or (table[:, 0] <= 0).any() or (table[:, 1] < 0).any():
        raise InputError(f"{where}: wavelengths must be positive and fluxes finite and not negative")
    if len(np.unique(table[:, 0])) < len(table) or not (table[:, 1] > 0).any():
        raise InputError(f"{where}: wavelengths must be distinct, and some flux positive")
    return table


def log_known_scale(rows, wavelength_key, spectrum=None, lorentz_correction=False):
    """The log of the factors a Laue harmonic's intensity is known to carry: the flux of
    the incident spectrum at its wavelength (interpolated linearly, the edge values
    beyond the table), and the Lorentz factor λ⁴/sin²θ = 4λ²d² of a stationary crystal
    in a polychromatic beam. None when neither is asked for.

    Raises InputError when the spectrum has no flux at a harmonic's wavelength.

    Examples
    --------
    >>> import pandas as pd
    >>> rows = pd.DataFrame({"Wavelength": [1.0, 1.5], "dHKL": [2.0, 2.0]})
    >>> np.exp(log_known_scale(rows, "Wavelength", [[1.0, 2.0], [2.0, 1.0]], lorentz_correction=True))
    array([32., 54.])
    """
    if spectrum is None and not lorentz_correction:
        return None
    wavelength = rows[wavelength_key].to_numpy(np.float64)
    log_scale = np.zeros(len(rows))
    if spectrum is not None:
        table = np.asarray(spectrum, dtype=np.float64)
        order = np.argsort(table[:, 0])
        flux = np.interp(wavelength, table[order, 0], table[order, 1])
        dark = flux <= 0
        if dark.any():
            raise InputError(f"the spectrum has no flux at {int(dark.sum())} harmonic(s) between "
                             f"{wavelength[dark].min():.3f} and {wavelength[dark].max():.3f} Å; give a positive flux "
                             "over the whole band (--wavelength-range)")
        log_scale += np.log(flux)
    if lorentz_correction:
        log_scale += np.log(4.0 * wavelength**2 * rows["dHKL"].to_numpy(np.float64) ** 2)
    return log_scale
