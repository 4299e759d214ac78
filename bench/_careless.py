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

from skmerge.shells import half_correlations, make_shells, measured_reflections
from skmerge.stats import standardise_columns

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


def _busy_cpu_seconds():
    """CPU seconds the whole machine has spent busy since boot (all cores), or None."""
    try:
        import psutil
    except ImportError:
        return None
    t = psutil.cpu_times()
    return sum(getattr(t, name, 0.0) for name in ("user", "nice", "system", "irq", "softirq", "steal"))


def _loadavg():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def run_measured(command, log_handle, timeout=None, env=None):
    """Run ``command`` with output to ``log_handle`` and measure it from the OS.

    On Linux with GNU time (``/usr/bin/time``) the peak resident memory is GNU time's
    maximum resident set size of the command (read by the kernel: the largest RSS of
    any single process of the tree; the programs measured here run in one process), and
    its user and system CPU times are reported too; otherwise the RSS of the process tree
    is sampled with psutil. (This process cannot use ``os.wait4`` itself: a child
    forked from it starts with its memory high-water mark.)

    Besides the command's own CPU time, the CPU time the rest of the machine used while
    it ran is reported (``others_cpu_cores``: busy CPU seconds of the whole machine minus
    the command's, divided by the wall time), so that a measurement disturbed by other
    work can be recognised. On timeout the process group is killed, the exit status is
    negative and the peak is None.

    Returns
    -------
    dict
        ``returncode``, ``wall_time_s``, ``peak_rss_bytes``, ``cpu_user_s``,
        ``cpu_sys_s`` (None without GNU time), ``others_cpu_cores`` (None when unknown),
        ``loadavg_start`` and ``loadavg_end`` (1, 5 and 15 minute load averages).
    """
    use_gnu_time = sys.platform.startswith("linux") and os.access(_GNU_TIME, os.X_OK)
    result = {"loadavg_start": _loadavg(), "cpu_user_s": None, "cpu_sys_s": None, "others_cpu_cores": None}
    with tempfile.TemporaryDirectory() as tmp:
        rss_file = Path(tmp) / "maxrss"
        if use_gnu_time:
            command = [_GNU_TIME, "-f", "%M %U %S", "-o", str(rss_file), *command]
        busy_start = _busy_cpu_seconds()
        start = time.perf_counter()
        process = subprocess.Popen(
            command, stdout=log_handle, stderr=subprocess.STDOUT, start_new_session=True, env=env
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
            result.update(returncode=process.returncode, wall_time_s=time.perf_counter() - start,
                          peak_rss_bytes=None, loadavg_end=_loadavg())
            return result
        wall = time.perf_counter() - start
        busy_end = _busy_cpu_seconds()
        result.update(returncode=process.returncode, wall_time_s=wall, loadavg_end=_loadavg())
        if use_gnu_time:
            # The last line is "maxrss_kB user_s sys_s"; a line before it may report a
            # non-zero exit status or a killing signal.
            rss_kb, user, system = rss_file.read_text().split()[-3:]
            peak = int(rss_kb) * 1024
            result["cpu_user_s"], result["cpu_sys_s"] = float(user), float(system)
            if busy_start is not None and busy_end is not None and wall > 0:
                others = (busy_end - busy_start) - float(user) - float(system)
                result["others_cpu_cores"] = round(max(others, 0.0) / wall, 3)
        result["peak_rss_bytes"] = peak
    return result


def others_cpu_cores(seconds=5.0):
    """CPU cores the machine is keeping busy right now, apart from this process, averaged
    over ``seconds`` (None without psutil)."""
    try:
        import psutil
    except ImportError:
        return None
    me = psutil.Process()
    busy0, mine0 = _busy_cpu_seconds(), sum(me.cpu_times()[:2])
    time.sleep(seconds)
    busy1, mine1 = _busy_cpu_seconds(), sum(me.cpu_times()[:2])
    return max((busy1 - busy0) - (mine1 - mine0), 0.0) / seconds


def wait_until_quiet(threshold=0.3, max_wait=3600.0, poll=30.0, log=print):
    """Wait until the rest of the machine uses less than ``threshold`` cores.

    Other developers share this machine; timing while their tests run would measure
    them too. Checks every ``poll`` seconds for up to ``max_wait`` seconds.

    Returns
    -------
    dict
        ``others_cpu_cores`` at the last check, ``waited_s`` and ``quiet`` (False when
        ``max_wait`` ran out and the measurement goes ahead on a busy machine).
    """
    start = time.monotonic()
    while True:
        busy = others_cpu_cores()
        waited = time.monotonic() - start
        if busy is None or busy < threshold:
            return {"others_cpu_cores": busy, "waited_s": round(waited, 1), "quiet": True}
        if waited >= max_wait:
            log(f"  machine still busy ({busy:.2f} cores in use by others) after {waited:.0f} s; measuring anyway")
            return {"others_cpu_cores": busy, "waited_s": round(waited, 1), "quiet": False}
        log(f"  machine busy ({busy:.2f} cores in use by others, load {_loadavg()}); waiting {poll:.0f} s")
        time.sleep(poll)


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
        (float), ``peak_rss_bytes`` (int, or None if killed on timeout), the CPU and
        load figures of :func:`run_measured`, ``log``
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
        measured = run_measured(command, log_handle, timeout)

    outputs = sorted(str(p) for p in out_prefix.parent.iterdir() if p != log)
    history = out_prefix.with_name(out_prefix.name + "_history.csv")
    return {
        "command": command,
        **measured,
        "log": str(log),
        "output_files": outputs,
        "training_steps": _count_history_rows(history),
        "numerical_issues": _NUMERICAL_ISSUES in log.read_text(errors="replace"),
    }


# Friedel-mean columns of skmerge's anomalous files, which careless does not write; they
# are derived from the Friedel columns for both programs alike.
_FRIEDEL_MEANS = ["F", "SIGF", "I", "SIGI", "N", "DANO", "SIGDANO"]


def _friedel_rows(halves):
    """The Friedel halves of an anomalous half-dataset table as reflections of their own:
    one row per (repeat, half, Friedel half), the (−) half of an acentric reflection
    under its negated index; a centric reflection, whose Friedel columns hold its one
    value, has one row."""
    pairs = [x for x in ("F", "SIGF", "I", "SIGI", "N") if f"{x}(+)" in halves.columns]
    rows = halves.drop(columns=[c for c in _FRIEDEL_MEANS if c in halves.columns])
    return rows.stack_anomalous([f"{x}(+)" for x in pairs], [f"{x}(-)" for x in pairs])


def _overall(halves, column):
    """Correlation of ``column`` between the halves over all reflections, per repeat and
    averaged, and the pairs per repeat (skmerge's pairing and Pearson correlation)."""
    shells = make_shells(measured_reflections(halves), 1)
    result = half_correlations(halves, column, shells, "pearson")
    return result.values[:, -1].tolist(), result.counts[:, -1].tolist(), float(result.mean()[-1])


def half_dataset_cc(xval_mtz_path, anomalous):
    """Half-dataset correlations from an ``*_xval_<i>.mtz`` file of careless or skmerge.

    Both programs stack every (repeat, half) merge as rows, told apart by integer
    ``repeat`` and ``half`` columns; careless spells standard deviations ``SigF``,
    skmerge ``SIGF``, and skmerge's anomalous files also hold Friedel-mean ``F``, ``I``
    and ``DANO`` columns. Only the columns both programs write are used, in the same way,
    so the numbers of the two programs compare directly. The file is read into the
    half-dataset layout skmerge's statistics take (``skmerge.stats.standardise_columns``)
    and correlated by skmerge's pairing and correlation core (``skmerge.shells``); each
    statistic is computed per repeat and then averaged over repeats.

    CC1/2 is the Pearson correlation between the halves' merged intensities ``I``, or
    structure-factor amplitudes ``F`` if the file has no intensities (``quantity`` says
    which). In an anomalous file each Friedel half counts as a reflection of its own
    (``I(+)`` and ``I(-)``, as the anomalous model has one amplitude for each, and as
    careless's ``careless.cchalf`` counts); centric reflections, written into both Friedel
    columns by both programs, count once. (``skmerge.stats.cc_half`` correlates the
    Friedel means instead.) CCanom is the Pearson correlation between the halves'
    ``DANO = F(+) - F(-)`` over acentric reflections measured in both Friedel mates in
    both halves (``careless.ccanom`` also keeps centrics, whose DANO is 0). A Friedel
    half with ``N(±) = 0`` counts as unmeasured.

    Parameters
    ----------
    xval_mtz_path : str or pathlib.Path
        careless or skmerge half-dataset file.
    anomalous : bool
        Whether to compute CCanom; the file must then come from an anomalous run.

    Returns
    -------
    dict
        ``quantity`` ("I" or "F"), ``cc_half`` (float), ``cc_half_per_repeat``
        (list), ``n_cc_half`` (pairs per repeat, list), and, if ``anomalous``,
        ``cc_anom``, ``cc_anom_per_repeat`` and ``n_cc_anom``.
    """
    ds = rs.read_mtz(str(xval_mtz_path))
    friedel = "F(+)" in ds.columns
    if anomalous and not friedel:
        raise ValueError(f"{xval_mtz_path}: no F(+)/F(-) columns; was the run anomalous?")
    if friedel:
        ds = ds.drop(columns=[c for c in _FRIEDEL_MEANS if c in ds.columns])
    halves, _ = standardise_columns(ds, "half-dataset")
    per_reflection = _friedel_rows(halves) if friedel else halves
    has_intensity = "I" in per_reflection.columns and np.isfinite(
        per_reflection["I"].to_numpy(np.float64, na_value=np.nan)).any()
    quantity = "I" if has_intensity else "F"

    per_repeat, counts, mean = _overall(per_reflection, quantity)
    if not counts:
        raise ValueError(f"{xval_mtz_path}: no reflection merged in both halves")
    result = {"quantity": quantity, "cc_half_per_repeat": per_repeat, "n_cc_half": counts, "cc_half": mean}
    if anomalous:
        per_repeat, counts, mean = _overall(halves, "DANO")
        result.update(cc_anom_per_repeat=per_repeat, n_cc_anom=counts, cc_anom=mean)
    return result
