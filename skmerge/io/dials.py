"""DIALS integration output: a reflection table (``.refl``, msgpack) and its experiment
list (``.expt``, JSON)."""

import json
from pathlib import Path

import gemmi
import msgpack
import numpy as np
import pandas as pd
import reciprocalspaceship as rs

from ..errors import InputError

_MAGIC = b"dials::af::reflection_table"
# Column types of a msgpack reflection table -> (little-endian numpy dtype, values per row).
# Types not listed (shoebox, std::string) are skipped.
_TYPES = {
    "bool": ("?", 1),
    "int": ("<i4", 1),
    "std::size_t": ("<u8", 1),
    "double": ("<f8", 1),
    "vec2<double>": ("<f8", 2),
    "vec3<double>": ("<f8", 3),
    "mat3<double>": ("<f8", 9),
    "int6": ("<i4", 6),
    "miller_index": ("<i4", 3),
    "cctbx::miller::index<>": ("<i4", 3),
}

# Reflection flags, from the Flags enum of dials/array_family/reflection_table.h.
_INTEGRATED_SUM = 1 << 8
_INTEGRATED_PRF = 1 << 9
# Rows carrying any of these are dropped: overloaded (1 << 10) and
# foreground_includes_bad_pixels (1 << 14) spoil the intensity itself, and
# bad_for_scaling = user_excluded_in_scaling (1 << 22) | outlier_in_scaling (1 << 23) |
# excluded_for_scaling (1 << 24) are DIALS' own verdicts against using the row.
_BAD = (1 << 10) | (1 << 14) | (1 << 22) | (1 << 23) | (1 << 24)

# Metadata: our column -> (DIALS column, component of a vector column or None).
_METADATA = {
    "XDET": ("xyzobs.px.value", 0),
    "YDET": ("xyzobs.px.value", 1),
    "ZDET": ("xyzcal.px", 2),
    "BG": ("background.mean", None),
    "BGSUM": ("background.sum.value", None),
    "SIGBGSUM": ("background.sum.sigma", None),  # derived from the variance on reading
    "LP": ("lp", None),
    "QE": ("qe", None),
    "PARTIALITY": ("partiality", None),
    "PANEL": ("panel", None),
    "S1X": ("s1", 0),
    "S1Y": ("s1", 1),
    "S1Z": ("s1", 2),
}


def read_dials(refl_path, expt_path=None):
    """Read DIALS integrated reflections as an unmerged ``rs.DataSet``.

    Parameters
    ----------
    refl_path : str or path-like
        A msgpack reflection table written by dials.integrate (or dials.stills_process).
    expt_path : str or path-like, optional
        Its experiment list; defaults to ``refl_path`` with the suffix ``.expt``.

    Returns
    -------
    rs.DataSet
        Indexed by the observed H, K, L; columns ``BATCH``, then ``IPR``, ``SIGIPR``
        (profile fitted) when the table has them, ``I``, ``SIGI`` (summation), and as
        ``MTZReal`` the metadata XDET, YDET (observed centroid, pixels), ZDET (predicted
        frame coordinate), BG (mean background per pixel), BGSUM, SIGBGSUM (summed
        background and its error), LP, QE, PARTIALITY, PANEL, S1X, S1Y, S1Z (1/Å), as
        far as the table has them. Only reflections DIALS integrated by every method
        present and did not flag as bad are kept. Intensities carry DIALS' Lorentz-
        polarisation and detector-efficiency corrections, as dials.export writes them.
        The cell is the mean of the crystals' cells.

    Raises
    ------
    InputError
        If either file is missing, empty, truncated or of another format, the two do
        not belong together, the crystals' space groups differ, or no integrated
        reflection is left.
    """
    refl_path = Path(refl_path)
    expt_path = refl_path.with_suffix(".expt") if expt_path is None else Path(expt_path)
    table, identifiers = _read_refl(refl_path)
    experiments = _read_expt(expt_path, refl_path)
    for name in ("miller_index", "id", "flags", "xyzcal.px"):
        if name not in table:
            raise InputError(f"{refl_path}: the reflection table has no {name!r} column.")
    table.setdefault("xyzobs.px.value", table["xyzcal.px"])
    if "background.sum.variance" in table:
        table["background.sum.sigma"] = np.sqrt(np.abs(table["background.sum.variance"]))
    experiment = _experiment_of_rows(table["id"], identifiers, experiments, refl_path)

    intensities = _intensity_columns(table)
    if not intensities:
        raise InputError(
            f"{refl_path}: the reflection table has no integrated intensities; give "
            "integrated.refl (from dials.integrate or dials.stills_process)."
        )
    hkl = table["miller_index"]
    data = {"H": hkl[:, 0], "K": hkl[:, 1], "L": hkl[:, 2]}
    data["BATCH"] = _batches(table["xyzcal.px"][:, 2], experiment, experiments)
    data.update(_corrected_intensities(table, intensities))
    for name, (column, component) in _METADATA.items():
        if column in table:
            values = table[column]
            data[name] = values if component is None else values[:, component]

    keep = _usable_rows(table, intensities) & (experiment >= 0)
    frame = pd.DataFrame(data)[keep]
    frame = frame[np.isfinite(frame.to_numpy(dtype=np.float64)).all(axis=1)]
    if frame.empty:
        raise InputError(f"{refl_path}: no integrated reflection passed DIALS' flags.")
    _check_single_precision(frame, refl_path)

    cells = np.array([e["cell"] for e in experiments])
    dataset = rs.DataSet(frame.reset_index(drop=True), merged=False,
                         cell=gemmi.UnitCell(*cells.mean(axis=0)),
                         spacegroup=_common_spacegroup(experiments, expt_path))
    dtypes = {"H": "HKL", "K": "HKL", "L": "HKL", "BATCH": "Batch"}
    for name, sigma in intensities:
        dtypes.update({name: "Intensity", sigma: "Stddev"})
    dtypes.update({name: "MTZReal" for name in dataset if name not in dtypes})
    return dataset.astype(dtypes).set_index(["H", "K", "L"])


def _read_refl(path):
    """Decode a msgpack reflection table into ``{column: array}`` and its identifiers."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read the file ({exc.strerror}).") from exc
    if not raw:
        raise InputError(f"{path}: the file is empty; expected a DIALS reflection table.")
    if _MAGIC not in raw[:64]:
        raise InputError(
            f"{path}: not a DIALS reflection table; expected a msgpack .refl file such as "
            "integrated.refl."
        )
    try:
        kind, _version, content = msgpack.unpackb(raw, strict_map_key=False, raw=False)
        nrows = int(content["nrows"])
        table = {}
        for name, (type_name, payload) in content["data"].items():
            if type_name not in _TYPES:
                continue
            dtype, width = _TYPES[type_name]
            count, buffer = payload
            values = np.frombuffer(buffer, dtype=dtype)
            if count != nrows or values.size != nrows * width:
                raise ValueError(f"column {name!r} does not hold {nrows} rows")
            table[name] = values.reshape(nrows, width) if width > 1 else values
        identifiers = dict(content.get("identifiers") or {})
    except (ValueError, TypeError, KeyError, AttributeError,
            msgpack.UnpackException) as exc:
        raise InputError(
            f"{path}: truncated or corrupt DIALS reflection table ({exc})."
        ) from exc
    if kind != _MAGIC.decode():
        raise InputError(f"{path}: holds a {kind!r}, not a DIALS reflection table.")
    return table, identifiers


def _check_single_precision(frame, path):
    """InputError for a value the MTZ column types (4-byte floats) cannot hold: DIALS
    writes none, so the table is damaged, and the value would become an infinity."""
    limit = np.finfo(np.float32).max
    for name in frame.columns:
        values = frame[name].to_numpy(dtype=np.float64)
        beyond = np.abs(values) > limit
        if beyond.any():
            raise InputError(f"{path}: column {name} holds {values[beyond][0]:.3g}, beyond single precision; the "
                             "reflection table is damaged.")


def _read_expt(path, refl_path):
    """Per experiment: identifier, cell, Hall symbol and image range (None for a still)."""
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise InputError(
            f"{path}: no such file; {refl_path.name} needs the experiment list written "
            "with it, beside it under the same name (or pass expt_path= to read_dials)."
        ) from exc
    except (OSError, ValueError) as exc:  # JSON and Unicode errors are ValueErrors
        message = f"{path}: not a DIALS experiment list (JSON .expt): {exc}"
        raise InputError(message) from exc
    try:
        experiments = []
        for entry in document["experiment"]:
            crystal = document["crystal"][entry["crystal"]]
            scan = entry.get("scan")
            scan = document["scan"][scan] if scan is not None else None
            experiments.append({
                "identifier": entry.get("identifier", ""),
                "cell": _cell(*(crystal[f"real_space_{axis}"] for axis in "abc")),
                "hall": crystal["space_group_hall_symbol"],
                "images": tuple(scan["image_range"]) if scan else None,
            })
    except (KeyError, TypeError, IndexError, ValueError) as exc:
        raise InputError(
            f"{path}: not a DIALS experiment list with crystals ({exc!r})."
        ) from exc
    if not experiments:
        raise InputError(f"{path}: the experiment list holds no experiment.")
    return experiments


def _cell(a, b, c):
    """a, b, c, alpha, beta, gamma of the cell spanned by three real-space vectors."""
    a, b, c = (np.asarray(v, dtype=np.float64) for v in (a, b, c))

    def angle(u, v):
        return np.degrees(np.arccos(u @ v / np.linalg.norm(u) / np.linalg.norm(v)))

    lengths = [np.linalg.norm(v) for v in (a, b, c)]
    return [*lengths, angle(b, c), angle(a, c), angle(a, b)]


def _experiment_of_rows(ids, identifiers, experiments, refl_path):
    """Index into ``experiments`` of each row (-1 for rows of no experiment).

    The table's ``id`` column counts experiments; when both files carry identifiers the
    id is matched through them, so that an experiment list reordered or filtered after
    integration is still paired correctly.
    """
    names = [e["identifier"] for e in experiments]
    if identifiers and all(names):
        position = {name: i for i, name in enumerate(names)}
        missing = sorted(set(identifiers.values()) - set(position))
        if missing:
            raise InputError(
                f"{refl_path}: its experiments {missing[:3]} are not in the experiment "
                "list; pass the .expt written together with this .refl."
            )
        lookup = {int(k): position[v] for k, v in identifiers.items()}
    else:
        lookup = {i: i for i in range(len(experiments))}
    keys = np.array(sorted(lookup))
    slot = np.clip(np.searchsorted(keys, ids), 0, len(keys) - 1)
    found = keys[slot] == ids
    if np.any(~found & (ids >= 0)):
        raise InputError(
            f"{refl_path}: rows refer to experiment ids the experiment list does not "
            f"have ({len(experiments)} experiments); pass the .expt written together "
            "with this .refl."
        )
    return np.where(found, np.array([lookup[k] for k in keys])[slot], -1)


def _batches(z, experiment, experiments):
    """Image number of each row, unique across experiments.

    In a scan, DIALS' frame coordinate z is 0 at the start of image 1 and image n spans
    [n-1, n) (dxtbx counts array indices from image 1 even when the scan starts later),
    so the image is floor(z) + 1; a still is one image. Each experiment's images are
    shifted up just enough not to collide with the previous experiments', so one scan
    keeps its own numbering and stills get 1, 2, 3, ... (experiment id + 1).
    """
    first, last, offset = (np.zeros(len(experiments), dtype=np.int64) for _ in range(3))
    next_free = 1
    for index, entry in enumerate(experiments):
        first[index], last[index] = entry["images"] or (1, 1)
        offset[index] = max(0, next_free - first[index])
        next_free = last[index] + offset[index] + 1
    scan = np.array([entry["images"] is not None for entry in experiments])
    row = np.maximum(experiment, 0)  # rows of no experiment are dropped later anyway
    image = np.where(scan[row], np.floor(np.nan_to_num(z)) + 1, first[row])
    return np.clip(image, first[row], last[row]).astype(np.int64) + offset[row]


def _usable_rows(table, intensities):
    """Rows DIALS integrated by every method used, did not flag as bad, and that have a
    positive variance, a positive detector efficiency and a Miller index."""
    flags = table["flags"]
    required = 0
    for source in intensities.values():
        required |= _INTEGRATED_PRF if source == "intensity.prf" else _INTEGRATED_SUM
    keep = ((flags & required) == required) & ((flags & _BAD) == 0)
    keep &= table["miller_index"].any(axis=1)
    for source in intensities.values():
        keep &= table[source + ".variance"] > 0
    qe = table.get("qe", table.get("dqe"))
    return keep if qe is None else keep & (qe > 0)


def _corrected_intensities(table, intensities):
    """Intensities and sigmas with the corrections dials.export applies to unmerged MTZ.

    dials.export multiplies values by lp / qe and variances by its square, and drops
    rows with qe <= 0 (see ``_usable_rows``). It also divides summation intensities by
    the partiality and drops rows below a partiality threshold (0.4); we do not, because
    for stills that discards most of the data, and PARTIALITY is passed on as metadata.
    """
    nrows = len(table["flags"])
    correction = table.get("lp", np.ones(nrows))
    qe = table.get("qe", table.get("dqe"))
    if qe is not None:
        correction = correction / np.where(qe > 0, qe, 1.0)  # qe <= 0 rows are dropped
    columns = {}
    for (name, sigma), source in intensities.items():
        variance = np.maximum(table[source + ".variance"], 0.0)  # < 0 rows are dropped
        columns[name] = table[source + ".value"] * correction
        columns[sigma] = np.sqrt(variance) * np.abs(correction)
    return columns


def _intensity_columns(table):
    """``{(name, sigma name): DIALS column prefix}``, profile-fitted first.

    Profile-fitted intensities are used only if some row has them (dials.export falls
    back to summation the same way); alone, they are named I and SIGI.
    """
    has_sum = {"intensity.sum.value", "intensity.sum.variance"} <= table.keys()
    has_prf = {"intensity.prf.value", "intensity.prf.variance"} <= table.keys()
    has_prf = has_prf and bool((table["flags"] & _INTEGRATED_PRF).any())
    columns = {}
    if has_prf:
        columns[("IPR", "SIGIPR") if has_sum else ("I", "SIGI")] = "intensity.prf"
    if has_sum:
        columns[("I", "SIGI")] = "intensity.sum"
    return columns


def _common_spacegroup(experiments, expt_path):
    """The one gemmi.SpaceGroup of all crystals, or InputError."""
    groups = set()
    for hall in {entry["hall"] for entry in experiments}:
        group = gemmi.find_spacegroup_by_ops(gemmi.symops_from_hall(hall))
        if group is None:
            raise InputError(
                f"{expt_path}: space group {hall.strip()!r} (Hall) is not in a standard "
                "setting; reindex with dials.reindex first."
            )
        groups.add(group.xhm())
    if len(groups) > 1:
        raise InputError(
            f"{expt_path}: the crystals have different space groups ({sorted(groups)}); "
            "skmerge merges one space group at a time."
        )
    return gemmi.SpaceGroup(groups.pop())
