"""Unmerged MTZ files (DIALS, AIMLESS and MOSFLM exports)."""

import os
import struct
import warnings

import gemmi
import reciprocalspaceship as rs

from ..errors import InputError


def read_mtz(path):
    """Read an unmerged MTZ file as an ``rs.DataSet`` indexed by the observed H, K, L.

    A file is unmerged when it has an M/ISYM column. (reciprocalspaceship also demands a
    repeated ASU index, which a single still image may not have.)

    Raises
    ------
    InputError
        If the file cannot be read or holds merged data.
    """
    _check_sizes(path)
    try:
        mtz = gemmi.read_mtz_file(str(path))
        with warnings.catch_warnings():
            # Multi-wavelength exports carry a dummy dataset of wavelength 0; harmless here.
            warnings.filterwarnings("ignore", message="Mtz contains multiple datasets")
            dataset = rs.io.mtz.from_gemmi(mtz)
    except (RuntimeError, OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable MTZ file ({exc}).") from exc
    m_isym = [c.label for c in mtz.columns if c.label == "M/ISYM"]
    if not m_isym:
        raise InputError(
            f"{path}: this MTZ file holds merged data (no M/ISYM column). skmerge needs "
            "unmerged observations: export them from your integration program "
            "(e.g. dials.export, or MOSFLM/AIMLESS unmerged output)."
        )
    if dataset.merged:
        dataset.merged = False
        dataset.hkl_to_observed(m_isym[0], inplace=True)
    return dataset


# The MTZ layout: "MTZ ", the header's position in 4-byte words (1-based; −1 means the
# 64-bit position at byte 12 holds it), the machine stamp; the data as ncol × nref
# 4-byte numbers from byte 80; the header as 80-character records at its position.
_DATA_START = 80
_RECORD = 80


def _check_sizes(path):
    """InputError unless the header position and the declared number of columns and
    reflections fit the file's size: gemmi allocates for what the header declares, so a
    damaged or crafted header could ask for gigabytes before any error."""
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        head = handle.read(20)
        if len(head) < 20:
            raise InputError(f"{path}: too short to be an MTZ file ({size} bytes).")
        order = ">" if head[8] >> 4 == 1 else "<"  # the stamp's float format: 1 is big-endian
        position = struct.unpack(order + "i", head[4:8])[0]
        if position == -1:
            position = struct.unpack(order + "q", head[12:20])[0]
        offset = (position - 1) * 4
        if not _DATA_START <= offset < size:
            raise InputError(f"{path}: damaged MTZ file: its header is said to start at byte {offset:,} of "
                             f"{size:,}.")
        handle.seek(offset)
        header = handle.read(min(size - offset, 2_000_000)).decode("latin-1")
    for start in range(0, len(header), _RECORD):
        record = header[start:start + _RECORD]
        if record.startswith("NCOL"):
            try:
                ncol, nref = (int(v) for v in record[4:].split()[:2])
            except ValueError:
                raise InputError(f"{path}: damaged MTZ header record {record.strip()!r}.") from None
            if ncol < 0 or nref < 0 or _DATA_START + 4 * ncol * nref > offset:
                raise InputError(f"{path}: damaged MTZ file: its header declares {nref:,} reflections of {ncol} "
                                 f"columns, more than the {offset - _DATA_START:,} bytes of data it holds.")
            return
    raise InputError(f"{path}: damaged MTZ file: no NCOL record in its header.")
