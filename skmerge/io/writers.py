"""Writers of skmerge's output files.

Every file is written to a temporary name in its own directory and renamed into place
(``os.replace``, atomic on POSIX and Windows), so an interrupted run leaves either the
complete file or none — never a truncated one under the final name. A run's files are
written as a set (:func:`output_set`): into a staging directory first, then moved into
place together, replacing the earlier run's set under the same prefix.
"""

import contextlib
import json
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import reciprocalspaceship as rs

from ..errors import InputError
from ..signals import signals_held

# MTZ column types of the per-observation predictions file.
PREDICTION_TYPES = {
    "Iobs": "Intensity",
    "SIGIobs": "Stddev",
    "Ipred": "Intensity",
    "SIGIpred": "Stddev",
    "Z": "MTZReal",
    "Weight": "Weight",
    "Scale": "MTZReal",
    "SIGScale": "Stddev",
    "image_id": "Batch",
    "file_id": "MTZInt",
    "test": "MTZInt",
    "shadowed": "MTZInt",
}


def check_output_prefix(prefix):
    """Raise InputError unless files can be written under the path prefix ``prefix``
    (e.g. ``out/hypf``): its directory exists and is writable, and it is no directory
    itself."""
    prefix = str(prefix)
    path = Path(prefix)
    if prefix.endswith(("/", os.sep)) or path.is_dir():
        raise InputError(f"output {prefix!r} is a directory; give a prefix inside it, e.g. "
                         f"{os.path.join(prefix, 'merged')}")
    directory = path.parent
    if not directory.is_dir():
        raise InputError(f"output directory {str(directory)!r} does not exist; create it first "
                         f"(mkdir -p {directory})")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise InputError(f"output directory {str(directory)!r} is not writable")


@contextlib.contextmanager
def atomic_path(path):
    """A temporary path next to ``path`` to write to; renamed to ``path`` when the block
    ends without an exception, removed otherwise.

    Examples
    --------
    >>> with atomic_path("out/hypf_0.mtz") as tmp:  # doctest: +SKIP
    ...     merged.write_mtz(tmp)
    """
    path = Path(path)
    tmp = _reserve_temporary(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


# The files a run writes under its prefix OUT (OUT + one of these).
OUTPUT_SUFFIXES = (r"_\d+\.mtz", r"_predictions_\d+\.mtz", r"_predictions\.parquet", r"_xval_\d+\.mtz", r"_history\.csv", r"\.joblib",
                   r"\.npz", r"_stats\.csv", r"_stats\.json", r"_history\.png", r"_cchalf\.png", r"_calibration\.png",
                   r"_report\.html", r"_reindexing\.csv")


def run_outputs(prefix):
    """The files of a run (any run) under ``prefix`` that exist now."""
    prefix = Path(prefix)
    pattern = re.compile(re.escape(prefix.name) + "(" + "|".join(OUTPUT_SUFFIXES) + ")$")
    return sorted(p for p in prefix.parent.iterdir() if pattern.match(p.name) and p.is_file())


@contextlib.contextmanager
def output_set(prefix):
    """Write a run's files as a set: yields a prefix in a staging directory beside
    ``prefix``; when the block succeeds its files replace the earlier run's under
    ``prefix`` (files of an earlier run that this one does not write are removed, so
    ``skmerge stats`` never mixes two runs). If the block raises — an error, a full
    disk, a signal turned into an exception — the staging directory is removed and the
    earlier outputs stay as they were. SIGINT and SIGTERM wait while files are moved."""
    prefix = Path(prefix)
    staging = Path(tempfile.mkdtemp(prefix=f".{prefix.name}.", suffix=".part", dir=prefix.parent))
    try:
        yield staging / prefix.name
        new = sorted(staging.iterdir())
        names = {path.name for path in new}
        with signals_held():
            for path in run_outputs(prefix):
                if path.name not in names:
                    os.remove(path)
            for path in new:
                os.replace(path, prefix.parent / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _reserve_temporary(path):
    """Create an empty, uniquely named file beside ``path`` with the permissions a new
    file gets (``tempfile.mkstemp`` would make it private to the user)."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.part"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return str(tmp)
    raise FileExistsError(f"cannot create a temporary file beside {path}")


def write_mtz(dataset, path):
    """Write an ``rs.DataSet`` as an MTZ file, atomically."""
    # reciprocalspaceship may convert columns of the object it writes in place.
    dataset = dataset.copy()
    with atomic_path(path) as tmp:
        dataset.write_mtz(tmp)
    return Path(path)


def write_csv(frame, path, index=False):
    """Write a DataFrame as CSV, atomically."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=index)
    return Path(path)


def write_json(data, path):
    """Write JSON-serialisable ``data``, atomically (NaN written as null)."""
    return write_text(json.dumps(_json_safe(data), indent=2, ensure_ascii=False) + "\n", path)


def write_text(text, path):
    """Write a str as UTF-8, atomically."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return Path(path)


def write_joblib(obj, path):
    """Persist ``obj`` (e.g. a fitted merger) with joblib, atomically."""
    import joblib

    with atomic_path(path) as tmp:
        joblib.dump(obj, tmp)
    return Path(path)


def write_figure(figure, path, dpi=120):
    """Save a matplotlib Figure as PNG through the Agg canvas, atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    return Path(path)


def history_table(loss_curve, held_out_loss=None):
    """The per-step loss terms of a fit as a DataFrame: step, loss, nll, kl, and with
    ``held_out_loss`` (rows of step and value) a ``test_loss`` column, empty at the
    steps where it was not evaluated."""
    curve = np.asarray(loss_curve, dtype=np.float64).reshape(len(loss_curve), -1)
    names = ["loss", "nll", "kl"][: curve.shape[1]]
    table = pd.DataFrame(curve, columns=names)
    table.insert(0, "step", np.arange(1, len(table) + 1))
    if held_out_loss is not None:
        test_loss = np.full(len(table), np.nan)
        steps, values = np.asarray(held_out_loss, dtype=np.float64).reshape(-1, 2).T
        test_loss[steps.astype(np.int64) - 1] = values
        table["test_loss"] = test_loss
    return table


def predictions_table(X, ipred, sigipred, z, weight, scale, sigscale, test=None, shadowed=None):
    """Per-observation predictions as an unmerged ``rs.DataSet`` ready for MTZ.

    The rows are indexed by the reflection's ASU index with an M/ISYM column (the
    standard unmerged MTZ layout), which reciprocalspaceship reads back as the observed
    index and gemmi as ASU index plus symmetry operator.

    Parameters
    ----------
    X : rs.DataSet
        The observation table (Hobs/Kobs/Lobs, Iobs, SIGIobs, image_id, file_id).
    ipred, sigipred, z, weight, scale, sigscale : array-like of shape (n_observations,)
        The predicted intensity, its σ, the predictive z-score and outlier weight
        (:func:`skmerge.calibration.observation_scores`), the scale and its σ of each
        observation.
    test : array-like of bool, optional
        True for observations held out of the fit.
    shadowed : array-like of bool, optional
        True for observations left out of the fit behind a detector shadow
        (:mod:`skmerge.shadows`).
    """
    n = len(X)
    test = np.zeros(n, dtype=bool) if test is None else np.asarray(test, dtype=bool)
    shadowed = np.zeros(n, dtype=bool) if shadowed is None else np.asarray(shadowed, dtype=bool)
    keys = ["Hobs", "Kobs", "Lobs"] if "Hobs" in X.columns else ["H", "K", "L"]
    hkl = X[keys].to_numpy(np.int32)
    data = {
        "H": hkl[:, 0], "K": hkl[:, 1], "L": hkl[:, 2],
        "Iobs": X["Iobs"].to_numpy(np.float32),
        "SIGIobs": X["SIGIobs"].to_numpy(np.float32),
        "Ipred": np.asarray(ipred, dtype=np.float32),
        "SIGIpred": np.asarray(sigipred, dtype=np.float32),
        "Z": np.asarray(z, dtype=np.float32),
        "Weight": np.asarray(weight, dtype=np.float32),
        "Scale": np.asarray(scale, dtype=np.float32),
        "SIGScale": np.asarray(sigscale, dtype=np.float32),
        "image_id": X["image_id"].to_numpy(np.int64),
        "file_id": X["file_id"].to_numpy(np.int64) if "file_id" in X.columns else np.zeros(n, np.int64),
        "test": test.astype(np.int32),
        "shadowed": shadowed.astype(np.int32),
    }
    for name, values in data.items():
        if len(values) != n:
            raise InputError(f"{name} has {len(values)} values for {n} observations.")
    table = rs.DataSet(data, spacegroup=X.spacegroup, cell=X.cell, merged=False)
    table = table.astype({"H": "HKL", "K": "HKL", "L": "HKL", **PREDICTION_TYPES}).set_index(["H", "K", "L"])
    table = table.hkl_to_asu()
    return table[["M/ISYM", *PREDICTION_TYPES]]


def prediction_flags(predictions):
    """(held out, shadowed): arrays of bool over the rows of a predictions table, from
    its ``test`` and ``shadowed`` columns (all False for a column the table lacks, as in
    the files of earlier versions).

    Examples
    --------
    >>> import pandas as pd
    >>> from skmerge.io.writers import prediction_flags
    >>> prediction_flags(pd.DataFrame({"test": [0, 1, 1], "shadowed": [0, 0, 1]}))
    (array([False,  True,  True]), array([False, False,  True]))
    """
    return tuple(predictions[c].to_numpy(np.float64, na_value=0) > 0 if c in predictions.columns
                 else np.zeros(len(predictions), dtype=bool) for c in ("test", "shadowed"))


def evaluation_rows(predictions):
    """The rows of a predictions table that test the fit: held out of it and not behind a
    detector shadow (which the model does not describe), an array of bool.

    Examples
    --------
    >>> import pandas as pd
    >>> from skmerge.io.writers import evaluation_rows
    >>> evaluation_rows(pd.DataFrame({"test": [0, 1, 1], "shadowed": [0, 0, 1]}))
    array([False,  True, False])
    """
    held_out, shadowed = prediction_flags(predictions)
    return held_out & ~shadowed


# careless's names of the σ columns its analysis tools read (skmerge's merged files keep
# the CCP4 names SIGF, SIGI, which refinement programs expect).
_CARELESS_NAMES = {f"SIG{name}{half}": f"Sig{name}{half}" for name in ("F", "I", "Iobs", "Ipred")
                   for half in ("", "(+)", "(-)")}
_FRIEDEL_MEANS = ("F", "SIGF", "I", "SIGI", "N")


def careless_layout(table):
    """A half-dataset or predictions table in the layout careless's analysis tools read
    (``careless.cchalf``, ``careless.ccanom``, ``careless.ccpred``): σ columns named as
    careless names them (``SigF``, ``SigI(+)``, ``SigIobs``, ...) and, when the table has
    Friedel halves, without the Friedel means F, SIGF, I, SIGI and N, which would collide
    with the halves when reciprocalspaceship's ``stack_anomalous`` stacks them
    (:func:`skmerge.stats.standardise_columns` rebuilds them when skmerge reads the file).

    Examples
    --------
    >>> import reciprocalspaceship as rs
    >>> table = rs.DataSet({"F": [1.0], "SIGF": [0.1], "F(+)": [1.1], "SIGF(+)": [0.2], "F(-)": [0.9],
    ...                     "SIGF(-)": [0.2], "DANO": [0.2]})
    >>> list(careless_layout(table).columns)
    ['F(+)', 'SigF(+)', 'F(-)', 'SigF(-)', 'DANO']
    """
    if "F(+)" in table.columns or "I(+)" in table.columns:
        table = table.drop(columns=[c for c in _FRIEDEL_MEANS if c in table.columns])
    return table.rename(columns=_CARELESS_NAMES)


def split_by_file(table, n_files):
    """One table per data set written separately.

    With ``n_files=1`` the whole table; otherwise the rows of each ``file_id`` in
    range(n_files). Merged tables lose their ``file_id`` column (it is the file's number
    in the output name); per-observation tables keep it.
    """
    has_id = "file_id" in table.columns
    merged = bool(getattr(table, "merged", False))
    if n_files == 1:
        return [table.drop(columns=["file_id"]) if has_id and merged else table]
    if not has_id:
        raise InputError("the table has no file_id column to split the data sets by.")
    file_id = table["file_id"].to_numpy(np.int64)
    parts = []
    for i in range(n_files):
        part = table.iloc[np.flatnonzero(file_id == i)].copy()
        parts.append(part.drop(columns=["file_id"]) if merged else part)
    return parts


def _json_safe(value):
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if not np.isfinite(value) else float(value)
    if isinstance(value, np.ndarray):
        return _json_safe(value.tolist())
    return value
