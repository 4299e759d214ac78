"""Observation stores: the observation table on disk, for data sets larger than memory.

A store is a directory (conventionally named ``*.parquet``) of Apache Parquet files:

==========================  ================================================================
observations-NNNNN.parquet  the observations of input file NNNNN (its ``file_id``), sorted by
                            image, in row groups of whole images; ``image_id`` holds the
                            file's own image numbers
images.parquet              one row per image, in ``image_id`` order: ``file_id``, ``image``
                            (the file's number) and ``observations``
reflections.parquet         one row per ASU reflection (H, K, L); ``asu_index`` is the row
==========================  ================================================================

The schema metadata of ``reflections.parquet`` (key ``skmerge.store``) describe the whole
store in JSON: its format version, space group, cell, whether Friedel mates are apart,
the read options it was written with, and each input file's name, format, cell, space
group and counts. Each observations file's schema metadata (key ``skmerge.part``) hold its
input file's entry and the pandas dtypes of its columns.

A store is written file by file (:func:`write_store`) or chunk of images by chunk
(:class:`StoreWriter`), so that writing never holds more than one file's observations,
into a temporary directory beside its path that is renamed into place when complete.
:func:`read_store` (and :func:`skmerge.read_unmerged` given a store) rebuild the
observation table exactly as reading the input files gives it;
:func:`iter_image_batches` yields it as random minibatches of whole images, holding a
bounded buffer of row groups.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

import gemmi
import numpy as np
import pandas as pd
from sklearn.utils import check_random_state

from . import __version__
from .errors import DamagedFileError, InputError
from .symmetry import lookup_hkl, lookup_keys, pack_hkl, unpack_hkl
from .table import (INDEX_COLUMNS, OBSERVED_INDEX_COLUMNS, PartReader, ReadOptions, assemble_table,
                    with_symmetry)

__all__ = ["StoreWriter", "is_store", "iter_image_batches", "iter_store_chunks", "read_store", "write_store"]

FORMAT = "skmerge observation store"
VERSION = 1
STORE_KEY = b"skmerge.store"
PART_KEY = b"skmerge.part"
REFLECTIONS = "reflections.parquet"
IMAGES = "images.parquet"
# The row of each observation in its input file, kept only for files whose rows are not
# in image order (the store sorts them so that row groups hold whole images).
SOURCE_ROW = "_source_row"
# Observations per row group: large enough for fast scans, small enough that a few
# groups in a shuffle buffer stay far below the memory of the whole table.
ROW_GROUP_SIZE = 1 << 16


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:  # a dependency, but the rest of skmerge works without it
        raise InputError("observation stores need pyarrow; install it with 'pip install pyarrow'.") from exc
    return pa, pq


def write_store(paths, store, *, spacegroup=None, cell=None, anomalous=False, dmin=None, isigi_cutoff=None,
                intensity_key=None, sigma_key=None, image_key=None, drop_invalid=False, n_jobs=None, client=None,
                progress=False, row_group_size=ROW_GROUP_SIZE):
    """Convert reflection files into an observation store, one file at a time.

    Parameters
    ----------
    paths : path, rs.DataSet, or list of them
        The inputs of :func:`skmerge.read_unmerged`.
    store : path
        The store's directory; its parent must exist. An existing store there is replaced
        once the new one is complete; any other existing path is an error.
    spacegroup, cell, anomalous, dmin, isigi_cutoff, intensity_key, sigma_key, image_key, drop_invalid
        As in :func:`skmerge.read_unmerged`, applied while converting.
    n_jobs : int, optional
        Parse this many files at once in worker processes (−1: one per core).
    client : dask.distributed.Client, optional
        Parse the files on this dask cluster's workers instead.
    progress : bool, default=False
        Show a progress bar over the files.
    row_group_size : int, default=65536
        Observations per Parquet row group (whole images, so groups may be larger).

    Returns
    -------
    pathlib.Path
        The store.

    Raises
    ------
    InputError
        As :func:`skmerge.read_unmerged` does, or when ``store`` exists and is not a store.

    Examples
    --------
    >>> import skmerge
    >>> from skmerge.store import write_store
    >>> X, _ = skmerge.datasets.make_unmerged(n_images=5, random_state=0)
    >>> import tempfile, os
    >>> folder = tempfile.mkdtemp()
    >>> store = write_store(X, os.path.join(folder, "sim.parquet"))
    >>> len(skmerge.read_unmerged(store)) == len(X)
    True
    """
    options = ReadOptions.checked(spacegroup=spacegroup, cell=cell, anomalous=anomalous, dmin=dmin,
                                  isigi_cutoff=isigi_cutoff, intensity_key=intensity_key, sigma_key=sigma_key,
                                  image_key=image_key, drop_invalid=drop_invalid)
    reader = PartReader(paths, options, n_jobs=n_jobs, client=client, progress=progress)
    with StoreWriter(store, anomalous=anomalous, row_group_size=row_group_size) as writer:
        for part in reader:
            with writer.file(part.file_id, part.name, part.format, part.cell, part.spacegroup) as file:
                file.write(part.table, part.removed)
        reader.check_complete()
        writer.commit(reader.spacegroup, reader.cell, options)
    return Path(store)


def is_store(path):
    """Whether ``path`` names an observation store (a directory with a ``reflections.parquet``
    or any path ending in ``.parquet``, which :func:`read_store` then checks)."""
    if not isinstance(path, (str, os.PathLike)):
        return False
    path = Path(path)
    return path.suffix == ".parquet" or (path.is_dir() and (path / REFLECTIONS).is_file())


def store_input(paths):
    """The store among the inputs of read_unmerged, or None; InputError when a store comes
    with other inputs."""
    items = list(paths) if isinstance(paths, (list, tuple)) else [paths]
    stores = [item for item in items if is_store(item)]
    if not stores:
        return None
    if len(items) > 1:
        raise InputError(f"{stores[0]}: an observation store is read on its own; convert the other files into it "
                         "(skmerge convert FILES... STORE) instead of listing them beside it.")
    return Path(stores[0])


def read_store(store, *, anomalous=None):
    """Read the observation table back from an observation store.

    Parameters
    ----------
    store : path
    anomalous : bool, optional
        Keep acentric Friedel mates apart; by default as the store was written. When it
        differs, the ASU columns are recomputed from the observed Miller indices.

    Returns
    -------
    rs.DataSet
        The table :func:`skmerge.read_unmerged` returns for the store's input files.

    Raises
    ------
    InputError
        When ``store`` is not an observation store.
    DamagedFileError
        When it is one, but a part is missing or unreadable.

    Examples
    --------
    >>> from skmerge.store import read_store
    >>> X = read_store("runs.parquet")  # doctest: +SKIP
    """
    store = Path(store)
    manifest = read_manifest(store)
    spacegroup = gemmi.SpaceGroup(manifest["spacegroup"])
    cell = gemmi.UnitCell(*manifest["cell"])
    parts = [read_part(store, entry) for entry in manifest["files"]]
    table = pd.concat(parts, ignore_index=True, sort=False)
    if anomalous is not None and bool(anomalous) != manifest["anomalous"]:
        table = with_symmetry(table, table[list(OBSERVED_INDEX_COLUMNS)].to_numpy(np.int32), spacegroup, anomalous)
    return assemble_table(table, spacegroup, cell)


def read_manifest(store):
    """The description of a store (see the module docstring); InputError for a path that
    is not a store, DamagedFileError for a store whose description is unreadable."""
    _, pq = _pyarrow()
    store = Path(store)
    if not store.exists():
        raise InputError(f"{store}: no such observation store.")
    if not store.is_dir() or not (store / REFLECTIONS).exists():
        raise InputError(f"{store}: not an skmerge observation store (a directory with {REFLECTIONS}, written by "
                         "'skmerge convert' or skmerge.store.write_store).")
    try:
        metadata = pq.read_schema(store / REFLECTIONS).metadata or {}
    except (OSError, ValueError) as exc:
        raise DamagedFileError(f"{store / REFLECTIONS}: unreadable ({exc}); convert the reflection files "
                               "again.") from exc
    if STORE_KEY not in metadata:
        raise InputError(f"{store}: not an skmerge observation store ({REFLECTIONS} has no '{STORE_KEY.decode()}' "
                         "description).")
    try:
        manifest = json.loads(metadata[STORE_KEY])
        missing = [k for k in ("format", "version", "spacegroup", "cell", "anomalous", "files") if k not in manifest]
    except (ValueError, TypeError) as exc:
        missing = [str(exc)]
    if missing or manifest["format"] != FORMAT:
        raise DamagedFileError(f"{store}: damaged store description (lacks {', '.join(missing) or 'its format'}); "
                               "convert the reflection files again.")
    if manifest["version"] > VERSION:
        raise InputError(f"{store}: written by a newer skmerge (store version {manifest['version']}; this "
                         f"skmerge reads version {VERSION}); upgrade skmerge or convert the files again.")
    return manifest


def read_part(store, entry, row_groups=None, with_source_rows=False):
    """The observations of one input file of a store, as the observation table's parts
    hold them (see :class:`skmerge.table.Part`): all of them in the file's order, or
    those of some row groups in image order. ``with_source_rows`` also returns each
    row's position in the file's order, or None when the store kept that order."""
    _, pq = _pyarrow()
    path = Path(store) / entry["part"]
    try:
        parquet = pq.ParquetFile(path)
        dtypes = json.loads(parquet.schema_arrow.metadata[PART_KEY])["dtypes"]
        if row_groups is None:
            frame = parquet.read().to_pandas(ignore_metadata=True)
        else:
            frame = parquet.read_row_groups(row_groups).to_pandas(ignore_metadata=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DamagedFileError(f"{path}: missing or unreadable part of the observation store ({exc}); convert the "
                               "reflection files again.") from exc
    if row_groups is None and len(frame) != entry["observations"]:
        raise DamagedFileError(f"{path}: holds {len(frame):,} observations, the store's description "
                               f"{entry['observations']:,}; convert the reflection files again.")
    source_row = frame.pop(SOURCE_ROW).to_numpy() if SOURCE_ROW in frame.columns else None
    if source_row is not None and row_groups is None:
        frame = frame.take(np.argsort(source_row)).reset_index(drop=True)
    frame = frame.astype({c: d for c, d in dtypes.items() if c in frame.columns and str(frame[c].dtype) != d})
    return (frame, source_row) if with_source_rows else frame


def iter_image_batches(store, batch_images, *, buffer_images=1024, random_state=None, mtz_dtypes=True,
                       select=None):
    """Random minibatches of whole images from an observation store, in bounded memory.

    The store's row groups (whole images) are read in random order into a buffer of at
    least ``buffer_images`` images; each batch takes ``batch_images`` images at random
    from the buffer. One pass yields every image once, so memory is set by the buffer
    and not by the size of the store.

    Parameters
    ----------
    store : path
    batch_images : int
        Images per batch (the last batch may have fewer).
    buffer_images : int, default=1024
        Images held for shuffling (plus one row group).
    random_state : int, RandomState instance or None
    mtz_dtypes : bool, default=True
        Give the tables MTZ dtypes, as :func:`read_store` does; False leaves numpy's,
        which is several times faster.
    select : callable, optional
        Keep only some observations: called as ``select(image_id, rows)`` with the
        ``image_id`` of a row group's observations and their positions in the whole
        store's table, it returns a boolean mask of those to keep (images left without
        an observation are not drawn).

    Yields
    ------
    rs.DataSet
        Observation tables whose ``asu_index`` and ``image_id`` are those of the whole
        store's table (:func:`read_store`), with the rows of each image in file order.

    Examples
    --------
    >>> from skmerge.store import iter_image_batches
    >>> for batch in iter_image_batches("runs.parquet", 32, random_state=0):  # doctest: +SKIP
    ...     print(batch["image_id"].nunique())
    """
    if int(batch_images) < 1 or int(buffer_images) < 1:
        raise InputError(f"batch_images={batch_images!r} and buffer_images={buffer_images!r} must be positive.")
    index = _StoreIndex(store)
    rng = check_random_state(random_state)
    pending = [index.groups[i] for i in rng.permutation(len(index.groups))]
    # Rows taken into batches are marked dead rather than removed, so that a batch does
    # not copy the whole buffer; the buffer sheds them when it next takes a row group.
    pool, keys, alive, n_held = None, None, None, 0
    while pending or n_held:
        while pending and n_held < max(buffer_images, batch_images):
            entry, group, _ = pending.pop()
            frame, _ = index.read(entry, [group], select)
            frame_keys = _image_keys(frame["file_id"], frame["image_id"])
            if pool is None:
                pool, keys = frame, frame_keys
            else:
                pool = pd.concat([pool[alive], frame], ignore_index=True)
                keys = np.concatenate([keys[alive], frame_keys])
            alive = np.ones(len(pool), bool)
            n_held += len(np.unique(frame_keys))
        held = np.unique(keys[alive])
        chosen_keys = rng.choice(held, min(int(batch_images), len(held)), replace=False)
        chosen = alive & np.isin(keys, chosen_keys)
        alive &= ~chosen
        n_held -= len(chosen_keys)
        yield index.table(pool[chosen].reset_index(drop=True), mtz_dtypes)


def iter_store_chunks(store, chunk_rows=4 * ROW_GROUP_SIZE, mtz_dtypes=True, select=None):
    """An observation store in order, in pieces of whole row groups (whole images).

    Parameters
    ----------
    store : path
    chunk_rows : int, default=262144
        Observations per piece (at least one row group, whatever its size).
    mtz_dtypes : bool, default=True
        Give the tables MTZ dtypes, as :func:`read_store` does; False leaves numpy's,
        which is several times faster for passes that only compute with them.
    select : callable, optional
        Keep only some observations, as in :func:`iter_image_batches` (pieces left
        empty are skipped).

    Yields
    ------
    table : rs.DataSet
        Observations whose ``asu_index`` and ``image_id`` are those of the whole store's
        table (:func:`read_store`), in image order.
    rows : ndarray of int64
        The position of each of them in that table.

    Examples
    --------
    >>> from skmerge.store import iter_store_chunks
    >>> n = sum(len(table) for table, _ in iter_store_chunks("runs.parquet"))  # doctest: +SKIP
    """
    index = _StoreIndex(store)
    selected, size = [], 0
    for n, (entry, group, n_rows) in enumerate(index.groups):
        selected.append((entry, group))
        size += n_rows
        last = n + 1 == len(index.groups)
        if size < chunk_rows and not last and index.groups[n + 1][0] is entry:
            continue
        frame, rows = index.read(entry, [g for _, g in selected], select)
        selected, size = [], 0
        if len(frame):
            yield index.table(frame, mtz_dtypes), rows


class _StoreIndex:
    """What reading a store's row groups needs: its reflections and images (and the file
    of each image), its row groups (entry, group, rows) in file order, and where each
    file and group starts."""

    def __init__(self, store):
        _, pq = _pyarrow()
        self.store = Path(store)
        manifest = read_manifest(self.store)
        self.spacegroup, self.cell = gemmi.SpaceGroup(manifest["spacegroup"]), gemmi.UnitCell(*manifest["cell"])
        try:
            self.reflections = pq.read_table(self.store / REFLECTIONS).to_pandas()[list(INDEX_COLUMNS)].to_numpy(
                np.int32)
            images = pq.read_table(self.store / IMAGES).to_pandas()
            sizes = {entry["file_id"]: [pq.ParquetFile(self.store / entry["part"]).metadata.row_group(g).num_rows
                                        for g in range(pq.ParquetFile(self.store / entry["part"]).num_row_groups)]
                     for entry in manifest["files"]}
        except (OSError, ValueError, KeyError) as exc:
            raise DamagedFileError(f"{self.store}: missing or unreadable part of the observation store ({exc}); "
                                   "convert the reflection files again.") from exc
        self.image_keys = _image_keys(images["file_id"], images["image"])
        self.image_files = images["file_id"].to_numpy(np.int64)
        self.groups = [(entry, g, n) for entry in manifest["files"] for g, n in enumerate(sizes[entry["file_id"]])]
        self.group_starts = {f: np.concatenate([[0], np.cumsum(n)]).astype(np.int64) for f, n in sizes.items()}
        counts = [entry["observations"] for entry in manifest["files"]]
        self.file_starts = dict(zip((entry["file_id"] for entry in manifest["files"]),
                                    np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)))

    def read(self, entry, groups, select=None):
        """The observations of consecutive row groups of one part (see
        :func:`read_part`) and their positions in the whole store's table, only those
        that ``select`` keeps (see :func:`iter_image_batches`)."""
        frame, source_row = read_part(self.store, entry, groups, with_source_rows=True)
        if source_row is None:
            first = self.group_starts[entry["file_id"]][groups[0]]
            source_row = np.arange(first, first + len(frame))
        rows = self.file_starts[entry["file_id"]] + source_row
        if select is not None:
            kept = np.asarray(select(self.image_ids(frame), rows), bool)
            if not kept.all():
                frame, rows = frame[kept].reset_index(drop=True), rows[kept]
        return frame, rows

    def image_ids(self, frame):
        """The ``image_id`` in the whole store's table of rows of a part."""
        return lookup_keys(self.image_keys, _image_keys(frame["file_id"], frame["image_id"]))

    def table(self, frame, mtz_dtypes=True):
        """Rows of a part as rows of the whole store's table."""
        return assemble_table(frame, self.spacegroup, self.cell,
                              asu_index=lookup_hkl(self.reflections, frame[list(INDEX_COLUMNS)]),
                              image_id=self.image_ids(frame), mtz_dtypes=mtz_dtypes)


def _image_keys(file_id, image):
    """One sortable int64 per (file, image number), in the order of ``images.parquet``."""
    return (np.asarray(file_id, np.int64) << 40) + np.asarray(image, np.int64) + (1 << 39)


class StoreWriter:
    """Write an observation store input file by input file, and chunk by chunk.

    The store is built in a temporary directory beside ``path`` and renamed to it by
    :meth:`commit`; leaving the ``with`` block without committing (e.g. on an error)
    removes it.

    Parameters
    ----------
    path : path
        The store's directory.
    anomalous : bool
        Whether the parts' ASU columns keep Friedel mates apart.
    row_group_size : int
        Observations per row group (whole images).

    Examples
    --------
    See :func:`write_store`, which converts files with it, and
    :func:`skmerge.datasets.make_unmerged`, which writes simulated images chunk by chunk.
    """

    def __init__(self, path, *, anomalous, row_group_size=ROW_GROUP_SIZE):
        self.path = Path(path)
        self.anomalous = bool(anomalous)
        self.row_group_size = int(row_group_size)
        if self.row_group_size < 1:
            raise InputError(f"row_group_size={row_group_size!r}: give a positive number of observations.")
        if not self.path.parent.is_dir():
            raise InputError(f"{self.path}: the folder {self.path.parent} does not exist.")
        if self.path.exists() and not (self.path.is_dir() and (self.path / REFLECTIONS).is_file()):
            raise InputError(f"{self.path}: exists and is not an observation store; choose a new path.")
        self.files = {}
        self.images = []
        self.keys = []
        self.temporary = None

    def __enter__(self):
        self.temporary = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".partial",
                                               dir=self.path.parent))
        umask = os.umask(0)
        os.umask(umask)
        self.temporary.chmod(0o777 & ~umask)  # mkdtemp's directory is private; the store need not be
        return self

    def __exit__(self, *exc_info):
        if self.temporary is not None:
            shutil.rmtree(self.temporary, ignore_errors=True)
            self.temporary = None

    def file(self, file_id, name, format, cell, spacegroup):
        """A writer of the observations of input file ``file_id``; use it in a ``with``
        block and call its ``write`` with successive chunks of the file's part."""
        if file_id in self.files:
            raise ValueError(f"file {file_id} was written already")
        entry = {"file_id": int(file_id), "name": str(name), "format": format, "part": f"observations-{file_id:05d}.parquet",
                 "cell": list(cell.parameters), "spacegroup": spacegroup.xhm(), "observations": 0, "images": 0,
                 "removed": {}}
        return _PartWriter(self, entry)

    def commit(self, spacegroup, cell, options):
        """Write the store's description and move the store into place.

        Parameters
        ----------
        spacegroup : gemmi.SpaceGroup
        cell : gemmi.UnitCell
            The table's cell (the first file's).
        options : skmerge.table.ReadOptions
            The read options the parts were made with, recorded in the description.
        """
        pa, pq = _pyarrow()
        entries = [self.files[i] for i in sorted(self.files)]
        images = pd.concat(self.images, ignore_index=True).sort_values(["file_id", "image"], ignore_index=True)
        pq.write_table(pa.Table.from_pandas(images, preserve_index=False), self.temporary / IMAGES)
        reflections = unpack_hkl(np.unique(np.concatenate(self.keys)))
        manifest = {
            "format": FORMAT, "version": VERSION, "skmerge": __version__, "spacegroup": spacegroup.xhm(),
            "cell": list(cell.parameters), "anomalous": self.anomalous,
            "options": {"dmin": options.dmin, "isigi_cutoff": options.isigi_cutoff,
                        "intensity_key": options.intensity_key, "sigma_key": options.sigma_key,
                        "image_key": options.image_key, "drop_invalid": bool(options.drop_invalid),
                        "spacegroup": None if options.spacegroup is None else options.spacegroup.xhm(),
                        "cell": None if options.cell is None else list(options.cell.parameters)},
            "observations": sum(e["observations"] for e in entries), "images": int(len(images)),
            "reflections": int(len(reflections)), "files": entries,
        }
        table = pa.table({k: reflections[:, i] for i, k in enumerate(INDEX_COLUMNS)})
        pq.write_table(table.replace_schema_metadata({STORE_KEY: json.dumps(manifest)}), self.temporary / REFLECTIONS)
        self._move_into_place()

    def _move_into_place(self):
        old = None
        if self.path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".old", dir=self.path.parent))
            os.replace(self.path, old / "store")
        os.replace(self.temporary, self.path)
        self.temporary = None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


class _PartWriter:
    """Writes one input file's observations as row groups of whole images."""

    def __init__(self, store, entry):
        self.store = store
        self.entry = entry
        self.writer = None
        self.buffer = None
        self.in_image_order = None
        self.image_counts = []

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if self.buffer is not None and (len(self.buffer) or self.writer is None):
            self._write_rows(self.buffer)
        if self.writer is not None:
            self.writer.close()
        if exc_type is None:
            counts = pd.concat(self.image_counts).groupby(level=0, sort=True).sum()
            self.entry["images"] = int(len(counts))
            self.store.images.append(pd.DataFrame({"file_id": np.int32(self.entry["file_id"]),
                                                   "image": counts.index.to_numpy(np.int64),
                                                   "observations": counts.to_numpy(np.int64)}))
            self.store.files[self.entry["file_id"]] = self.entry

    def write(self, table, removed=None):
        """Append rows of the file's part (a :class:`skmerge.table.Part` table, mapped
        to the ASU); chunks should hold whole images, in increasing image order."""
        image = table["image_id"].to_numpy()
        if self.in_image_order is None:
            self.in_image_order = bool((np.diff(image) >= 0).all())
        if not self.in_image_order:
            order = np.argsort(image, kind="stable")
            source_row = self.entry["observations"] + order
            table = table.take(order).reset_index(drop=True)
            table[SOURCE_ROW] = source_row
            image = image[order]
        elif (np.diff(image) < 0).any():
            raise ValueError("chunks of a part whose first chunk was in image order must each be in image order")
        self.entry["observations"] += len(table)
        for why, n in (removed or {}).items():
            self.entry["removed"][why] = self.entry["removed"].get(why, 0) + int(n)
        self.store.keys.append(np.unique(pack_hkl(table[list(INDEX_COLUMNS)].to_numpy())))
        self.image_counts.append(pd.Series(image).value_counts())
        rows = table if self.buffer is None else pd.concat([self.buffer, table], ignore_index=True)
        image = rows["image_id"].to_numpy()
        starts = np.flatnonzero(np.r_[True, image[1:] != image[:-1]])
        size, begin = self.store.row_group_size, 0
        while len(rows) - begin >= size:
            after = np.searchsorted(starts, begin + size)
            if after == len(starts):  # the last image may go on in the next chunk
                break
            self._write_rows(rows.iloc[begin:starts[after]])
            begin = starts[after]
        self.buffer = rows.iloc[begin:].reset_index(drop=True)

    def _write_rows(self, rows):
        pa, pq = _pyarrow()
        if self.writer is None:
            dtypes = {str(c): str(d) for c, d in rows.dtypes.items()}
            self.schema = pa.Schema.from_pandas(rows, preserve_index=False).with_metadata(
                {PART_KEY: json.dumps({"file": {k: self.entry[k] for k in ("file_id", "name", "format", "cell", "spacegroup")},
                                       "dtypes": dtypes})})
            # Dictionary encoding suits few distinct values; for intensities and indices it
            # only costs time (it makes writing several times slower).
            self.writer = pq.ParquetWriter(self.store.temporary / self.entry["part"], self.schema,
                                           use_dictionary=False)
        table = pa.Table.from_pandas(rows, schema=self.schema, preserve_index=False)
        self.writer.write_table(table, row_group_size=max(1, len(rows)))
