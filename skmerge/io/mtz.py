"""Unmerged MTZ files (DIALS, AIMLESS and MOSFLM exports)."""

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
