"""Readers of unmerged reflection files and writers of skmerge's outputs.

Every reader returns the same thing as ``rs.read_mtz`` does for an unmerged MTZ: an
``rs.DataSet`` indexed by the observed H, K, L, with MTZ column types (the image as a
``Batch`` column, intensities as ``Intensity`` and their errors as ``Stddev``), and the
cell and space group when the file knows them.
"""

from pathlib import Path

from ..errors import InputError

_MSGPACK_REFLECTION_TABLE = b"dials::af::reflection_table"


def sniff_format(path):
    """Name of the format of a reflection file, judged from its first bytes."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file.")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not a reflection file.")
    if not path.is_file():
        # A pipe or a device would block or never end; a reflection file is a file.
        raise InputError(f"{path}: is not a regular file (a pipe or a device?); give a reflection file.")
    with open(path, "rb") as handle:
        head = handle.read(4096)
    if not head:
        raise InputError(f"{path}: the file is empty.")
    if head.startswith(b"MTZ "):
        return "mtz"
    if _MSGPACK_REFLECTION_TABLE in head[:64]:
        return "dials"
    text = head.decode("latin-1")
    if text.startswith("CrystFEL stream format"):
        return "crystfel"
    if text.startswith("!") and ("XDS_ASCII" in text or "INTEGRATE" in text):
        return "xds"
    if text.lstrip().startswith("{") and "ExperimentList" in text:
        raise InputError(
            f"{path}: this is a DIALS experiment list; give the reflection file "
            "(integrated.refl) instead, with the .expt beside it."
        )
    raise InputError(
        f"{path}: unknown file format. skmerge reads unmerged MTZ, XDS_ASCII.HKL, "
        "INTEGRATE.HKL, CrystFEL .stream and DIALS .refl (+ .expt) files."
    )


def read_reflection_file(path, *, spacegroup=None):
    """Read one unmerged reflection file of any supported format.

    Parameters
    ----------
    path : str or path-like
    spacegroup : gemmi.SpaceGroup, optional
        Needed by formats that do not record one (CrystFEL streams).

    Returns
    -------
    rs.DataSet
        Indexed by the observed H, K, L; see the module docstring.
    """
    fmt = sniff_format(path)
    if fmt == "mtz":
        from .mtz import read_mtz

        return read_mtz(path)
    if fmt == "xds":
        from .xds import read_xds

        return read_xds(path)
    if fmt == "crystfel":
        from .crystfel import read_crystfel

        return read_crystfel(path, spacegroup=spacegroup)
    from .dials import read_dials

    return read_dials(path)
