"""Unmerged MTZ files (DIALS, AIMLESS and MOSFLM exports)."""

import warnings

import reciprocalspaceship as rs

from ..errors import InputError


def read_mtz(path):
    """Read an unmerged MTZ file as an ``rs.DataSet`` indexed by the observed H, K, L.

    Raises
    ------
    InputError
        If the file cannot be read or holds merged data.
    """
    try:
        with warnings.catch_warnings():
            # Multi-wavelength exports carry a dummy dataset of wavelength 0; harmless here.
            warnings.filterwarnings("ignore", message="Mtz contains multiple datasets")
            dataset = rs.read_mtz(str(path))
    except (RuntimeError, OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable MTZ file ({exc}).") from exc
    if dataset.merged:
        raise InputError(
            f"{path}: this MTZ file holds merged data (no M/ISYM column). skmerge needs "
            "unmerged observations: export them from your integration program "
            "(e.g. dials.export, or MOSFLM/AIMLESS unmerged output)."
        )
    return dataset
