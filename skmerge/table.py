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

import os
import warnings
from collections import deque
from dataclasses import dataclass, field
from numbers import Integral
from os import PathLike
from pathlib import Path

import gemmi
import numpy as np
import pandas as pd
import reciprocalspaceship as rs

from .errors import DataWarning, InputError
from .io import read_reflection_file, sniff_format
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
    n_jobs=None,
    client=None,
    progress=False,
    store=None,
):
    """Read unmerged reflection files into one observation table.

    Parameters
    ----------
    paths : path, rs.DataSet, or list of them
        Unmerged MTZ, XDS_ASCII.HKL / INTEGRATE.HKL, CrystFEL ``.stream`` or DIALS
        ``.refl`` files (the format is recognised from the file), or data sets already
        in memory. Several inputs are concatenated; ``file_id`` records their order.
        Or one observation store (:func:`skmerge.store.write_store`, ``skmerge convert``):
        the table it was written from is read back; the read options below other than
        ``anomalous`` were applied when it was written and cannot be given again.
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
    n_jobs : int, optional
        Parse this many files at once, each in a worker process (−1: one per core). By
        default the files are parsed one after the other in this process. The table is
        the same either way.
    client : dask.distributed.Client, optional
        Parse the files on the workers of this dask cluster instead (they must see the
        files under the same paths).
    progress : bool, default=False
        Show a progress bar over the files, with the number of observations read.
    store : path, optional
        Also write the observations to an observation store at this path, file by file
        (see :func:`skmerge.store.write_store`), and return the table read back from it.

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
        non-isomorphous files, or when the filters leave nothing; for a damaged store.

    Examples
    --------
    >>> import skmerge
    >>> X = skmerge.read_unmerged("hypf_unmerged.mtz", anomalous=True)  # doctest: +SKIP
    >>> X[["H", "K", "L", "image_id", "Iobs", "SIGIobs"]].head()  # doctest: +SKIP
    >>> X = skmerge.read_unmerged(["run1.stream", "run2.stream"], spacegroup="P 43 21 2",
    ...                           n_jobs=2, store="runs.parquet")  # doctest: +SKIP
    """
    from .store import read_store, store_input, write_store

    read_options = dict(spacegroup=spacegroup, cell=cell, dmin=dmin, isigi_cutoff=isigi_cutoff,
                        intensity_key=intensity_key, sigma_key=sigma_key, image_key=image_key,
                        drop_invalid=drop_invalid)
    if store is not None:
        write_store(paths, store, anomalous=anomalous, n_jobs=n_jobs, client=client, progress=progress,
                    **read_options)
        return read_store(store, anomalous=anomalous)
    stored = store_input(paths)
    if stored is not None:
        given = [name for name, value in read_options.items() if value not in (None, False)]
        if given:
            raise InputError(f"{stored}: {', '.join(given)} were applied when the observation store was written; "
                             "read the store without them, or convert the reflection files again with them.")
        return read_store(stored, anomalous=anomalous)
    reader = PartReader(paths, ReadOptions.checked(anomalous=anomalous, **read_options), n_jobs=n_jobs,
                        client=client, progress=progress)
    parts = sorted(reader, key=lambda part: part.file_id)
    reader.check_complete()
    table = pd.concat([part.table for part in parts], ignore_index=True, sort=False)
    return assemble_table(table, reader.spacegroup, reader.cell)


@dataclass(frozen=True)
class ReadOptions:
    """The validated read options of :func:`read_unmerged` that apply to every file."""

    spacegroup: gemmi.SpaceGroup = None
    cell: gemmi.UnitCell = None
    anomalous: bool = False
    dmin: float = None
    isigi_cutoff: float = None
    intensity_key: str = None
    sigma_key: str = None
    image_key: str = None
    drop_invalid: bool = False

    @classmethod
    def checked(cls, *, spacegroup=None, cell=None, dmin=None, isigi_cutoff=None, **options):
        """The options of read_unmerged's keywords; InputError for a value that cannot work."""
        _check_positive("dmin", dmin)
        _check_positive("isigi_cutoff", isigi_cutoff, allow_zero=True, allow_negative=True)
        return cls(spacegroup=None if spacegroup is None else _as_spacegroup(spacegroup),
                   cell=None if cell is None else _as_cell(cell), dmin=dmin, isigi_cutoff=isigi_cutoff, **options)


@dataclass
class Part:
    """The observations of one input file on their way into the observation table.

    ``table`` holds the file's own image numbers in ``image_id`` (dense ids across files
    are given by :func:`assemble_table`); it has the ASU columns once ``symmetric``.
    """

    file_id: int
    name: str
    format: str
    table: pd.DataFrame
    spacegroup: gemmi.SpaceGroup
    cell: gemmi.UnitCell
    warnings: list = field(default_factory=list)
    removed: dict = field(default_factory=dict)
    symmetric: bool = False


class PartReader:
    """The parts of the observation table of some inputs, one per input, parsed in worker
    processes when asked and checked against each other as they come.

    Iterating yields each :class:`Part` once it is mapped to the ASU (in input order,
    except that parts of files without a space group wait for the first file that has
    one); then :meth:`check_complete` raises if a space group never came or nothing is
    left. ``spacegroup`` and ``cell`` (the first file's) are those of the table.
    """

    def __init__(self, paths, options, *, n_jobs=None, client=None, progress=False):
        self.inputs = _inputs(paths)
        self.options = options
        self.workers = _n_workers(n_jobs, client, len(self.inputs))
        self.client = client
        self.progress = progress
        self.spacegroup = options.spacegroup
        self.cell = None
        self.n_observations = 0
        self.removed = {}
        self._found = {}
        self._waiting = []

    @property
    def names(self):
        return ", ".join(_input_name(i, item) for i, item in enumerate(self.inputs))

    def __iter__(self):
        from tqdm.auto import tqdm

        tasks = [(i, item, self.options) for i, item in enumerate(self.inputs)]
        with tqdm(total=len(tasks), desc="read", unit="file", disable=not self.progress, dynamic_ncols=True) as bar:
            for part in _map_in_order(parse_part, tasks, self.workers, self.client):
                for message in part.warnings:
                    warnings.warn(message, DataWarning, stacklevel=3)
                self._check_cell(part)
                self._note_spacegroup(part)
                self._waiting.append(part)
                for ready in self._ready():
                    self.n_observations += len(ready.table)
                    for why, n in ready.removed.items():
                        self.removed[why] = self.removed.get(why, 0) + n
                    yield ready
                bar.set_postfix_str(f"{self.n_observations:,} observations", refresh=False)
                bar.update()

    def check_complete(self):
        """InputError when no file gave a space group, or the filters left nothing."""
        if self._waiting:
            raise InputError(
                f"{self.names}: no space group recorded in the input (an XDS file's "
                "!SPACE_GROUP_NUMBER, an MTZ file's symmetry); pass spacegroup= (e.g. spacegroup="
                "'P 43 21 2'; on the command line --spacegroups)."
            )
        if not self.n_observations:
            detail = ", ".join(f"{n} by {why}" for why, n in self.removed.items() if n)
            raise InputError(
                f"{self.names}: no observations left after filtering ({detail}). "
                "Relax dmin (--dmin) / isigi_cutoff (--isigi-cutoff), or check the space group."
            )

    def _ready(self):
        if self.spacegroup is None:
            return
        while self._waiting:
            part = self._waiting.pop(0)
            yield part if part.symmetric else _symmetrise(part, self.spacegroup, self.options)

    def _note_spacegroup(self, part):
        if self.options.spacegroup is not None or part.spacegroup is None:
            return
        self._found.setdefault(part.spacegroup.xhm(), []).append(part.name)
        if len(self._found) > 1:
            listing = "; ".join(f"{sg} in {', '.join(names)}" for sg, names in self._found.items())
            raise InputError(
                f"the files record different space groups ({listing}). Merge files of one "
                "space group, or pass spacegroup= (--spacegroups) to impose one."
            )
        self.spacegroup = part.spacegroup

    def _check_cell(self, part):
        if self.cell is None:
            self.cell = part.cell
        elif self.options.cell is None and not isomorphous(self.cell, part.cell):
            raise InputError(
                f"{part.name}: cell {_fmt_cell(part.cell)} is not isomorphous with {_input_name(0, self.inputs[0])} "
                f"({_fmt_cell(self.cell)}). Merge isomorphous data only, or pass cell= (--cell) to "
                "impose one cell on all files."
            )


def parse_part(file_id, item, options):
    """Parse one input into its :class:`Part`, mapped to the ASU when its space group is
    known. Runs in worker processes, so its warnings are returned, not issued."""
    name = _input_name(file_id, item)
    if isinstance(item, pd.DataFrame):
        dataset, fmt = item, "table"
    else:
        fmt = sniff_format(item)
        dataset = read_reflection_file(item, spacegroup=options.spacegroup)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DataWarning)
        table = _drop_repeated_rows(name, _standardise(name, dataset, options.intensity_key, options.sigma_key,
                                                       options.image_key, options.drop_invalid))
    cell = options.cell or getattr(dataset, "cell", None)
    if cell is None or cell.volume <= 0:
        raise InputError(f"{name}: no unit cell recorded (an XDS file's !UNIT_CELL_CONSTANTS, an MTZ "
                         "file's cell); pass cell=(a, b, c, α, β, γ) (on the command line --cell).")
    table["file_id"] = np.int32(file_id)
    table["dHKL"] = resolution(table[list(OBSERVED_INDEX_COLUMNS)].to_numpy(), cell)
    spacegroup = options.spacegroup or getattr(dataset, "spacegroup", None)
    part = Part(file_id, name, fmt, table, spacegroup, cell, [str(w.message) for w in caught])
    return part if spacegroup is None else _symmetrise(part, spacegroup, options)


def _symmetrise(part, spacegroup, options):
    """The part without absences and filtered observations, with its ASU columns."""
    if not part.cell.is_compatible_with_spacegroup(spacegroup, 1e-2):
        raise InputError(
            f"{'cell=' if options.cell is not None else part.name}: cell {_fmt_cell(part.cell)} is incompatible "
            f"with space group {spacegroup.xhm()}; check the space group or pass the right cell= (--cell)."
        )
    table = part.table
    hkl_obs = table[list(OBSERVED_INDEX_COLUMNS)].to_numpy(np.int32)
    keep = ~systematically_absent(hkl_obs, spacegroup)
    removed = {"systematic absences": int((~keep).sum())}
    if options.dmin is not None:
        ok = table["dHKL"].to_numpy() >= options.dmin
        removed[f"dHKL < {options.dmin}"] = int((keep & ~ok).sum())
        keep &= ok
    if options.isigi_cutoff is not None:
        ok = table["Iobs"].to_numpy() >= options.isigi_cutoff * table["SIGIobs"].to_numpy()
        removed[f"I/σ < {options.isigi_cutoff}"] = int((keep & ~ok).sum())
        keep &= ok
    if not keep.all():
        table = table.loc[keep].reset_index(drop=True)
    # The table stores them in single precision; casting here halves what a store holds.
    table = table.astype({"Iobs": np.float32, "SIGIobs": np.float32})
    table = with_symmetry(table, hkl_obs[keep], spacegroup, options.anomalous)
    return Part(part.file_id, part.name, part.format, table, spacegroup, part.cell, part.warnings, removed, True)


def with_symmetry(table, hkl_obs, spacegroup, anomalous):
    """``table`` with the observed Miller indices ``hkl_obs`` and their ASU columns (H, K,
    L, CENTRIC, EPSILON) in front."""
    asu_hkl, _ = map_to_asu(hkl_obs, spacegroup, anomalous)
    centric, epsilon = reflection_flags(asu_hkl, spacegroup)
    symmetry = pd.DataFrame({
        **{k: asu_hkl[:, i] for i, k in enumerate(INDEX_COLUMNS)},
        **{k: np.asarray(hkl_obs[:, i], np.int32) for i, k in enumerate(OBSERVED_INDEX_COLUMNS)},
        "CENTRIC": centric,
        "EPSILON": epsilon,
    })
    rest = table.drop(columns=[c for c in symmetry.columns if c in table.columns]).reset_index(drop=True)
    return pd.concat([symmetry, rest], axis=1)


def assemble_table(table, spacegroup, cell, asu_index=None, image_id=None, mtz_dtypes=True):
    """The observation table of rows with ASU columns (:func:`with_symmetry`): MTZ
    dtypes (unless ``mtz_dtypes`` is False: numpy's, several times faster to make), the
    table's columns first, and ``asu_index`` and ``image_id`` as given (for rows of a
    larger table), else dense over the rows' reflections and over their images numbered
    by file, then image."""
    if asu_index is None:
        _, asu_index = unique_hkl(table[list(INDEX_COLUMNS)].to_numpy(np.int32))
    if image_id is None:
        image_id = dense_image_ids(table["file_id"].to_numpy(), table["image_id"].to_numpy())
    columns = {
        **{k: table[k].to_numpy(np.int32) for k in (*INDEX_COLUMNS, *OBSERVED_INDEX_COLUMNS)},
        "asu_index": asu_index,
        "CENTRIC": table["CENTRIC"].to_numpy(bool),
        "EPSILON": table["EPSILON"].to_numpy(),
        "dHKL": table["dHKL"].to_numpy(np.float32),
        "image_id": image_id,
        "file_id": table["file_id"].to_numpy(),
        "Iobs": table["Iobs"].to_numpy(np.float32),
        "SIGIobs": table["SIGIobs"].to_numpy(np.float32),
    }
    out = rs.DataSet(columns, spacegroup=spacegroup, cell=cell, merged=False)
    if not mtz_dtypes:
        for column in table.columns:
            if column not in TABLE_COLUMNS:
                out[column] = table[column].to_numpy()
        return out
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
    for column in table.columns:
        if column not in TABLE_COLUMNS:
            out[column] = table[column].array
    return out


def take_rows(X, mask):
    """The rows of the observation table X where ``mask`` is True: X itself, not a copy,
    when that is all of them.

    Examples
    --------
    >>> import numpy as np
    >>> import pandas as pd
    >>> from skmerge.table import take_rows
    >>> X = pd.DataFrame({"Iobs": [1.0, 2.0, 3.0]})
    >>> take_rows(X, np.array([True, True, True])) is X, len(take_rows(X, np.array([True, False, True])))
    (True, 2)
    """
    return X if mask.all() else X.iloc[np.flatnonzero(mask)]


def dense_image_ids(file_id, image):
    """0, 1, … over the distinct (file, image) pairs, ordered by file, then image."""
    file_id, image = np.asarray(file_id, np.int64), np.asarray(image, np.int64)
    order = np.lexsort((image, file_id))
    new = np.ones(len(order), dtype=bool)
    new[1:] = (np.diff(file_id[order]) != 0) | (np.diff(image[order]) != 0)
    ids = np.empty(len(order), dtype=np.int64)
    ids[order] = np.cumsum(new) - 1
    return ids


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


def _inputs(paths):
    """The inputs as a list; InputError for none, a file given twice, or a foreign object."""
    if isinstance(paths, (str, PathLike, pd.DataFrame)):
        paths = [paths]
    paths = list(paths)
    if not paths:
        raise InputError("no reflection files given.")
    files = [Path(p).resolve() for p in paths if isinstance(p, (str, PathLike))]
    twice = sorted({str(p) for p in files if files.count(p) > 1})
    if twice:
        raise InputError(f"{', '.join(twice)}: given more than once; each file's observations would count twice.")
    for i, item in enumerate(paths):
        if not isinstance(item, (str, PathLike, pd.DataFrame)):
            raise InputError(
                f"input {i} is a {type(item).__name__}; give file paths or rs.DataSet objects."
            )
    return paths


def _input_name(i, item):
    return f"<data set {i}>" if isinstance(item, pd.DataFrame) else str(item)


def _n_workers(n_jobs, client, n_inputs):
    """How many processes parse files at once (1: this one)."""
    if client is not None:
        if not hasattr(client, "get_executor"):
            raise InputError(f"client={client!r} is not a dask.distributed Client.")
        return max(1, len(client.scheduler_info().get("workers", {})))
    if n_jobs is None:
        return 1
    if not isinstance(n_jobs, Integral) or isinstance(n_jobs, bool) or n_jobs == 0:
        raise InputError(f"n_jobs={n_jobs!r} (--n-jobs): give a whole number of processes, or -1 for one per core.")
    cores = os.cpu_count() or 1
    return max(1, min(n_inputs, n_jobs if n_jobs > 0 else cores + 1 + n_jobs))


def _map_in_order(function, tasks, workers, client=None):
    """``function(*task)`` of every task, in order: in this process with one worker, else
    on a process pool (or the dask client's workers), with at most twice as many tasks
    under way as workers so that finished results never pile up."""
    if workers == 1 and client is None:
        for task in tasks:
            yield function(*task)
        return
    if client is not None:
        executor = client.get_executor()
    else:
        # loky's workers are fresh interpreters (forking a process that runs TensorFlow's
        # threads can deadlock) that, unlike multiprocessing's, need no __main__ guard in
        # the user's script; they are reused by later calls.
        from joblib.externals.loky import get_reusable_executor

        executor = get_reusable_executor(max_workers=workers)
    pending = deque()
    try:
        for task in tasks:
            pending.append(executor.submit(function, *task))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()


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


def _as_cell(cell):
    if not isinstance(cell, gemmi.UnitCell):
        try:
            cell = gemmi.UnitCell(*[float(x) for x in cell])
        except (TypeError, ValueError) as exc:
            raise InputError(f"cell={cell!r} (--cell): give six numbers a, b, c, α, β, γ.") from exc
    if not cell.volume > 0:  # gemmi accepts zero lengths and impossible angles
        raise InputError(f"cell={_fmt_cell(cell)} (--cell) has no volume; give lengths > 0 and angles of a "
                         "real cell.")
    return cell


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
    # An observation table read again (a store written from one) holds the indices as
    # observed in Hobs, Kobs, Lobs and the ASU's in H, K, L: the Friedel sign of the ASU's
    # is not the observed one, and the beam read from the spots needs it (stills detection).
    observed = OBSERVED_INDEX_COLUMNS if set(OBSERVED_INDEX_COLUMNS) <= set(frame.columns) else INDEX_COLUMNS
    part = pd.DataFrame(
        {
            "Hobs": frame[observed[0]].to_numpy(np.int32),
            "Kobs": frame[observed[1]].to_numpy(np.int32),
            "Lobs": frame[observed[2]].to_numpy(np.int32),
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


def _fmt_cell(cell):
    return "(" + ", ".join(f"{x:.2f}" for x in cell.parameters) + ")"
