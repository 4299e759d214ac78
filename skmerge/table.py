"""Reflection files → the observation table every other part of skmerge reads.

The observation table is an ``rs.DataSet`` with one row per observation and a plain
``RangeIndex`` (so that scikit-learn can index rows by position). Its columns:

==================  ======================================================================
H, K, L             ASU Miller index (Friedel-minus acentrics negated when anomalous)
Hobs, Kobs, Lobs    Miller index as observed
asu_index           dense integer id of (H, K, L)
CENTRIC, EPSILON    centric flag and multiplicity ε of the reflection
dHKL                resolution in Å, from the cell of the observation's file
image_id            contiguous image id, unique across files (ordered by file, then image)
file_id             position of the observation's file in the input list
Iobs, SIGIobs       the intensity and its standard deviation
(anything else)     every other column of the input, kept as metadata
==================  ======================================================================
"""

import warnings
from os import PathLike
from pathlib import Path

import gemmi
import numpy as np
import pandas as pd
import reciprocalspaceship as rs

from .errors import DataWarning, InputError
from .io import read_reflection_file
from .symmetry import (
    isomorphous,
    map_to_asu,
    reflection_flags,
    resolution,
    systematically_absent,
    unique_hkl,
)

INDEX_COLUMNS = ("H", "K", "L")
OBSERVED_INDEX_COLUMNS = ("Hobs", "Kobs", "Lobs")
TABLE_COLUMNS = (
    *INDEX_COLUMNS,
    *OBSERVED_INDEX_COLUMNS,
    "asu_index",
    "CENTRIC",
    "EPSILON",
    "dHKL",
    "image_id",
    "file_id",
    "Iobs",
    "SIGIobs",
)


def read_unmerged(
    paths,
    *,
    spacegroup=None,
    cell=None,
    anomalous=False,
    dmin=None,
    isigi_cutoff=None,
    intensity_key=None,
    sigma_key=None,
    image_key=None,
    drop_invalid=False,
):
    """Read unmerged reflection files into one observation table.

    Parameters
    ----------
    paths : path, rs.DataSet, or list of them
        Unmerged MTZ, XDS_ASCII.HKL / INTEGRATE.HKL, CrystFEL ``.stream`` or DIALS
        ``.refl`` files (the format is recognised from the file), or data sets already
        in memory. Several inputs are concatenated; ``file_id`` records their order.
    spacegroup : str, int or gemmi.SpaceGroup, optional
        Overrides the files' space group; required when no file records one.
    cell : sequence of 6 floats or gemmi.UnitCell, optional
        Overrides the files' cells (and skips their isomorphism check).
    anomalous : bool, default=False
        Keep acentric Friedel mates apart in H, K, L and ``asu_index``.
    dmin : float, optional
        Drop observations with dHKL below this resolution (Å).
    isigi_cutoff : float, optional
        Drop observations with I/σ(I) below this value.
    intensity_key, sigma_key, image_key : str, optional
        Input columns holding the intensity, its σ and the image number. By default the
        first ``Intensity``-typed column, its ``Stddev`` partner and the first
        ``Batch``-typed column.
    drop_invalid : bool, default=False
        Drop observations whose intensity or σ is not finite or whose σ ≤ 0 instead of
        raising an error.

    Returns
    -------
    rs.DataSet
        The observation table described in this module's docstring, with ``cell`` and
        ``spacegroup`` set.

    Raises
    ------
    InputError
        For a missing or unreadable file, a missing or ambiguous column, invalid values,
        no or conflicting space groups, a cell that does not fit the space group,
        non-isomorphous files, or when the filters leave nothing.

    Examples
    --------
    >>> import skmerge
    >>> X = skmerge.read_unmerged("hypf_unmerged.mtz", anomalous=True)  # doctest: +SKIP
    >>> X[["H", "K", "L", "image_id", "Iobs", "SIGIobs"]].head()  # doctest: +SKIP
    """
    sources = _read_sources(paths, spacegroup)
    spacegroup = _resolve_spacegroup(sources, spacegroup)
    cells = _resolve_cells(sources, cell, spacegroup)
    _check_positive("dmin", dmin)
    _check_positive("isigi_cutoff", isigi_cutoff, allow_zero=True, allow_negative=True)

    parts = []
    for file_id, (name, dataset) in enumerate(sources):
        part = _drop_repeated_rows(name, _standardise(name, dataset, intensity_key, sigma_key, image_key,
                                                      drop_invalid))
        part["file_id"] = file_id
        part["dHKL"] = resolution(part[list(OBSERVED_INDEX_COLUMNS)].to_numpy(), cells[file_id])
        parts.append(part)
    table = pd.concat(parts, ignore_index=True, sort=False)

    hkl_obs = table[list(OBSERVED_INDEX_COLUMNS)].to_numpy(np.int32)
    keep = ~systematically_absent(hkl_obs, spacegroup)
    removed = {"systematic absences": int((~keep).sum())}
    if dmin is not None:
        ok = table["dHKL"].to_numpy() >= dmin
        removed[f"dHKL < {dmin}"] = int((keep & ~ok).sum())
        keep &= ok
    if isigi_cutoff is not None:
        ok = table["Iobs"].to_numpy() >= isigi_cutoff * table["SIGIobs"].to_numpy()
        removed[f"I/σ < {isigi_cutoff}"] = int((keep & ~ok).sum())
        keep &= ok
    if not keep.any():
        detail = ", ".join(f"{n} by {why}" for why, n in removed.items() if n)
        raise InputError(
            f"{_names(sources)}: no observations left after filtering ({detail}). "
            "Relax dmin (--dmin) / isigi_cutoff (--isigi-cutoff), or check the space group."
        )
    table = table.loc[keep].reset_index(drop=True)
    return _finish_table(table, hkl_obs[keep], spacegroup, cells[0], anomalous)


def _finish_table(table, hkl_obs, spacegroup, cell, anomalous):
    asu_hkl, _ = map_to_asu(hkl_obs, spacegroup, anomalous)
    _, asu_index = unique_hkl(asu_hkl)
    centric, epsilon = reflection_flags(asu_hkl, spacegroup)
    _, image_id = np.unique(
        np.stack([table["file_id"].to_numpy(np.int64), table["image_id"].to_numpy(np.int64)], 1),
        axis=0,
        return_inverse=True,
    )
    columns = {
        **{k: asu_hkl[:, i] for i, k in enumerate(INDEX_COLUMNS)},
        **{k: hkl_obs[:, i] for i, k in enumerate(OBSERVED_INDEX_COLUMNS)},
        "asu_index": asu_index,
        "CENTRIC": centric,
        "EPSILON": epsilon,
        "dHKL": table["dHKL"].to_numpy(np.float32),
        "image_id": image_id.ravel(),
        "file_id": table["file_id"].to_numpy(),
        "Iobs": table["Iobs"].to_numpy(np.float32),
        "SIGIobs": table["SIGIobs"].to_numpy(np.float32),
    }
    out = rs.DataSet(columns, spacegroup=spacegroup, cell=cell, merged=False)
    out = out.astype(
        {
            **{k: "HKL" for k in (*INDEX_COLUMNS, *OBSERVED_INDEX_COLUMNS)},
            "asu_index": "MTZInt",
            "EPSILON": "MTZInt",
            "dHKL": "MTZReal",
            "image_id": "Batch",
            "file_id": "MTZInt",
            "Iobs": "Intensity",
            "SIGIobs": "Stddev",
        }
    )
    metadata = table.drop(columns=[c for c in table.columns if c in _WORK_COLUMNS])
    for column in metadata.columns:
        out[column] = metadata[column].array
    return out


# The columns _standardise makes; image_id holds the file's own image number until
# _finish_table renumbers the images across files.
_WORK_COLUMNS = {*OBSERVED_INDEX_COLUMNS, "image_id", "file_id", "dHKL", "Iobs", "SIGIobs"}


def _drop_repeated_rows(name, part):
    """The rows of one file without exact repeats, with a DataWarning when there were any.

    Two measurements never agree in every column (index, image, intensity, σ and every
    metadata value), so a repeated row is a copy — of a file concatenated with itself,
    or a pipeline that wrote a row twice. Kept, copies would double the multiplicity and
    shrink σ by √2; dropped, they change nothing, so they are dropped and reported.
    """
    repeated = part.duplicated().to_numpy()
    if not repeated.any():
        return part
    warnings.warn(f"{name}: {int(repeated.sum()):,} of {len(part):,} rows repeat an earlier row exactly; "
                  "the copies were dropped.", DataWarning, stacklevel=3)
    return part.loc[~repeated].reset_index(drop=True)


def _read_sources(paths, spacegroup):
    if isinstance(paths, (str, PathLike, pd.DataFrame)):
        paths = [paths]
    paths = list(paths)
    if not paths:
        raise InputError("no reflection files given.")
    sg = _as_spacegroup(spacegroup) if spacegroup is not None else None
    files = [Path(p).resolve() for p in paths if isinstance(p, (str, PathLike))]
    twice = sorted({str(p) for p in files if files.count(p) > 1})
    if twice:
        raise InputError(f"{', '.join(twice)}: given more than once; each file's observations would count twice.")
    sources = []
    for i, item in enumerate(paths):
        if isinstance(item, pd.DataFrame):
            sources.append((f"<data set {i}>", item))
        elif isinstance(item, (str, PathLike)):
            sources.append((str(item), read_reflection_file(item, spacegroup=sg)))
        else:
            raise InputError(
                f"input {i} is a {type(item).__name__}; give file paths or rs.DataSet objects."
            )
    return sources


def _as_spacegroup(value):
    if isinstance(value, gemmi.SpaceGroup):
        return value
    try:
        sg = gemmi.SpaceGroup(value) if isinstance(value, str) else gemmi.find_spacegroup_by_number(int(value))
    except (ValueError, TypeError, RuntimeError):
        sg = None
    if sg is None:
        raise InputError(
            f"spacegroup={value!r} (--spacegroups) is not a space group gemmi knows; give a symbol such as "
            "'P 21 21 21' or an international number."
        )
    return sg


def _resolve_spacegroup(sources, spacegroup):
    if spacegroup is not None:
        return _as_spacegroup(spacegroup)
    found = {}
    for name, dataset in sources:
        sg = getattr(dataset, "spacegroup", None)
        if sg is not None:
            found.setdefault(sg.xhm(), []).append(name)
    if not found:
        raise InputError(
            f"{_names(sources)}: no space group recorded in the input (an XDS file's "
            "!SPACE_GROUP_NUMBER, an MTZ file's symmetry); pass spacegroup= (e.g. spacegroup="
            "'P 43 21 2'; on the command line --spacegroups)."
        )
    if len(found) > 1:
        listing = "; ".join(f"{sg} in {', '.join(names)}" for sg, names in found.items())
        raise InputError(
            f"the files record different space groups ({listing}). Merge files of one "
            "space group, or pass spacegroup= (--spacegroups) to impose one."
        )
    return gemmi.SpaceGroup(next(iter(found)))


def _resolve_cells(sources, cell, spacegroup):
    """One cell per source; checks them against the space group and against each other."""
    if cell is not None:
        if not isinstance(cell, gemmi.UnitCell):
            try:
                cell = gemmi.UnitCell(*[float(x) for x in cell])
            except (TypeError, ValueError) as exc:
                raise InputError(f"cell={cell!r} (--cell): give six numbers a, b, c, α, β, γ.") from exc
        if not cell.volume > 0:  # gemmi accepts zero lengths and impossible angles
            raise InputError(f"cell={_fmt_cell(cell)} (--cell) has no volume; give lengths > 0 and angles of a "
                             "real cell.")
        cells = [cell] * len(sources)
        names = ["cell="] * len(sources)
    else:
        cells, names = [], []
        for name, dataset in sources:
            c = getattr(dataset, "cell", None)
            if c is None or c.volume <= 0:
                raise InputError(f"{name}: no unit cell recorded (an XDS file's !UNIT_CELL_CONSTANTS, an MTZ "
                                 "file's cell); pass cell=(a, b, c, α, β, γ) (on the command line --cell).")
            cells.append(c)
            names.append(name)
    for name, c in zip(names, cells):
        if not c.is_compatible_with_spacegroup(spacegroup, 1e-2):
            raise InputError(
                f"{name}: cell {_fmt_cell(c)} is incompatible with space group "
                f"{spacegroup.xhm()}; check the space group or pass the right cell= (--cell)."
            )
    for name, c in zip(names[1:], cells[1:]):
        if not isomorphous(cells[0], c):
            raise InputError(
                f"{name}: cell {_fmt_cell(c)} is not isomorphous with {names[0]} "
                f"({_fmt_cell(cells[0])}). Merge isomorphous data only, or pass cell= (--cell) to "
                "impose one cell on all files."
            )
    return cells


def _standardise(name, dataset, intensity_key, sigma_key, image_key, drop_invalid):
    """One source → a plain DataFrame with Hobs/Kobs/Lobs, image_id (the file's own
    image number), Iobs, SIGIobs and the metadata."""
    frame = dataset.reset_index() if "H" not in dataset.columns else dataset.copy()
    missing = [k for k in INDEX_COLUMNS if k not in frame.columns]
    if missing:
        raise InputError(f"{name}: no Miller index column(s) {', '.join(missing)}.")
    ikey = intensity_key or _first_of_type(frame, "Intensity", ("I", "IOBS", "Iobs"))
    if ikey is None:
        raise InputError(
            f"{name}: no intensity column found (no column of MTZ type J); pass "
            f"intensity_key= ({_FLAGS['intensity_key']}). Columns: {', '.join(map(str, frame.columns))}."
        )
    _check_column(name, frame, "intensity_key", ikey)
    skey = sigma_key or _sigma_partner(name, frame, ikey)
    bkey = image_key or _first_of_type(frame, "Batch", ("BATCH", "image", "IMAGE"))
    if bkey is None:
        raise InputError(
            f"{name}: no image column found (no column of MTZ type B); pass image_key= "
            f"({_FLAGS['image_key']}). Columns: {', '.join(map(str, frame.columns))}."
        )
    for role, key in (("sigma_key", skey), ("image_key", bkey)):
        _check_column(name, frame, role, key)
    intensity = frame[ikey].to_numpy(np.float64, na_value=np.nan)
    sigma = frame[skey].to_numpy(np.float64, na_value=np.nan)
    image = frame[bkey].to_numpy(np.float64, na_value=np.nan)
    bad = ~np.isfinite(intensity) | ~np.isfinite(sigma) | ~(sigma > 0)
    if bad.any() and not drop_invalid:
        first = int(np.flatnonzero(bad)[0])
        raise InputError(
            f"{name}: {int(bad.sum())} observation(s) have a non-finite {ikey} or {skey}, or "
            f"{skey} ≤ 0 (first at row {first}: {ikey}={intensity[first]}, "
            f"{skey}={sigma[first]}). Fix the file, or pass drop_invalid=True (--drop-invalid) to drop them."
        )
    if not np.isfinite(image).all() or (image != np.round(image)).any():
        raise InputError(f"{name}: image column {bkey!r} must hold whole numbers.")
    part = pd.DataFrame(
        {
            "Hobs": frame["H"].to_numpy(np.int32),
            "Kobs": frame["K"].to_numpy(np.int32),
            "Lobs": frame["L"].to_numpy(np.int32),
            "image_id": image.astype(np.int64),
            "Iobs": intensity,
            "SIGIobs": sigma,
        }
    )
    drop = {*INDEX_COLUMNS, ikey, skey, *TABLE_COLUMNS}
    metadata = frame[[c for c in frame.columns if c not in drop]].reset_index(drop=True)
    part = pd.concat([part, metadata], axis=1)
    return part.loc[~bad].reset_index(drop=True) if bad.any() else part


# The command-line flags of read_unmerged's column arguments, named in its messages.
_FLAGS = {"intensity_key": "--intensity-key", "sigma_key": "--uncertainty-key", "image_key": "--image-key"}


def _check_column(name, frame, role, key):
    if key not in frame.columns:
        raise InputError(f"{name}: {role}={key!r} ({_FLAGS[role]}) is not a column; columns: "
                         f"{', '.join(map(str, frame.columns))}.")


def _first_of_type(frame, mtz_type, fallback_names):
    for column, dtype in frame.dtypes.items():
        if getattr(dtype, "name", str(dtype)) == mtz_type:
            return column
    return next((n for n in fallback_names if n in frame.columns), None)


def _sigma_partner(name, frame, intensity_key):
    """The σ column of an intensity column: the Stddev column right after it (the MTZ
    convention), else the one named after it (SIGI for I, SigI, SIGIPR for IPR)."""
    columns = list(frame.columns)
    position = columns.index(intensity_key) if intensity_key in columns else -1
    if 0 <= position < len(columns) - 1:
        nxt = columns[position + 1]
        if getattr(frame[nxt].dtype, "name", "") == "Stddev":
            return nxt
    wanted = {f"sig{intensity_key}".lower(), f"sigma{intensity_key}".lower(), f"sigma({intensity_key})".lower()}
    named = [c for c in columns if str(c).lower() in wanted]
    if len(named) == 1:
        return named[0]
    stddev = [c for c in columns if getattr(frame[c].dtype, "name", "") == "Stddev"]
    if len(stddev) == 1:
        return stddev[0]
    if not stddev and not named:
        raise InputError(
            f"{name}: no σ column found for intensity {intensity_key!r}; pass sigma_key= ({_FLAGS['sigma_key']})."
        )
    raise InputError(
        f"{name}: cannot tell which of {', '.join(map(str, named or stddev))} is the σ of "
        f"{intensity_key!r}; pass sigma_key= ({_FLAGS['sigma_key']})."
    )


def _check_positive(name, value, allow_zero=False, allow_negative=False):
    if value is None:
        return
    try:
        v = float(value)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name}={value!r} must be a number.") from exc
    if not np.isfinite(v) or (not allow_negative and (v < 0 or (v == 0 and not allow_zero))):
        raise InputError(f"{name}={value!r} must be a positive number.")


def _names(sources):
    return ", ".join(name for name, _ in sources)


def _fmt_cell(cell):
    return "(" + ", ".join(f"{x:.2f}" for x in cell.parameters) + ")"
