"""CrystFEL stream files: the reflections indexamajig integrated on still images."""

import mmap
import re
import warnings
from pathlib import Path

import gemmi
import numpy as np
import reciprocalspaceship as rs

from ..errors import InputError

# reciprocalspaceship's names for the stream's numbers -> ours.
_COLUMNS = {
    "H": "H",
    "K": "K",
    "L": "L",
    "BATCH": "BATCH",
    "I": "I",
    "SigI": "SIGI",
    "peak": "PEAK",
    "background": "BG",
    "XDET": "XDET",
    "YDET": "YDET",
    "s1x": "S1X",
    "s1y": "S1Y",
    "s1z": "S1Z",
    "ewald_offset": "EWALD_OFFSET",
    "angular_ewald_offset": "ANGULAR_EWALD_OFFSET",
}
_NUMBER = rb"([-+]?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)"
_TARGET_CELL = re.compile(rb"^(a|b|c|al|be|ga)\s*=\s*" + _NUMBER + rb"\s*(A|nm|deg)\b",
                          re.MULTILINE)
_CRYSTAL_CELL = re.compile(
    rb"^Cell parameters" + (rb"\s+" + _NUMBER) * 3 + rb"\s+nm," + (rb"\s+" + _NUMBER) * 3,
    re.MULTILINE,
)


def read_crystfel(path, spacegroup=None):
    """Read a CrystFEL ``.stream`` file as an unmerged ``rs.DataSet``.

    Parameters
    ----------
    path : str or path-like
        A stream written by indexamajig, with integrated reflections.
    spacegroup : gemmi.SpaceGroup, str or int
        The space group of the crystals; streams do not record one, so it is required
        (e.g. ``"P 43 21 2"`` or ``96``).

    Returns
    -------
    rs.DataSet
        Indexed by the observed H, K, L; columns ``BATCH``, ``I``, ``SIGI`` and, as
        ``MTZReal``, PEAK, BG, XDET, YDET (panel pixel coordinates), S1X, S1Y, S1Z (the
        predicted scattered wave vector, 1/Å), EWALD_OFFSET (1/Å) and
        ANGULAR_EWALD_OFFSET (degrees). ``BATCH`` numbers the crystals 1, 2, ... in file
        order: one image can hold several crystals (``--multi``), and each crystal has its
        own orientation and scale, so each is an image of its own for scaling. The cell is
        the stream's target cell, or the mean of the crystals' cells when the stream has
        none. Rows without a positive finite sigma are dropped.

    Raises
    ------
    InputError
        If ``spacegroup`` is missing or unknown, or the file is missing, empty, truncated,
        not a stream, or holds no indexed crystal with reflections.
    """
    path = Path(path)
    header, n_crystals, crystal_cells = _survey(path)
    if spacegroup is None:
        raise InputError(
            f"{path}: CrystFEL streams do not record the space group; pass it as "
            "spacegroup= (e.g. spacegroup=\"P 43 21 2\"; on the command line --spacegroups)."
        )
    group = spacegroup
    if not isinstance(group, gemmi.SpaceGroup):
        group = gemmi.find_spacegroup_by_name(str(spacegroup))
        if group is None:
            raise InputError(f"{path}: unknown space group {spacegroup!r}.")
    if n_crystals == 0:
        raise InputError(
            f"{path}: no indexed crystals found; is this a CrystFEL stream with "
            "integrated reflections?"
        )
    if path.suffix != ".stream":  # reciprocalspaceship refuses other names
        raise InputError(f"{path}: rename the CrystFEL stream to end in .stream.")

    try:
        with warnings.catch_warnings():
            # Crystals with no reflections make numpy warn about an empty list.
            warnings.filterwarnings("ignore", message="loadtxt: input contained no data")
            raw = rs.read_crystfel(str(path), spacegroup=group, columns=list(_COLUMNS),
                                   num_cpus=1)
    except Exception as exc:  # any failure of the third-party parser means a bad stream
        raise InputError(f"{path}: malformed CrystFEL stream ({exc!r}).") from exc

    frame = raw.reset_index().rename(columns=_COLUMNS)
    numbers = frame.drop(columns="BATCH").to_numpy(dtype=np.float64)
    frame = frame[np.isfinite(numbers).all(axis=1) & (frame["SIGI"] > 0).to_numpy()]
    if frame.empty:
        raise InputError(f"{path}: no reflection with a positive sigma in the stream.")
    # Contiguous crystal numbers even where a crystal has no (usable) reflection.
    batch = np.unique(frame.pop("BATCH").to_numpy(), return_inverse=True)[1] + 1
    frame.insert(3, "BATCH", batch)

    cell = _target_cell(header)
    if cell is None and len(crystal_cells):
        cell = _symmetrized(crystal_cells.mean(axis=0), group)
    dataset = rs.DataSet(frame.reset_index(drop=True), spacegroup=group, merged=False,
                         cell=gemmi.UnitCell(*cell) if cell else None)
    dtypes = {"H": "HKL", "K": "HKL", "L": "HKL", "BATCH": "Batch", "I": "Intensity",
              "SIGI": "Stddev"}
    dtypes.update({name: "MTZReal" for name in dataset if name not in dtypes})
    return dataset.astype(dtypes).set_index(["H", "K", "L"])


def _survey(path):
    """Check that ``path`` is a complete stream and return what the reader needs.

    Returns
    -------
    header : bytes
        Everything before the first chunk (where the target cell is).
    n_crystals : int
    crystal_cells : numpy.ndarray
        One row of a, b, c (Å) and alpha, beta, gamma (degrees) per crystal.
    """
    try:
        with open(path, "rb") as handle:
            if not handle.read(1):
                raise InputError(f"{path}: the file is empty; expected a CrystFEL stream.")
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as text:
                if text[:22] != b"CrystFEL stream format":
                    raise InputError(
                        f"{path}: not a CrystFEL stream (its first line should start "
                        "with 'CrystFEL stream format')."
                    )
                begins = len(re.findall(rb"^----- Begin chunk -----", text, re.MULTILINE))
                ends = len(re.findall(rb"^----- End chunk -----", text, re.MULTILINE))
                n_crystals = len(re.findall(rb"^--- Begin crystal", text, re.MULTILINE))
                first_chunk = text.find(b"----- Begin chunk -----")
                header = text[: first_chunk if first_chunk >= 0 else len(text)]
                cells = _CRYSTAL_CELL.findall(text)
    except OSError as exc:
        raise InputError(f"{path}: cannot read the file ({exc.strerror}).") from exc
    if begins != ends:
        raise InputError(
            f"{path}: the stream is truncated ({begins} chunks begin, {ends} end); "
            "was indexamajig still writing it?"
        )
    crystal_cells = np.array(cells, dtype=np.float64).reshape(-1, 6)
    crystal_cells[:, :3] *= 10.0  # nm -> Å
    return header, n_crystals, crystal_cells


def _target_cell(header):
    """The a, b, c (Å), alpha, beta, gamma of the stream's target cell, or None."""
    start = header.find(b"----- Begin unit cell -----")
    if start < 0:
        return None
    block = header[start : header.find(b"----- End unit cell -----", start)]
    values = {}
    for name, value, unit in _TARGET_CELL.findall(block):
        values[name] = float(value) * (10.0 if unit == b"nm" else 1.0)
    names = (b"a", b"b", b"c", b"al", b"be", b"ga")
    return [values[name] for name in names] if all(n in values for n in names) else None


def _symmetrized(cell, group):
    """Impose the space group's metric on a mean of unconstrained per-crystal cells."""
    a, b, c, alpha, beta, gamma = cell
    system = group.crystal_system_str()
    if system == "cubic" or (system == "trigonal" and group.ext == "R"):
        length = (a + b + c) / 3
        angle = 90.0 if system == "cubic" else (alpha + beta + gamma) / 3
        return [length] * 3 + [angle] * 3
    if system in ("tetragonal", "trigonal", "hexagonal"):
        gamma = 90.0 if system == "tetragonal" else 120.0
        return [(a + b) / 2, (a + b) / 2, c, 90.0, 90.0, gamma]
    if system == "orthorhombic":
        return [a, b, c, 90.0, 90.0, 90.0]
    if system == "monoclinic":
        unique = "abc".index(group.monoclinic_unique_axis())
        angles = [90.0, 90.0, 90.0]
        angles[unique] = cell[3 + unique]
        return [a, b, c, *angles]
    return list(cell)
