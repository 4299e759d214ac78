"""Simulated diffraction data with known truth.

:func:`make_unmerged` runs the experiment forwards: true amplitudes drawn from the Wilson
distribution, a crystal rotated in the beam (or held still in a polychromatic beam), the
reflections that meet the Ewald sphere recorded on a flat detector, and each observation's
intensity multiplied by a physically shaped scale and given Poisson-like noise. Every
quantity skmerge estimates is returned alongside, so tests can score a merge against the
truth instead of against another program.
"""

import math
from contextlib import nullcontext
from pathlib import Path

import gemmi
import numpy as np
import pandas as pd
import reciprocalspaceship as rs
from scipy.spatial.transform import Rotation
from sklearn.utils import Bunch, check_random_state

from .ambiguity import transform_hkl
from .errors import InputError
from .store import StoreWriter
from .symmetry import lookup_hkl, map_to_asu, pack_hkl, reflection_flags, systematically_absent, unique_hkl, unpack_hkl
from .table import ReadOptions, parse_part, read_unmerged

_DETECTOR_DISTANCE_MM = 150.0
_PIXEL_MM = 0.1
_BACKGROUND = 20.0  # photons under a spot, sets the noise floor of weak reflections
_ERROR_FRACTION = 0.02  # multiplicative error of every measurement


def make_unmerged(
    n_images=180,
    *,
    spacegroup="P 21 21 21",
    cell=(40.0, 50.0, 60.0, 90.0, 90.0, 90.0),
    dmin=2.0,
    oscillation=1.0,
    wavelength=1.0,
    wilson_b=15.0,
    mean_intensity=300.0,
    anomalous=False,
    anomalous_signal=0.05,
    laue=False,
    stills=False,
    mosaicity=0.002,
    mosaicity_spread=0.0,
    reindexed_fraction=0.0,
    wavelength_range=(0.9, 1.9),
    resolve_harmonics=False,
    outlier_fraction=0.0,
    beamstop_arm=False,
    time_points=1,
    changed_fraction=1.0,
    change=0.3,
    random_state=None,
    store=None,
    chunk_images=100,
):
    """Simulate an unmerged data set and return it with the truth behind it.

    Monochromatic mode (the default) simulates a rotation experiment: the crystal turns by
    ``oscillation`` degrees per image about an axis perpendicular to the beam, and each
    reflection is recorded on the image during which it crosses the Ewald sphere. Stills
    mode (serial crystallography) shows every image a crystal in a random orientation that
    does not move: each reflection near the Ewald sphere is recorded with the partiality
    of its distance from it, which the data do not tell (the ``EWALD_OFFSET`` column
    gives the distance, as CrystFEL streams do). Laue
    mode holds the crystal still during each image (turning it by ``oscillation`` between
    images) in a beam spanning ``wavelength_range``; reflections whose directions coincide
    (the harmonics n·h) land on one spot whose intensity is their sum.

    The scale of an observation is the product of a smooth function of the rotation angle
    (beam intensity, illuminated volume, absorption), a per-image Wilson B that grows with
    exposure (radiation damage), a detector-position factor (absorption and polarisation
    across the detector), in Laue mode a source spectrum over wavelength, and 2 %
    image-to-image jitter (stills: a 30 % spread of crystal volumes, no decay, and the
    partiality). Reported σ follow counting statistics plus a 2 % error, and
    ``outlier_fraction`` of the observations are replaced by gross outliers (zingers and
    shadowed spots). ``beamstop_arm`` adds the shadow of a beam-stop arm: a stripe 40
    pixels wide from the beam to the detector's edge in which every spot keeps 0.5–10 %
    of its intensity, as on an unmasked detector.

    Parameters
    ----------
    n_images : int, default=180
        Number of images.
    spacegroup : str, default="P 21 21 21"
    cell : sequence of 6 floats, default=(40, 50, 60, 90, 90, 90)
    dmin : float, default=2.0
        Resolution limit in Å.
    oscillation : float, default=1.0
        Degrees of rotation per image (monochromatic) or between images (Laue).
    wavelength : float, default=1.0
        Wavelength in Å of the monochromatic beam.
    wilson_b : float, default=15.0
        Overall B factor of the true intensities, ⟨I⟩ ∝ exp(−B / (2 d²)).
    mean_intensity : float, default=300.0
        Mean photon count of a reflection at low resolution (sets the signal-to-noise
        ratio and the magnitude of the numbers).
    anomalous : bool, default=False
        Give acentric Friedel mates different amplitudes and keep them apart in the
        observation table.
    anomalous_signal : float, default=0.05
        Relative standard deviation of F(+) and F(−) about their mean.
    laue : bool, default=False
        Simulate a polychromatic (Laue) experiment.
    stills : bool, default=False
        Simulate serial stills (monochromatic, one random orientation per image).
    mosaicity : float, default=0.002
        Stills: the width in Å⁻¹ of the Gaussian partiality of a reflection against its
        distance from the Ewald sphere (mosaic spread and beam bandwidth together); sets
        the number of reflections per image.
    mosaicity_spread : float, default=0.0
        Stills: the log-normal spread of each image's partiality width about
        ``mosaicity`` (crystals differ in mosaic spread, shots in bandwidth), which the
        data do not report; 0 gives every image the same width.
    reindexed_fraction : float, default=0.0
        Fraction of the images (chosen at random) whose reported indices are
        transformed by a twin law of the lattice (:func:`gemmi.find_twin_laws`, one
        chosen at random per image): the indexing ambiguity of serial data. The true
        amplitudes stay those of the original indices.
    wavelength_range : (float, float), default=(0.9, 1.9)
        Band of the polychromatic beam in Å (Laue mode).
    resolve_harmonics : bool, default=False
        Laue mode with an idealised detector that records every harmonic as a spot of
        its own: the same crystal and images without harmonic overlap.
    outlier_fraction : float, default=0.0
        Fraction of observations replaced by gross outliers.
    beamstop_arm : bool, default=False
        Shadow the spots behind a beam-stop arm (``truth.shadowed`` says which).
    time_points : int, default=1
        Repeat the experiment on this many states of the crystal (a time-resolved
        series, one file each: ``file_id`` 0, 1, …), each pass in a new orientation.
        Every later state differs from the first in ``changed_fraction`` of its
        reflections, whose structure factors change by a random amount of
        root-mean-square size ``change``·√(εΣ) (complex for acentric reflections),
        as a partial structural change does. With every reflection changed, the pair
        follows the double-Wilson law with r = 1/√(1 + change²).
    changed_fraction : float, default=1.0
    change : float, default=0.3
    random_state : int, RandomState instance or None
        Makes the simulation repeatable.
    store : path, optional
        Write the observations as an observation store at this path instead
        (:mod:`skmerge.store`), simulating and writing ``chunk_images`` images at a
        time, so that memory does not grow with ``n_images``.
    chunk_images : int, default=100
        Images simulated at a time with ``store``. The store holds the same table as
        the returned ``X`` would when ``chunk_images ≥ n_images``; with smaller chunks
        the random draws differ after the first chunk (the same crystal and first pass
        of observations, with other noise).

    Returns
    -------
    X : rs.DataSet or pathlib.Path
        Observation table as :func:`skmerge.read_unmerged` builds it, with metadata
        columns BATCH, ROT (degrees), XDET and YDET (pixels) and, in Laue mode,
        Wavelength (Å). In Laue mode each row is a spot, indexed by its lowest harmonic.
    truth : Bunch
        ``merged``: rs.DataSet indexed by the ASU H, K, L of every reflection observed
        (every harmonic in Laue mode), with F, I (= F²), CENTRIC, EPSILON, dHKL and, when anomalous, F(+), F(-), DANO.
        ``scale``: the true scale of each row of X (of its reported harmonic in Laue mode).
        ``Itrue``: the noise-free intensity of each row. ``outlier``: which rows are gross
        outliers. ``shadowed``: which rows lie behind the beam-stop arm. With several ``time_points``, ``merged`` holds every state's
        reflections with a ``file_id`` column and DF = F − F of the first state. In Laue
        mode also ``harmonics``: one row per harmonic of every spot
        (``spot``, ASU H, K, L, n, Wavelength, scale, I). ``image_operator``: per
        image_id, the operator (an h,k,l triplet; "h,k,l" when unchanged) that
        transformed its reported indices. With ``store``, ``X`` is the
        store's path and ``truth`` holds ``merged`` alone (the per-row truth would grow
        with the data).

    Examples
    --------
    >>> from skmerge.datasets import make_unmerged
    >>> X, truth = make_unmerged(n_images=60, random_state=0)
    >>> X.shape[0] > 10000
    True
    """
    rng = check_random_state(random_state)
    sg = gemmi.SpaceGroup(spacegroup)
    uc = gemmi.UnitCell(*cell)
    if not uc.is_compatible_with_spacegroup(sg, 1e-3):
        raise InputError(f"cell={tuple(cell)} is incompatible with space group {spacegroup}.")
    if not 0.0 <= outlier_fraction < 1.0:
        raise InputError(f"outlier_fraction={outlier_fraction} must lie in [0, 1).")

    if mosaicity_spread < 0 or (mosaicity_spread and not stills):
        raise InputError(f"mosaicity_spread={mosaicity_spread} needs stills=True and a spread ≥ 0.")
    if stills and laue:
        raise InputError("stills=True simulates monochromatic stills; laue=True already holds the crystal still.")
    # Known for every monochromatic lattice, so that a simulation draws the same numbers
    # (and the same noise) whatever its reindexed_fraction.
    twin_laws = [] if laue else gemmi.find_twin_laws(uc, sg, 3.0, False)
    if reindexed_fraction:
        if laue or not twin_laws or not 0.0 <= reindexed_fraction <= 1.0:
            raise InputError(f"reindexed_fraction={reindexed_fraction} needs a fraction in [0, 1], monochromatic data "
                             f"and a lattice with twin laws; {spacegroup} with cell {tuple(cell)} has "
                             f"{len(twin_laws)}.")
    if int(time_points) < 1 or not 0.0 <= changed_fraction <= 1.0:
        raise InputError(f"time_points={time_points} must be ≥ 1 and changed_fraction={changed_fraction} in [0, 1].")

    sphere = _reflections_in_sphere(uc, sg, dmin)
    amplitudes = _wilson_amplitudes(sphere, sg, uc, wilson_b, anomalous_signal if anomalous else 0.0, rng)
    experiment = dict(n_images=n_images, dmin=dmin, oscillation=oscillation, wavelength=wavelength,
                      mean_intensity=mean_intensity, anomalous=anomalous, laue=laue, stills=stills, mosaicity=mosaicity,
                      mosaicity_spread=mosaicity_spread,
                      wavelength_range=wavelength_range, resolve_harmonics=resolve_harmonics,
                      outlier_fraction=outlier_fraction, beamstop_arm=beamstop_arm, twin_laws=twin_laws,
                      reindexed_fraction=reindexed_fraction)
    writer = None if store is None else StoreWriter(store, anomalous=anomalous)
    chunk = n_images if writer is None else int(chunk_images)
    if chunk < 1:
        raise InputError(f"chunk_images={chunk_images} must be a positive number of images.")
    states, observed, passes = [], [], []
    with writer or nullcontext():
        for time_point in range(int(time_points)):
            if time_point:
                amplitudes = _changed(states[0], changed_fraction, change, rng)
            states.append(amplitudes)
            keys = []
            with writer.file(time_point, f"<simulated pass {time_point}>", "simulated", uc, sg) if writer \
                    else nullcontext() as file:
                for result in _experiment(amplitudes, sphere, sg, uc, rng, chunk_images=chunk, **experiment):
                    keys.append(np.unique(pack_hkl(result["harmonics"]["hkl"] if laue else result["obs"]["hkl"])))
                    if file is None:
                        passes.append(result)
                        continue
                    part = parse_part(time_point, result["raw"], ReadOptions(anomalous=anomalous))
                    _check_nothing_dropped(len(part.table), len(result["raw"]))
                    file.write(part.table, part.removed)
            observed.append(unpack_hkl(np.unique(np.concatenate(keys))))
        if writer is not None:
            writer.commit(sg, uc, ReadOptions(anomalous=anomalous))

    tables = []
    for time_point, state in enumerate(states):
        table = _truth_table(state, observed[time_point], sg, uc, anomalous)
        if time_points > 1:
            table["file_id"] = np.int32(time_point)
            table["DF"] = table["F"].to_numpy() - _truth_table(states[0], observed[time_point], sg, uc,
                                                               anomalous)["F"].to_numpy()
        tables.append(table)
    merged = tables[0] if time_points == 1 else rs.concat(tables).infer_mtz_dtypes()
    if writer is not None:
        return Path(store), Bunch(merged=merged)

    X = read_unmerged([p["raw"] for p in passes], anomalous=anomalous)
    _check_nothing_dropped(len(X), sum(len(p["raw"]) for p in passes))
    truth = Bunch(**{key: np.concatenate([p[key] for p in passes])
                     for key in ("scale", "Itrue", "outlier", "shadowed", "image_operator")})
    truth.merged = merged
    if laue:
        truth.harmonics = pd.concat([p["harmonics_table"] for p in passes], ignore_index=True)
    return X, truth


def _check_nothing_dropped(n_table, n_simulated):
    if n_table != n_simulated:
        raise AssertionError("the simulator produced observations the table builder dropped")


def simulate_intensities(X, *, wilson_b=15.0, mean_intensity=300.0, partiality_key=None, random_state=None):
    """Observations of a real experiment with simulated intensities of known truth.

    Keeps everything of the table X (the indices, images, metadata: the geometry of a
    real experiment) and replaces Iobs and SIGIobs by measurements of Wilson-random
    amplitudes in X's space group, with a smooth scale over the images, a resolution
    falloff, the partiality of column ``partiality_key`` when given, and the noise of
    :func:`make_unmerged`.

    Parameters
    ----------
    X : rs.DataSet
        Observation table (:func:`skmerge.read_unmerged`).
    wilson_b, mean_intensity : float
        As in :func:`make_unmerged`.
    partiality_key : str, optional
        Column holding each observation's recorded fraction (e.g. FRACTIONCALC).
    random_state : int, RandomState instance or None

    Returns
    -------
    X : rs.DataSet
        A copy of X with the simulated Iobs and SIGIobs.
    truth : Bunch
        ``merged`` (true F and I per ASU reflection of the observed indices, Friedel mates
        merged), ``scale`` and ``Itrue`` per row.

    Examples
    --------
    >>> from skmerge.datasets import make_unmerged, simulate_intensities
    >>> X, _ = make_unmerged(n_images=5, dmin=3.0, random_state=0)
    >>> X_sim, truth = simulate_intensities(X, random_state=1)
    >>> bool((X_sim["Iobs"] != X["Iobs"]).any()), len(truth.scale) == len(X)
    (True, True)
    """
    rng = check_random_state(random_state)
    hkl = X[["Hobs", "Kobs", "Lobs"]].to_numpy(np.int32)
    sg, uc = X.spacegroup, X.cell
    amplitudes = _wilson_amplitudes(unique_hkl(map_to_asu(hkl, sg)[0])[0], sg, uc, wilson_b, 0.0, rng)
    f = _amplitude_of(amplitudes, hkl, sg, False)
    _, image = np.unique(X["image_id"].to_numpy(np.int64), return_inverse=True)
    image = image.ravel()
    n_images = int(image.max()) + 1
    image_scale = np.exp(0.3 * np.sin(2 * np.pi * np.arange(n_images) / n_images) + 0.02 * rng.standard_normal(n_images))
    d = X["dHKL"].to_numpy(np.float64)
    scale = mean_intensity * image_scale[image] * np.exp(-4.0 * np.arange(n_images)[image] / n_images / (2 * d**2))
    if partiality_key is not None:
        scale = scale * X[partiality_key].to_numpy(np.float64)
    i_true = scale * f**2
    sigma = np.sqrt(np.maximum(i_true, 0.0) + _BACKGROUND + (_ERROR_FRACTION * i_true) ** 2)
    X = X.copy()
    X["Iobs"] = rs.DataSeries((i_true + sigma * rng.standard_normal(len(X))).astype(np.float32), dtype="Intensity",
                              index=X.index)
    X["SIGIobs"] = rs.DataSeries(sigma.astype(np.float32), dtype="Stddev", index=X.index)
    return X, Bunch(merged=_truth_table(amplitudes, hkl, sg, uc, False), scale=scale, Itrue=i_true)


def _changed(amplitudes, fraction, change, rng):
    """The amplitudes of a later state: ``fraction`` of the reflections get a random
    change of their structure factor whose root-mean-square size is ``change``·√(εΣ)
    (complex for acentric, real for centric reflections), as atoms that move or change
    occupancy add; both Friedel halves get the same change."""
    n = len(amplitudes["hkl"])
    changed = rng.random_sample(n) < fraction
    size = np.where(changed, change * np.sqrt(amplitudes["variance"]), 0.0)
    centric = amplitudes["centric"]
    real = size * np.where(centric, 1.0, math.sqrt(0.5)) * rng.standard_normal(n)
    imag = np.where(centric, 0.0, size * math.sqrt(0.5) * rng.standard_normal(n))
    return {**amplitudes, "plus": np.hypot(amplitudes["plus"] + real, imag),
            "minus": np.hypot(amplitudes["minus"] + real, imag)}


def _experiment(amplitudes, sphere, sg, uc, rng, *, n_images, dmin, oscillation, wavelength, mean_intensity,
                anomalous, laue, stills, mosaicity, mosaicity_spread, wavelength_range, resolve_harmonics,
                outlier_fraction, beamstop_arm, twin_laws, reindexed_fraction, chunk_images):
    """One pass of the experiment on a crystal with ``amplitudes``, ``chunk_images`` images
    at a time: yields the raw observations of each chunk (an unmerged ``rs.DataSet``) and
    their truth. The crystal, the image scales, the stills' orientations and the images'
    reindexing operators are drawn first, so the observations do not depend on the
    chunks; only the noise is drawn chunk by chunk."""
    orientation = Rotation.random(random_state=rng).as_matrix()
    reciprocal = sphere @ np.array(uc.frac.mat) @ orientation.T
    if stills:
        rotations = Rotation.random(n_images, random_state=rng).as_matrix()
        image_scale = np.exp(0.3 * rng.standard_normal(n_images))
        decay_b = np.zeros(n_images)
        widths = np.full(n_images, float(mosaicity))
        if mosaicity_spread:  # drawn only then, so that the other simulations draw the same numbers
            widths *= np.exp(mosaicity_spread * rng.standard_normal(n_images))
    else:
        image_scale = np.exp(
            0.3 * np.sin(2 * np.pi * np.arange(n_images) / max(n_images, 1) + 0.5)
            - 0.2 * np.arange(n_images) / max(n_images, 1)
            + 0.02 * rng.standard_normal(n_images)
        )
        decay_b = 8.0 * np.arange(n_images) / max(n_images, 1)
    reindexing = _image_operators(n_images, twin_laws, reindexed_fraction, rng)

    def scale_of(image, d, x, y, lam=None):
        r2 = ((x - 1500.0) ** 2 + (y - 1500.0) ** 2) / 1500.0**2
        s = image_scale[image] * np.exp(-decay_b[image] / (2 * d**2))
        s = s * (1.0 - 0.25 * r2 + 0.08 * (x - 1500.0) / 1500.0)
        if laue:
            lo, hi = wavelength_range
            centre, width = lo + 0.35 * (hi - lo), 0.3 * (hi - lo)
            s = s * np.exp(-0.5 * ((lam - centre) / width) ** 2)
        return mean_intensity * s

    for start in range(0, n_images, chunk_images):
        images = range(start, min(start + chunk_images, n_images))
        if stills:
            obs = _still_observations(sphere, reciprocal, images, rotations, wavelength, widths)
            harmonics = None
        elif laue:
            obs, harmonics = _laue_spots(sphere, reciprocal, images, oscillation, wavelength_range, dmin, uc)
            if resolve_harmonics:
                obs, harmonics = _resolved(harmonics, oscillation)
        else:
            obs = _rotation_observations(sphere, reciprocal, n_images, images, oscillation, wavelength)
            harmonics = None
        result = _observe(obs, harmonics, amplitudes, sg, uc, rng, scale_of, reindexing, anomalous=anomalous,
                          outlier_fraction=outlier_fraction, beamstop_arm=beamstop_arm)
        result["image_operator"] = reindexing[0][reindexing[1][list(images)]]
        yield result


def _observe(obs, harmonics, amplitudes, sg, uc, rng, scale_of, reindexing, *, anomalous, outlier_fraction,
             beamstop_arm=False):
    """The measured intensities of the reflections ``obs`` (and, in Laue mode, their
    ``harmonics``) of some images, as an unmerged ``rs.DataSet`` with their truth; the
    indices reported as ``reindexing`` (:func:`_image_operators`) says."""
    laue = harmonics is not None
    if laue:
        f2 = _amplitude_of(amplitudes, harmonics["hkl"], sg, anomalous) ** 2
        h_scale = scale_of(harmonics["image"], harmonics["d"], harmonics["x"], harmonics["y"], harmonics["lam"])
        i_true = np.bincount(harmonics["spot"], weights=h_scale * f2, minlength=len(obs["image"]))
        scale = h_scale[harmonics["first"]]
    else:
        f = _amplitude_of(amplitudes, obs["hkl"], sg, anomalous)
        scale = scale_of(obs["image"], obs["d"], obs["x"], obs["y"]) * obs.get("partiality", 1.0)
        i_true = scale * f**2

    shadowed = _behind_arm(obs["x"], obs["y"]) if beamstop_arm else np.zeros(len(i_true), dtype=bool)
    # Drawn only with the arm, so that other simulations draw the same numbers.
    kept = rng.uniform(0.005, 0.1, shadowed.sum()) if beamstop_arm else 1.0
    i_spot = i_true.copy()
    i_spot[shadowed] *= kept
    sigma = np.sqrt(np.maximum(i_spot, 0.0) + _BACKGROUND + (_ERROR_FRACTION * i_spot) ** 2)
    i_obs = i_spot + sigma * rng.standard_normal(len(i_true))
    outlier = rng.random_sample(len(i_true)) < outlier_fraction
    if outlier.any():
        zinger = rng.random_sample(outlier.sum()) < 0.7
        i_obs[outlier] = np.where(
            zinger,
            i_true[outlier] * rng.uniform(3.0, 10.0, outlier.sum()) + 10 * sigma[outlier],
            i_true[outlier] * rng.uniform(0.0, 0.2, outlier.sum()),
        )

    reported = _reported(obs["hkl"], obs["image"], *reindexing)
    raw = rs.DataSet(
        {
            "H": reported[:, 0],
            "K": reported[:, 1],
            "L": reported[:, 2],
            "BATCH": obs["image"] + 1,
            "I": i_obs.astype(np.float32),
            "SIGI": sigma.astype(np.float32),
            "ROT": obs["phi"].astype(np.float32),
            "XDET": obs["x"].astype(np.float32),
            "YDET": obs["y"].astype(np.float32),
            **({"Wavelength": obs["lam"].astype(np.float32)} if laue else {}),
            **({"EWALD_OFFSET": obs["offset"].astype(np.float32)} if "offset" in obs else {}),
        },
        spacegroup=sg,
        cell=uc,
        merged=False,
    ).infer_mtz_dtypes()
    result = {"raw": raw, "obs": obs, "harmonics": harmonics, "scale": scale, "Itrue": i_true, "outlier": outlier,
              "shadowed": shadowed}
    if laue:
        asu, _ = map_to_asu(harmonics["hkl"], sg, anomalous)
        result["harmonics_table"] = pd.DataFrame(
            {
                "spot": harmonics["spot"],
                "H": asu[:, 0],
                "K": asu[:, 1],
                "L": asu[:, 2],
                "n": harmonics["n"],
                "Wavelength": harmonics["lam"],
                "scale": h_scale,
                "I": h_scale * f2,
            }
        )
    return result


def _reflections_in_sphere(cell, spacegroup, dmin):
    """Every allowed Miller index (both Friedel mates) with d ≥ dmin."""
    # |h| = |q·a| ≤ |a|/d bounds each index by the cell edge over the resolution.
    hmax, kmax, lmax = (int(np.floor(x / dmin)) for x in cell.parameters[:3])
    h, k, l = np.meshgrid(
        np.arange(-hmax, hmax + 1), np.arange(-kmax, kmax + 1), np.arange(-lmax, lmax + 1), indexing="ij"
    )
    hkl = np.stack([h.ravel(), k.ravel(), l.ravel()], axis=1).astype(np.int32)
    hkl = hkl[np.abs(hkl).sum(axis=1) > 0]
    hkl = hkl[cell.calculate_d_array(hkl) >= dmin]
    return hkl[~systematically_absent(hkl, spacegroup)]


def _wilson_amplitudes(sphere, spacegroup, cell, wilson_b, anomalous_signal, rng):
    """True F(+) and F(−) of every ASU reflection, from the Wilson distribution.

    Returns a dict from the packed ASU key to (F+, F−)."""
    asu, _ = map_to_asu(sphere, spacegroup, anomalous=False)
    unique, _ = unique_hkl(asu)
    centric, epsilon = reflection_flags(unique, spacegroup)
    d = cell.calculate_d_array(unique)
    variance = epsilon * np.exp(-wilson_b / (2 * d**2))
    # Acentric: E = |complex Gaussian| (Rayleigh); centric: |real Gaussian| (half-normal).
    real = rng.standard_normal(len(unique))
    imag = rng.standard_normal(len(unique))
    f = np.where(
        centric,
        np.abs(real) * np.sqrt(variance),
        np.hypot(real, imag) * np.sqrt(variance / 2),
    )
    delta = np.clip(anomalous_signal * rng.standard_normal(len(unique)), -0.5, 0.5)
    delta[centric] = 0.0
    return {"hkl": unique, "plus": f * (1 + delta), "minus": f * (1 - delta), "centric": centric,
            "variance": variance}


def _amplitude_of(amplitudes, hkl, spacegroup, anomalous):
    asu, minus = map_to_asu(hkl, spacegroup, anomalous=False)
    row = lookup_hkl(amplitudes["hkl"], asu)
    if not anomalous:
        return 0.5 * (amplitudes["plus"][row] + amplitudes["minus"][row])
    return np.where(minus, amplitudes["minus"][row], amplitudes["plus"][row])


def _rotation_observations(sphere, reciprocal, n_images, images, oscillation, wavelength):
    """Reflections crossing the Ewald sphere during ``images`` (a range) while the crystal
    turns about the x axis by ``oscillation`` degrees per image.

    The beam runs along +z, so the diffraction condition |s0 + q| = 1/λ reads
    q_z = −λ|q|²/2. Turning q by φ about x gives q_z(φ) = r cos(φ − α) with
    r = √(q_y² + q_z²), α = atan2(q_y, q_z): two crossings per turn where |c| ≤ r.
    """
    q2 = (reciprocal**2).sum(axis=1)
    c = -wavelength * q2 / 2
    r = np.hypot(reciprocal[:, 1], reciprocal[:, 2])
    alpha = np.arctan2(reciprocal[:, 1], reciprocal[:, 2])
    reachable = np.flatnonzero(np.abs(c) < r)
    total = n_images * oscillation
    rows, phi = [], []
    for sign in (1.0, -1.0):
        crossing = alpha[reachable] + sign * np.arccos(c[reachable] / r[reachable])
        angle = np.degrees(crossing) % 360.0
        for turn in range(int(np.ceil(total / 360.0))):
            a = angle + 360.0 * turn
            image = np.minimum((a / oscillation).astype(np.int64), n_images - 1)
            recorded = (a < total) & (image >= images.start) & (image < images.stop)
            rows.append(reachable[recorded])
            phi.append(a[recorded])
    rows, phi = np.concatenate(rows), np.concatenate(phi)
    order = np.argsort(phi, kind="stable")
    rows, phi = rows[order], phi[order]
    x, y = _detector_position(_rotate_x(reciprocal[rows], np.radians(phi)), wavelength)
    return {
        "hkl": sphere[rows],
        "phi": phi,
        "image": np.minimum((phi / oscillation).astype(np.int64), n_images - 1),
        "d": 1 / np.sqrt(q2[rows]),
        "x": x,
        "y": y,
    }


def _still_observations(sphere, reciprocal, images, rotations, wavelength, widths):
    """Reflections near the Ewald sphere of still crystals in the given orientations.

    The distance of q from the sphere is ε = |s0 + q| − 1/λ (beam along +z); a
    reflection is recorded when |ε| < 3w, with partiality exp(−ε²/(2w²)), w the image's
    partiality width (``widths``, one per image).
    """
    q2 = (reciprocal**2).sum(axis=1)
    d = 1 / np.sqrt(q2)
    parts = []
    for image in images:
        rotation = rotations[image]
        # Only the beam component of q decides the distance from the sphere.
        q_beam = reciprocal @ rotation[2]
        offset = np.sqrt(1.0 / wavelength**2 + q2 + 2 * q_beam / wavelength) - 1.0 / wavelength
        rows = np.flatnonzero(np.abs(offset) < 3 * widths[image])
        x, y = _detector_position(reciprocal[rows] @ rotation.T, wavelength)
        parts.append((rows, np.full(len(rows), image), offset[rows], x, y))
    rows, image, offset, x, y = (np.concatenate(a) for a in zip(*parts))
    return {"hkl": sphere[rows], "phi": np.zeros(len(rows)), "image": image, "d": d[rows], "x": x, "y": y,
            "offset": offset, "partiality": np.exp(-0.5 * (offset / widths[image]) ** 2)}


def _image_operators(n_images, twin_laws, fraction, rng):
    """The reindexing of a pass: the operators (identity first) and which of them
    transforms each image's reported indices (``fraction`` of the images get a twin law
    chosen at random)."""
    choice = np.zeros(n_images, np.int64)
    if twin_laws:
        # Drawn from a stream of their own: the rest of the simulation does not depend
        # on the fraction.
        own = np.random.RandomState(rng.randint(2**31 - 1))
        chosen = own.random_sample(n_images) < fraction
        choice[chosen] = 1 + own.randint(len(twin_laws), size=int(chosen.sum()))
    operators = [gemmi.Op("x,y,z"), *twin_laws]
    return np.array([op.as_hkl().triplet() for op in operators], dtype=object), choice, operators


def _reported(hkl, image, names, choice, operators):
    """The indices as reported: each image's transformed by its operator."""
    reported = np.array(hkl, dtype=np.int32)
    for k, op in enumerate(operators[1:], start=1):
        rows = choice[image] == k
        reported[rows] = transform_hkl(hkl[rows], op)
    return reported


def _rotate_x(q, angle):
    cos, sin = np.cos(angle), np.sin(angle)
    return np.stack([q[:, 0], cos * q[:, 1] - sin * q[:, 2], sin * q[:, 1] + cos * q[:, 2]], axis=1)


def _behind_arm(x, y):
    """Whether the pixels (x, y) lie behind the beam-stop arm: a stripe 40 pixels wide
    from the beam (1500, 1500) towards the detector's upper left corner."""
    along = (1500.0 - np.asarray(x)) + (np.asarray(y) - 1500.0)
    across = (1500.0 - np.asarray(x)) - (np.asarray(y) - 1500.0)
    return (along > 0) & (np.abs(across) < 20.0 * np.sqrt(2.0))


def _detector_position(q_lab, wavelength):
    """Pixel position on a flat detector normal to the beam of the diffracted ray."""
    s1 = q_lab + np.array([0.0, 0.0, 1.0]) / np.asarray(wavelength).reshape(-1, 1)
    forward = np.maximum(s1[:, 2], 1e-6)
    x = _DETECTOR_DISTANCE_MM * s1[:, 0] / forward / _PIXEL_MM + 1500.0
    y = _DETECTOR_DISTANCE_MM * s1[:, 1] / forward / _PIXEL_MM + 1500.0
    return x, y


def _laue_spots(sphere, reciprocal, images, oscillation, wavelength_range, dmin, cell):
    """Spots of a still crystal in a polychromatic beam on ``images`` (image i at the
    orientation turned by i·``oscillation``).

    Reflection q diffracts at λ = −2 q_z / |q|² and n·q at λ/n along the same ray, so the
    in-band harmonics of one fundamental h₀ = h / gcd(h) on one image form one spot.
    """
    lo, hi = wavelength_range
    q2 = (reciprocal**2).sum(axis=1)
    n0 = np.gcd.reduce(np.abs(sphere), axis=1)
    fundamental = sphere // n0[:, None]
    fundamental_id = unique_hkl(fundamental)[1]
    d = 1 / np.sqrt(q2)
    spots, harmonics = [], []
    n_spots = 0
    for image in images:
        q = _rotate_x(reciprocal, np.radians(image * oscillation))
        lam = -2 * q[:, 2] / q2
        rows = np.flatnonzero((lam >= lo) & (lam <= hi))
        # One spot per fundamental; its rows ordered by harmonic number.
        order = np.lexsort((n0[rows], fundamental_id[rows]))
        rows = rows[order]
        first = np.r_[True, fundamental_id[rows][1:] != fundamental_id[rows][:-1]]
        spot = np.cumsum(first) - 1 + n_spots
        x, y = _detector_position(q[rows], lam[rows])
        harmonics.append((rows, spot, np.full(len(rows), image), lam[rows], x, y))
        n_spots += int(first.sum())
    rows, spot, image, lam, x, y = (np.concatenate(a) for a in zip(*harmonics))
    first = np.r_[True, spot[1:] != spot[:-1]]
    spots = {
        "hkl": sphere[rows][first],
        "phi": image[first] * oscillation,
        "image": image[first],
        "d": d[rows][first],
        "x": x[first],
        "y": y[first],
        "lam": lam[first],
    }
    harmonics = {
        "hkl": sphere[rows],
        "spot": spot,
        "n": n0[rows],
        "image": image,
        "d": d[rows],
        "x": x,
        "y": y,
        "lam": lam,
        "first": np.flatnonzero(first),
    }
    return spots, harmonics


def _resolved(harmonics, oscillation):
    """Every harmonic as a spot of its own."""
    n = len(harmonics["spot"])
    spots = {
        "hkl": harmonics["hkl"],
        "phi": harmonics["image"] * oscillation,
        "image": harmonics["image"],
        "d": harmonics["d"],
        "x": harmonics["x"],
        "y": harmonics["y"],
        "lam": harmonics["lam"],
    }
    return spots, {**harmonics, "spot": np.arange(n), "first": np.arange(n)}


def _truth_table(amplitudes, hkl, spacegroup, cell, anomalous):
    """True amplitudes of the ASU reflections of the observed ``hkl`` (Friedel mates
    merged)."""
    observed, _ = map_to_asu(hkl, spacegroup, False)
    hkl, _ = unique_hkl(observed)
    row = lookup_hkl(amplitudes["hkl"], hkl)
    plus, minus = amplitudes["plus"][row], amplitudes["minus"][row]
    centric, epsilon = reflection_flags(hkl, spacegroup)
    f = 0.5 * (plus + minus)
    columns = {
        "H": hkl[:, 0],
        "K": hkl[:, 1],
        "L": hkl[:, 2],
        "F": f,
        "I": f**2,
        "CENTRIC": centric,
        "EPSILON": epsilon,
        "dHKL": cell.calculate_d_array(hkl),
    }
    if anomalous:
        columns.update({"F(+)": plus, "F(-)": minus, "DANO": plus - minus})
    merged = rs.DataSet(columns, spacegroup=spacegroup, cell=cell, merged=True)
    return merged.set_index(["H", "K", "L"]).infer_mtz_dtypes()
