"""Run the reference program careless as an external program, for benchmarks.

careless pins its own TensorFlow, so it lives in a virtual environment of its own
(``bench/.venv-careless`` by default). It is never imported here: it runs as a
subprocess, and its output files are read with reciprocalspaceship.
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import reciprocalspaceship as rs

DEFAULT_VENV = Path(__file__).resolve().parent / ".venv-careless"
CARELESS_VERSION = "0.5.4"
_GNU_TIME = "/usr/bin/time"

# careless prints this (and exits 0) when a gradient norm stops being finite.
_NUMERICAL_ISSUES = "Encountered numerical issues"


def _installed_version(venv):
    """Return the careless version installed in ``venv``, or None."""
    python = venv / "bin" / "python"
    if not python.exists():
        return None
    probe = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('careless'))"],
        capture_output=True,
        text=True,
    )
    return probe.stdout.strip() if probe.returncode == 0 else None


def ensure_venv(path=DEFAULT_VENV, version=CARELESS_VERSION):
    """Make sure a virtual environment with careless ``version`` exists.

    Creates the environment with the running Python's ``venv`` module and installs
    ``careless==version`` with pip (pip chooses the TensorFlow and
    TensorFlow Probability versions careless requires). Does nothing when that version
    is already installed there.

    Parameters
    ----------
    path : str or pathlib.Path
        Directory of the virtual environment.
    version : str
        careless version to install.

    Returns
    -------
    pathlib.Path
        The ``careless`` executable.
    """
    venv = Path(path)
    if _installed_version(venv) != version:
        if not (venv / "bin" / "python").exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
             f"careless=={version}"],
            check=True,
        )
    return venv / "bin" / "careless"


def _fresh_directory(directory):
    """Empty ``directory`` (creating it if needed); refuse the working directory and its parents."""
    directory = directory.resolve()
    cwd = Path.cwd().resolve()
    if directory == cwd or directory in cwd.parents:
        raise ValueError(
            f"refusing to empty {directory}: give out_prefix a directory of its own, "
            "e.g. 'bench/out/hypf/hypf'"
        )
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)


def _sample_peak_rss(process, timeout):
    """Poll the resident memory of ``process`` and its descendants until it exits.

    Returns the largest total seen, in bytes, sampling every 0.1 s. Raises
    ``subprocess.TimeoutExpired`` after ``timeout`` seconds (None: never).
    """
    import psutil

    deadline = None if timeout is None else time.monotonic() + timeout
    root = psutil.Process(process.pid)
    peak = 0
    while process.poll() is None:
        if deadline is not None and time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(process.args, timeout)
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree))
        except psutil.Error:
            pass  # a process of the tree ended between listing and reading
        time.sleep(0.1)
    return peak


def _run_measured(command, log_handle, timeout):
    """Run ``command`` with output to ``log_handle``; return (exit status, peak RSS).

    On Linux with GNU time (``/usr/bin/time``) the peak is its maximum resident set
    size of the command, read by the kernel; otherwise the process tree is sampled
    with psutil. (This process cannot use ``os.wait4`` itself: a child forked from
    it starts with its memory high-water mark.) On timeout the process group is
    killed, the exit status is negative and the peak is None.
    """
    use_gnu_time = sys.platform.startswith("linux") and os.access(_GNU_TIME, os.X_OK)
    with tempfile.TemporaryDirectory() as tmp:
        rss_file = Path(tmp) / "maxrss"
        if use_gnu_time:
            command = [_GNU_TIME, "-f", "%M", "-o", str(rss_file), *command]
        process = subprocess.Popen(
            command, stdout=log_handle, stderr=subprocess.STDOUT, start_new_session=True
        )
        peak = None
        try:
            if use_gnu_time:
                process.wait(timeout)
            else:
                peak = _sample_peak_rss(process, timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return process.returncode, None
        if use_gnu_time:
            # The last line is the size in kilobytes; a line before it may report a
            # non-zero exit status or a killing signal.
            peak = int(rss_file.read_text().split()[-1]) * 1024
    return process.returncode, peak


def _count_history_rows(history_csv):
    """Number of optimisation steps recorded in careless's ``*_history.csv``, or None."""
    if not history_csv.exists():
        return None
    with open(history_csv) as handle:
        return max(sum(1 for line in handle if line.strip()) - 1, 0)


def run_careless(
    mode,
    keys,
    files,
    out_prefix,
    *,
    iterations,
    anomalous,
    merge_half_datasets=False,
    seed=None,
    extra_args=(),
    careless=None,
    timeout=None,
):
    """Run ``careless mono`` or ``careless poly`` and measure it.

    The directory that holds ``out_prefix`` is emptied (or created) first, so the
    files listed afterwards are this run's. careless's standard output and error go
    to ``<out_prefix>.log``; the progress bar is always disabled.

    Parameters
    ----------
    mode : {"mono", "poly"}
        careless sub-command.
    keys : str or sequence of str
        Metadata keys for the scaling model, e.g. ``"dHKL,Hobs,Kobs,Lobs,BATCH"``.
    files : str, pathlib.Path or sequence of them
        Unmerged reflection files.
    out_prefix : str or pathlib.Path
        careless's output base, e.g. ``bench/out/hypf/hypf`` (writes
        ``bench/out/hypf/hypf_0.mtz``, ...).
    iterations : int
        Training steps. With ``merge_half_datasets`` careless takes as many steps
        again for each half of each repeat, with the scaling model frozen.
    anomalous : bool
        Keep Friedel mates separate (``--anomalous``).
    merge_half_datasets : bool
        Also merge two random halves of the images (``--merge-half-datasets``),
        which writes ``<out_prefix>_xval_<i>.mtz``.
    seed : int, optional
        careless's random seed (``--seed``).
    extra_args : sequence of str
        Further command-line arguments, e.g. ``("--mlp-layers", "10")``.
    careless : str or pathlib.Path, optional
        careless executable; by default the one from :func:`ensure_venv`.
    timeout : float, optional
        Seconds after which careless is killed.

    Returns
    -------
    dict
        ``command`` (list of str), ``returncode`` (int: careless's exit status;
        if signal N killed it, 128 + N under GNU time and -N otherwise; -9 if
        killed on timeout), ``wall_time_s``
        (float), ``peak_rss_bytes`` (int, or None if killed on timeout), ``log``
        (str), ``output_files`` (sorted list of str, without the log),
        ``training_steps`` (rows of the history file, or None if it was not
        written) and ``numerical_issues`` (bool: careless stopped training early
        because the gradient norm was not finite; it still exits 0 and writes
        output then).
    """
    if mode not in ("mono", "poly"):
        raise ValueError(f"mode must be 'mono' or 'poly', not {mode!r}")
    if not isinstance(keys, str):
        keys = ",".join(keys)
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    out_prefix = Path(out_prefix)
    _fresh_directory(out_prefix.parent)
    log = out_prefix.with_name(out_prefix.name + ".log")

    command = [str(careless or ensure_venv()), mode, "--disable-progress-bar",
               "--iterations", str(iterations)]
    if anomalous:
        command.append("--anomalous")
    if merge_half_datasets:
        command.append("--merge-half-datasets")
    if seed is not None:
        command += ["--seed", str(seed)]
    command += [*map(str, extra_args), keys, *map(str, files), str(out_prefix)]

    with open(log, "w") as log_handle:
        start = time.perf_counter()
        returncode, peak_rss = _run_measured(command, log_handle, timeout)
        wall_time = time.perf_counter() - start

    outputs = sorted(str(p) for p in out_prefix.parent.iterdir() if p != log)
    history = out_prefix.with_name(out_prefix.name + "_history.csv")
    return {
        "command": command,
        "returncode": returncode,
        "wall_time_s": wall_time,
        "peak_rss_bytes": peak_rss,
        "log": str(log),
        "output_files": outputs,
        "training_steps": _count_history_rows(history),
        "numerical_issues": _NUMERICAL_ISSUES in log.read_text(errors="replace"),
    }


def _pearson(x, y):
    """Pearson correlation of two equal-length arrays; NaN with fewer than 3 pairs."""
    if len(x) < 3:
        return float("nan")
    return float(np.corrcoef(np.asarray(x, float), np.asarray(y, float))[0, 1])


def _pair_halves(table, column):
    """Join half 0 and half 1 of one repeat on the Miller index; drop incomplete pairs."""
    halves = [table.loc[table["half"] == h, [column]] for h in (0, 1)]
    pairs = halves[0].join(halves[1], how="inner", lsuffix="1", rsuffix="2")
    return pairs.dropna()


def half_dataset_cc(xval_mtz_path, anomalous):
    """Half-dataset correlations from a careless ``*_xval_<i>.mtz`` file.

    The file stacks every (repeat, half) merge as rows, told apart by its integer
    ``repeat`` and ``half`` columns. Each statistic is computed per repeat and then
    averaged over repeats.

    CC1/2 is the Pearson correlation between the halves' merged intensities ``I``, or
    structure-factor amplitudes ``F`` if the file has no intensities (``quantity``
    says which). In an anomalous file Friedel mates count as separate reflections, as
    in careless's own ``careless.cchalf``; careless writes centric reflections into both
    Friedel columns, so they count twice. CCanom is the Pearson correlation between the
    halves' ``DANO = F(+) - F(-)`` over acentric reflections measured in both Friedel
    mates in both halves (``careless.ccanom`` also keeps centrics, whose DANO is 0).

    Parameters
    ----------
    xval_mtz_path : str or pathlib.Path
        careless half-dataset file.
    anomalous : bool
        Whether to compute CCanom; the file must then come from an ``--anomalous``
        run.

    Returns
    -------
    dict
        ``quantity`` ("I" or "F"), ``cc_half`` (float), ``cc_half_per_repeat``
        (list), ``n_cc_half`` (pairs per repeat, list), and, if ``anomalous``,
        ``cc_anom``, ``cc_anom_per_repeat`` and ``n_cc_anom``.
    """
    ds = rs.read_mtz(str(xval_mtz_path))
    has_friedel = "F(+)" in ds.columns
    if anomalous and not has_friedel:
        raise ValueError(
            f"{xval_mtz_path}: no F(+)/F(-) columns; was careless run with --anomalous?"
        )
    stacked = ds.stack_anomalous() if has_friedel else ds
    quantity = "I" if "I" in stacked.columns else "F"
    repeats = sorted(ds["repeat"].unique())

    result = {"quantity": quantity, "cc_half_per_repeat": [], "n_cc_half": []}
    for repeat in repeats:
        pairs = _pair_halves(stacked[stacked["repeat"] == repeat], quantity)
        result["cc_half_per_repeat"].append(_pearson(pairs[quantity + "1"], pairs[quantity + "2"]))
        result["n_cc_half"].append(len(pairs))
    result["cc_half"] = float(np.mean(result["cc_half_per_repeat"]))

    if anomalous:
        acentric = ds.loc[~ds.label_centrics()["CENTRIC"].to_numpy()].copy()
        acentric["DANO"] = (acentric["F(+)"] - acentric["F(-)"]).astype(float)
        result["cc_anom_per_repeat"], result["n_cc_anom"] = [], []
        for repeat in repeats:
            pairs = _pair_halves(acentric[acentric["repeat"] == repeat], "DANO")
            result["cc_anom_per_repeat"].append(_pearson(pairs["DANO1"], pairs["DANO2"]))
            result["n_cc_anom"].append(len(pairs))
        result["cc_anom"] = float(np.mean(result["cc_anom_per_repeat"]))
    return result
