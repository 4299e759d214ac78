"""Unmerged XDS files: XDS_ASCII.HKL (CORRECT, XSCALE) and INTEGRATE.HKL (INTEGRATE).

gemmi reads the header and checks the file; the body is also read as a table so that the
columns gemmi does not expose (PSI, and most of INTEGRATE.HKL's) reach the metadata.
"""

from pathlib import Path

import gemmi
import numpy as np
import pandas as pd
import reciprocalspaceship as rs

from ..errors import InputError

_FORMATS = {
    b"!FORMAT=XDS_ASCII": "XDS_ASCII",
    b"!OUTPUT_FILE=INTEGRATE.HKL": "INTEGRATE",
}
# Columns that become the index, I and SIGI rather than metadata.
_CORE = ("H", "K", "L", "IOBS", "SIGMA")


def read_xds(path):
    """Read XDS_ASCII.HKL or INTEGRATE.HKL as an unmerged ``rs.DataSet``.

    Parameters
    ----------
    path : str or path-like
        An unmerged XDS_ASCII.HKL (from CORRECT or XSCALE) or an INTEGRATE.HKL.

    Returns
    -------
    rs.DataSet
        Indexed by the observed H, K, L; columns ``BATCH`` (the image holding the
        reflection's centroid), ``I``, ``SIGI`` and every other column of the file under
        its XDS name (XD, YD, ZD, RLP, PEAK, CORR, PSI; or XCAL ... ISEG for
        INTEGRATE.HKL) as ``MTZReal``. Observations XDS rejected (negative SIGMA in
        XDS_ASCII.HKL) and rows without a positive finite sigma are dropped.

    Raises
    ------
    InputError
        If the file is missing, empty, merged, truncated or not an XDS file.
    """
    path = Path(path)
    kind = _sniff(path)
    try:
        xds = gemmi.read_xds_ascii(str(path))
    except (RuntimeError, ValueError) as exc:
        raise InputError(f"{path}: not a readable unmerged {kind} file ({exc}).") from exc
    if xds.data_size == 0:
        raise InputError(f"{path}: the {kind} file holds no reflections.")
    table = _read_body(path, _column_names(path, kind), xds.data_size)

    hkl = xds.miller_array
    if not np.array_equal(hkl, table[["H", "K", "L"]].to_numpy()):
        raise InputError(f"{path}: the reflection lines could not be read consistently.")
    frame = pd.DataFrame({
        "H": hkl[:, 0],
        "K": hkl[:, 1],
        "L": hkl[:, 2],
        "BATCH": _batch(np.nan_to_num(xds.zd_array), xds.iset_array),  # ZD, or ZCAL
        "I": xds.iobs_array,
        "SIGI": xds.sigma_array,
    }).join(table.drop(columns=list(_CORE)))
    # Negative SIGMA is how CORRECT marks a rejected (misfit) observation.
    finite = np.isfinite(frame.to_numpy(dtype=np.float64)).all(axis=1)
    frame = frame[finite & (frame["SIGI"] > 0).to_numpy()].reset_index(drop=True)
    if frame.empty:
        raise InputError(f"{path}: no reflection with a positive sigma in the {kind} file.")

    # gemmi fills in a 1 × 1 × 1 Å cell and P1 when the header lacks them; leave them
    # unset instead, so that reading asks for them rather than merging garbage.
    records = _header_records(path)
    dataset = rs.DataSet(
        frame,
        cell=gemmi.UnitCell(*xds.cell_constants) if "UNIT_CELL_CONSTANTS" in records else None,
        spacegroup=_spacegroup(xds.spacegroup_number) if "SPACE_GROUP_NUMBER" in records else None,
        merged=False,
    )
    dtypes = {"H": "HKL", "K": "HKL", "L": "HKL", "BATCH": "Batch", "I": "Intensity",
              "SIGI": "Stddev"}
    dtypes.update({name: "MTZReal" for name in dataset if name not in dtypes})
    return dataset.astype(dtypes).set_index(["H", "K", "L"])


def _batch(z, iset):
    """Image number of each centroid from XDS's frame coordinate z and data-set number.

    z (ZD, or ZCAL in INTEGRATE.HKL) is 0 at the start of image 1 and image n spans
    [n-1, n), whatever STARTING_FRAME is (that only ties images to angles); so the image
    is floor(z) + 1, as gemmi's XDS-to-MTZ conversion counts BATCH. The data sets of an
    XSCALE file are pushed apart by a round step above the highest image, also as gemmi
    does, so that their images never collide.
    """
    frame = np.floor(z).astype(np.int64) + 1
    step = (frame.max() + 11000) // 10000 * 10000
    return frame + step * np.maximum(iset - 1, 0)


def _sniff(path):
    """Return "XDS_ASCII" or "INTEGRATE" from the first line, or raise InputError."""
    try:
        with open(path, "rb") as handle:
            first = handle.readline()
    except OSError as exc:
        raise InputError(f"{path}: cannot read the file ({exc.strerror}).") from exc
    if not first:
        raise InputError(
            f"{path}: the file is empty; expected XDS_ASCII.HKL or INTEGRATE.HKL."
        )
    for marker, kind in _FORMATS.items():
        if first.startswith(marker):
            if b"MERGE=TRUE" in first:
                raise InputError(
                    f"{path}: this XDS_ASCII file holds merged data; skmerge needs the "
                    "unmerged XDS_ASCII.HKL written by CORRECT (or by XSCALE with "
                    "MERGE=FALSE)."
                )
            return kind
    raise InputError(
        f"{path}: not an XDS reflection file; expected XDS_ASCII.HKL (first line "
        "'!FORMAT=XDS_ASCII') or INTEGRATE.HKL (first line '!OUTPUT_FILE=INTEGRATE.HKL')."
    )


def _column_names(path, kind):
    """Names of the data columns, in file order, from the header.

    XDS_ASCII.HKL declares them as ``!ITEM_NAME=position`` lines; INTEGRATE.HKL lists them
    comma-separated over the lines after ``!NUMBER_OF_ITEMS_IN_EACH_DATA_RECORD=``.
    """
    count, items, listed = None, {}, []
    with open(path, encoding="latin-1") as handle:
        for line in handle:
            if not line.startswith("!") or line.startswith("!END_OF_HEADER"):
                break
            body = line[1:].strip()
            try:
                if body.startswith("NUMBER_OF_ITEMS_IN_EACH_DATA_RECORD="):
                    count = int(body.split("=")[1])
                elif body.startswith("ITEM_"):
                    name, position = body[5:].split("=")
                    items[int(position)] = name.split("(")[0]  # SIGMA(IOBS) -> SIGMA
                elif kind == "INTEGRATE" and count and len(listed) < count:
                    listed += [name for name in body.replace(" ", "").split(",") if name]
            except ValueError as exc:
                message = f"{path}: unreadable header line {line.strip()!r}."
                raise InputError(message) from exc
    names = [items[i] for i in sorted(items)] if kind == "XDS_ASCII" else listed
    if count is None or len(names) != count or names[:5] != list(_CORE):
        raise InputError(
            f"{path}: the {kind} header does not declare its columns as expected "
            f"(found {names})."
        )
    return names


def _header_records(path):
    """Names of the ``!NAME=`` records of the header."""
    records = set()
    with open(path, encoding="latin-1") as handle:
        for line in handle:
            if not line.startswith("!") or line.startswith("!END_OF_HEADER"):
                break
            records.update(part.split("=")[0].strip() for part in line[1:].split("!") if "=" in part)
    return records


def _read_body(path, names, nrows):
    """The reflection lines as a DataFrame with the header's column names."""
    try:
        table = pd.read_csv(path, sep=r"\s+", comment="!", header=None, encoding="latin-1")
    except ValueError as exc:  # pandas' ParserError is a ValueError
        raise InputError(f"{path}: malformed reflection lines ({exc}).") from exc
    if table.shape != (nrows, len(names)):
        raise InputError(
            f"{path}: expected {nrows} reflection lines of {len(names)} numbers, "
            f"found {table.shape[0]} of {table.shape[1]}."
        )
    table.columns = names
    return table


def _spacegroup(number):
    """gemmi.SpaceGroup for an XDS space-group number, or None if it is not one."""
    try:
        return gemmi.find_spacegroup_by_number(number)
    except (ValueError, RuntimeError):
        return None
