"""skmerge and careless side by side: time per step, wall time, peak memory, CC1/2, CCanom.

The benchmark of the issue "Speed and scale: beat careless side by side". careless 0.5.4
runs from its own virtual environment (``bench/.venv-careless``, created with pip when
missing; it is never a dependency of skmerge). Every program run is a separate OS process
whose wall time and peak resident memory are measured from the OS (GNU time), one at a
time; before each run the script waits until the rest of the machine is idle, and it
records the CPU that other processes used during each run.

For each data set (hypf and thermolysin with ``--anomalous``, the two PYP Laue time points
with ``poly --separate-files``), with matched settings (same metadata keys, a 20 × 10
scale network, 1 Monte Carlo sample, the same seed; each program's default learning rate
and likelihood):

- **time per step**: each program runs twice, with n1 and n2 optimisation steps and no
  half-dataset merging; (t2 − t1) / (n2 − n1), so start-up, compilation and file writing
  cancel. skmerge stops early on convergence, which its command line cannot switch off,
  so its timing runs use a small runner over the public API (this script with
  ``--child``) with ``n_iter_no_change = max_iter``, which forces exactly max_iter steps.
- **quality run**: careless with ``--iterations N --merge-half-datasets`` (N = 10,000;
  careless then also takes N steps for each half), and ``skmerge mono|poly
  --merge-half-datasets`` with its defaults (convergence-based stopping, at most 2,000
  steps). Total wall time, peak RSS, and CC1/2 and CCanom computed by one function
  (``_careless.half_dataset_cc``) from both programs' ``_xval_`` files.

Prints one table (and the targets of the issue, met or not) and writes everything as JSON
to ``compare_careless.json`` in the output folder (default ``bench/out/compare[_quick]``).

Usage::

    python bench/compare_careless.py --quick          # a few minutes
    python bench/compare_careless.py                  # the full benchmark: an hour or two
    python bench/compare_careless.py --datasets hypf,pyp --careless-steps 2000
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _careless  # noqa: E402

DATA = (HERE.parent.parent / "shared" / "data").resolve()
OUT = HERE / "out"

# careless's scale network, given to both programs so that they fit the same model. skmerge's
# own default depth ("auto") gives serial stills six layers, not twenty: its thermolysin rows
# here are at careless's depth, not skmerge's defaults (before_after.py runs those).
NETWORK = {"mlp_layers": 20, "mlp_width": 10, "mc_samples": 1}
SEED = 0


@dataclass
class Case:
    """One data set and the flags both programs get for it."""

    name: str
    mode: str  # "mono" or "poly"
    files: list
    keys: str
    anomalous: bool
    intensity_key: str = None
    sigma_key: str = None
    separate_files: bool = False
    wavelength_key: str = None
    labels: list = field(default_factory=lambda: [""])
    timing: bool = True  # also measure time per step
    note: str = ""

    def shared_flags(self, seed=True, network=True):
        """Command-line flags both careless and skmerge take, with the same meaning;
        ``network=False`` leaves the scale network and MC samples at the program's defaults."""
        flags = []
        if network:
            flags += ["--mlp-layers", str(NETWORK["mlp_layers"]), "--mlp-width", str(NETWORK["mlp_width"]),
                      "--mc-samples", str(NETWORK["mc_samples"])]
        if seed:
            flags += ["--seed", str(SEED)]
        if self.intensity_key:
            flags += ["--intensity-key", self.intensity_key]
        if self.sigma_key:
            flags += ["--uncertainty-key", self.sigma_key]
        if self.separate_files:
            flags.append("--separate-files")
        if self.wavelength_key:
            flags += ["--wavelength-key", self.wavelength_key]
        return flags

    def api_spec(self, steps):
        """What an API run of ``steps`` steps needs of the case (:func:`estimator_params`)."""
        return {"files": [str(f) for f in self.files], "keys": self.keys, "anomalous": self.anomalous,
                "intensity_key": self.intensity_key, "sigma_key": self.sigma_key, "steps": steps,
                "separate_files": self.separate_files, "mode": self.mode, "wavelength_key": self.wavelength_key}


CASES = {
    "hypf": Case(
        "hypf", "mono", [DATA / "hypf_hg_sad" / "hypf_unmerged.mtz"],
        "dHKL,Hobs,Kobs,Lobs,XDET,YDET,BATCH,FRACTIONCALC", anomalous=True,
        intensity_key="I", sigma_key="SIGI",
        note="90% partials: FRACTIONCALC among the keys"),
    "hypf-nofrac": Case(
        "hypf-nofrac", "mono", [DATA / "hypf_hg_sad" / "hypf_unmerged.mtz"],
        "dHKL,Hobs,Kobs,Lobs,XDET,YDET,BATCH", anomalous=True,
        intensity_key="I", sigma_key="SIGI", timing=False,
        note="the issue's key set, without FRACTIONCALC; quality runs only"),
    "thermolysin": Case(
        "thermolysin", "mono", [DATA / "thermolysin_xfel" / "unmerged_n395.mtz"],
        "dHKL,Hobs,Kobs,Lobs,BATCH,ewald_offset,xobs,yobs", anomalous=True,
        intensity_key="I", sigma_key="SigI"),
    "pyp": Case(
        "pyp", "poly", [DATA / "pyp_laue" / "off.mtz", DATA / "pyp_laue" / "2ms.mtz"],
        "X,Y,Wavelength,dHKL,Hobs,Kobs,Lobs", anomalous=False,
        intensity_key="I", sigma_key="SigI", separate_files=True, wavelength_key="Wavelength",
        labels=["off", "2ms"]),
}

MODES = {
    # timing steps (n1, n2); careless's steps in the quality run
    "full": {"timing_steps": (200, 1200), "careless_steps": 10_000,
             "datasets": ["hypf", "thermolysin", "pyp", "hypf-nofrac"]},
    "quick": {"timing_steps": (50, 250), "careless_steps": 300,
              "datasets": ["hypf", "thermolysin", "pyp"]},
}


def log(message):
    print(message, flush=True)


# ----------------------------------------------------------------- the skmerge child
def child_fit(spec_path):
    """Runner over the public API: read, fit exactly ``max_iter`` steps, transform, write.

    Runs in its own process (started by :func:`run_skmerge_fixed`), so that its wall
    time and peak memory are measured by the OS like careless's; in-process timings of
    each phase go to the JSON file named in the spec.
    """
    spec = json.loads(Path(spec_path).read_text())
    t0 = time.perf_counter()
    import skmerge
    from skmerge.io import writers

    t_import = time.perf_counter()
    X = skmerge.read_unmerged(spec["files"], anomalous=spec["anomalous"], intensity_key=spec["intensity_key"],
                              sigma_key=spec["sigma_key"])
    t_read = time.perf_counter()
    params = estimator_params(spec)
    merger = skmerge.VariationalMerger(**params).fit(X)
    t_fit = time.perf_counter()
    merged = merger.transform(X)
    n_sets = len(spec["files"]) if spec["separate_files"] else 1
    for i, part in enumerate(writers.split_by_file(merged, n_sets)):
        writers.write_mtz(part, f"{spec['out']}_{i}.mtz")
    t_end = time.perf_counter()
    result = {
        "n_iter": int(merger.n_iter_), "converged": bool(merger.converged_), "n_observations": len(X),
        "import_s": t_import - t0, "read_s": t_read - t_import, "fit_s": t_fit - t_read,
        "transform_write_s": t_end - t_fit,
        "params": {k: v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)
                   for k, v in params.items() if k != "metadata"},
    }
    Path(spec["result"]).write_text(json.dumps(result, indent=1))


def estimator_params(spec):
    """The estimator parameters of the API runs: the case's keys and files, the shared
    network (skmerge's own with ``spec["network"]`` false), exactly ``spec["steps"]``
    steps, and a variant's parameters (``spec["extra"]``, e.g.
    "prior=skmerge.DoubleWilsonPrior()")."""
    import skmerge

    params = dict(metadata=spec["keys"].split(","), anomalous=spec["anomalous"], random_state=SEED,
                  max_iter=spec["steps"], n_iter_no_change=spec["steps"],
                  **(NETWORK if spec.get("network", True) else {}))
    if spec["separate_files"]:
        params["separate_files"] = True
    if spec["mode"] == "poly":
        params.update(laue=True, wavelength_key=spec["wavelength_key"])
    if spec.get("batch_size"):
        params["batch_size"] = spec["batch_size"]
    if spec.get("extra"):
        params.update(eval(f"dict({spec['extra']})", {"skmerge": skmerge}))
    return params


# ------------------------------------------------------------------------- runners
def _fresh(directory):
    directory = Path(directory)
    if directory.exists():
        for p in directory.iterdir():
            p.unlink()
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def _cached(directory, key, reuse):
    """The stored measurement with this ``key`` in ``directory`` when reusing, else None."""
    stored = Path(directory) / "measurement.json"
    if reuse and stored.exists():
        data = json.loads(stored.read_text())
        if data.get("key") == json.loads(json.dumps(key, default=str)) and data.get("returncode") == 0:
            log(f"  reusing {stored}")
            return data
    return None


def _store(directory, data):
    (Path(directory) / "measurement.json").write_text(json.dumps(data, indent=1, default=str))


def measure(command, directory, args, env=None):
    """Wait for a quiet machine, run ``command`` measured, log to ``directory/run.log``."""
    quiet = _careless.wait_until_quiet(max_wait=args.max_wait, log=log)
    with open(Path(directory) / "run.log", "w") as handle:
        result = _careless.run_measured(command, handle, args.timeout, env=env)
    result["before"] = quiet
    result["command"] = command
    result["log"] = str(Path(directory) / "run.log")
    return result


def _summary(result, steps=None):
    rss = result.get("peak_rss_bytes")
    return (f"{result['wall_time_s']:.1f} s, peak {rss / 2**20 if rss else float('nan'):.0f} MiB"
            + (f", {steps} steps" if steps is not None else "")
            + f", others {result.get('others_cpu_cores')} cores, load {result.get('loadavg_start')}"
            + ("" if result["returncode"] == 0 else f"  FAILED (exit {result['returncode']}; see {result['log']})"))


def run_careless(case, steps, merge_half, directory, args):
    """careless with ``steps`` steps (and as many per half with ``merge_half``)."""
    prefix = Path(directory) / case.name
    key = ["careless", case.mode, case.keys, *map(str, case.files), steps, merge_half, *case.shared_flags()]
    cached = _cached(directory, key, args.reuse)
    if cached:
        return cached
    quiet = _careless.wait_until_quiet(max_wait=args.max_wait, log=log)
    result = _careless.run_careless(
        case.mode, case.keys, case.files, prefix, iterations=steps, anomalous=case.anomalous,
        merge_half_datasets=merge_half, seed=SEED, extra_args=case.shared_flags(seed=False),
        careless=args.careless, timeout=args.timeout)
    result["before"] = quiet
    result["steps_requested"] = steps
    if merge_half and result["returncode"] == 0:
        result["cc"] = _ccs(prefix, case)
    result["key"] = key
    _store(directory, result)
    return result


def run_skmerge_fixed(case, steps, directory, args):
    """skmerge with exactly ``steps`` steps through the API runner (no half datasets)."""
    prefix = Path(directory) / case.name
    spec = {**case.api_spec(steps), "out": str(prefix), "result": str(Path(directory) / "child.json"),
            "batch_size": args.skmerge_batch_size}
    key = ["skmerge-api", spec]
    cached = _cached(directory, key, args.reuse)
    if cached:
        return cached
    _fresh(directory)
    spec_path = Path(directory) / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path)]
    result = measure(command, directory, args)
    result["key"] = key
    result["steps_requested"] = steps
    if result["returncode"] == 0:
        result["child"] = json.loads((Path(directory) / "child.json").read_text())
        result["training_steps"] = result["child"]["n_iter"]
    _store(directory, result)
    return result


def run_skmerge_cli(case, directory, args):
    """``skmerge mono|poly --merge-half-datasets`` with its defaults (convergence stopping),
    or with ``--batch-size`` / ``--early-stopping`` / ``--error-model`` when asked for."""
    prefix = Path(directory) / case.name
    command = [args.skmerge, case.mode, "--disable-progress-bar", "--merge-half-datasets", *case.shared_flags()]
    if args.skmerge_batch_size:
        command += ["--batch-size", str(args.skmerge_batch_size)]
    if args.skmerge_early_stopping:
        command.append("--early-stopping")
    if args.skmerge_error_model:
        command.append("--error-model")
    if case.anomalous:
        command.append("--anomalous")
    command += [case.keys, *map(str, case.files), str(prefix)]
    cached = _cached(directory, command, args.reuse)
    if cached:
        return cached
    _fresh(directory)
    result = measure(command, directory, args)
    result["key"] = command
    if result["returncode"] == 0:
        history = Path(f"{prefix}_history.csv")
        result["training_steps"] = max(sum(1 for line in history.open() if line.strip()) - 1, 0)
        text = Path(result["log"]).read_text(errors="replace")
        result["converged"] = "not converged" not in text
        result["cc"] = _ccs(prefix, case)
    _store(directory, result)
    return result


def _ccs(prefix, case):
    """Half-dataset CCs of every output data set of a run (one per file with
    --separate-files)."""
    n_sets = len(case.files) if case.separate_files else 1
    out = []
    for i in range(n_sets):
        path = Path(f"{prefix}_xval_{i}.mtz")
        if not path.exists():
            out.append({"error": f"{path.name} missing"})
            continue
        out.append(_careless.half_dataset_cc(path, case.anomalous))
    return out


# ------------------------------------------------------------------------ the plan
def run_case(case, settings, args, root):
    n1, n2 = settings["timing_steps"]
    results = {"case": {k: (str(v) if k == "files" else v) for k, v in asdict(case).items()}}
    results["case"]["files"] = [str(f) for f in case.files]
    if case.timing:
        for program in ("careless", "skmerge"):
            for steps in (n1, n2):
                directory = root / case.name / f"{program}{_variant(program, args)}_steps{steps}"
                log(f"[{case.name}] {program}: {steps} steps, no half datasets")
                if program == "careless":
                    r = run_careless(case, steps, False, directory, args)
                else:
                    r = run_skmerge_fixed(case, steps, directory, args)
                log("  " + _summary(r, r.get("training_steps")))
                results[f"{program}_steps{steps}"] = r
    steps = settings["careless_steps"]
    log(f"[{case.name}] careless: {steps} steps + half-dataset merging ({steps} steps per half)")
    r = run_careless(case, steps, True, root / case.name / "careless_quality", args)
    log("  " + _summary(r, r.get("training_steps")) + _cc_text(r))
    results["careless_quality"] = r
    log(f"[{case.name}] skmerge {case.mode}: defaults (convergence stopping) + half-dataset merging")
    r = run_skmerge_cli(case, root / case.name / f"skmerge{_variant('skmerge', args, quality=True)}_quality", args)
    log("  " + _summary(r, r.get("training_steps")) + _cc_text(r))
    results["skmerge_quality"] = r
    return results


def _variant(program, args, quality=False):
    """Folder suffix of skmerge runs with image minibatches or (quality runs only: the
    timing runs keep measuring the default step) early stopping or the error model;
    careless runs are shared."""
    if program != "skmerge":
        return ""
    suffix = f"_batch{args.skmerge_batch_size}" if args.skmerge_batch_size else ""
    if quality:
        suffix += ("_es" if args.skmerge_early_stopping else "") + ("_em" if args.skmerge_error_model else "")
    return suffix


def _cc_text(result):
    ccs = result.get("cc") or []
    parts = []
    for cc in ccs:
        if "cc_half" in cc:
            parts.append(f"CC1/2 {cc['cc_half']:.3f}" + (f" CCanom {cc['cc_anom']:.3f}" if "cc_anom" in cc else ""))
    return ("; " + " | ".join(parts)) if parts else ""


# ------------------------------------------------------------------------- analysis
def _ok(result):
    return result is not None and result.get("returncode") == 0


def analyse(results, settings):
    """Derived numbers of one case: s/step, wall, RSS, CCs and ratios."""
    n1, n2 = settings["timing_steps"]
    row = {}
    for program in ("careless", "skmerge"):
        entry = {}
        a, b = results.get(f"{program}_steps{n1}"), results.get(f"{program}_steps{n2}")
        if _ok(a) and _ok(b):
            sa, sb = a.get("training_steps") or n1, b.get("training_steps") or n2
            entry["s_per_step"] = (b["wall_time_s"] - a["wall_time_s"]) / (sb - sa)
            entry["startup_s"] = a["wall_time_s"] - sa * entry["s_per_step"]
            entry["timing_steps"] = [sa, sb]
            entry["timing_peak_rss_mib"] = max(a["peak_rss_bytes"], b["peak_rss_bytes"]) / 2**20
            if program == "skmerge":
                entry["fit_s_per_step"] = (b["child"]["fit_s"] - a["child"]["fit_s"]) / (sb - sa)
        q = results.get(f"{program}_quality")
        if _ok(q):
            entry["wall_s"] = q["wall_time_s"]
            entry["peak_rss_mib"] = q["peak_rss_bytes"] / 2**20
            entry["steps"] = q.get("training_steps")
            entry["others_cpu_cores"] = q.get("others_cpu_cores")
            entry["cc_half"] = [c.get("cc_half") for c in q.get("cc", [])]
            entry["cc_anom"] = [c.get("cc_anom") for c in q.get("cc", [])]
            entry["numerical_issues"] = q.get("numerical_issues")
            entry["converged"] = q.get("converged")
        row[program] = entry
    c, s = row["careless"], row["skmerge"]
    ratios = {}
    for key in ("s_per_step", "wall_s", "peak_rss_mib"):
        if key in c and key in s:
            ratios[key] = s[key] / c[key]
    row["ratios"] = ratios
    # Time to reach careless's CC1/2.
    if c.get("cc_half") and s.get("cc_half") and None not in c["cc_half"] + s["cc_half"]:
        reached = all(x >= y for x, y in zip(s["cc_half"], c["cc_half"]))
        row["reached_careless_cc_half"] = reached
        if reached:
            row["time_to_careless_cc_ratio_at_most"] = s["wall_s"] / c["wall_s"]
            if "s_per_step" in c:
                # careless's cost of its steps alone, without the half-dataset merges
                train_only = c["startup_s"] + settings["careless_steps"] * c["s_per_step"]
                row["careless_train_only_est_s"] = train_only
                row["time_to_careless_cc_vs_train_only"] = s["wall_s"] / train_only
    return row


def _fmt(value, spec, width):
    if value is None or (isinstance(value, float) and value != value):
        return f"{'-':>{width}}"
    return f"{format(value, spec):>{width}}"


def _fmt_list(values, width):
    if not values:
        return f"{'-':>{width}}"
    text = "/".join("-" if v is None or v != v else f"{v:.3f}" for v in values)
    return f"{text:>{width}}"


def table(analyses):
    head = f"{'data set':<13}{'program':<10}{'s/step':>9}{'wall s':>9}{'steps':>7}{'RSS MiB':>9}{'CC1/2':>13}{'CCanom':>9}"
    lines = [head, "-" * len(head)]
    for name, row in analyses.items():
        for program in ("careless", "skmerge"):
            e = row[program]
            lines.append(
                f"{name:<13}{program:<10}{_fmt(e.get('s_per_step'), '.4f', 9)}{_fmt(e.get('wall_s'), '.0f', 9)}"
                f"{_fmt(e.get('steps'), 'd', 7)}{_fmt(e.get('peak_rss_mib'), '.0f', 9)}"
                f"{_fmt_list(e.get('cc_half'), 13)}{_fmt_list(e.get('cc_anom') if any(v is not None for v in e.get('cc_anom', [])) else [], 9)}")
        r = row["ratios"]
        c, s = row["careless"], row["skmerge"]
        dcc = [b - a for a, b in zip(c.get("cc_half") or [], s.get("cc_half") or []) if a is not None and b is not None]
        dan = [b - a for a, b in zip(c.get("cc_anom") or [], s.get("cc_anom") or []) if a is not None and b is not None]
        lines.append(
            f"{'':<13}{'sk/cl':<10}{_fmt(r.get('s_per_step'), '.3f', 9)}{_fmt(r.get('wall_s'), '.3f', 9)}{'':>7}"
            f"{_fmt(r.get('peak_rss_mib'), '.3f', 9)}{_fmt_list(dcc, 13) if dcc else _fmt(None, '', 13)}"
            f"{_fmt_list(dan, 9) if dan else _fmt(None, '', 9)}")
        lines.append("")
    lines.append("s/step: (wall(n2) - wall(n1)) / (n2 - n1) of two runs without half-dataset merging. wall s, steps,")
    lines.append("RSS: the quality run (fit + half-dataset merges; steps = steps of the full-data fit). CC1/2, CCanom:")
    lines.append("overall, from the _xval_ files, same function for both (pyp: off/2ms). Row sk/cl: ratios")
    lines.append("skmerge/careless for time and memory, differences skmerge - careless for the CCs.")
    return "\n".join(lines)


def targets(analyses, settings):
    lines = ["Targets:"]
    for name, row in analyses.items():
        r = row["ratios"]
        if "s_per_step" in r:
            lines.append(f"  {name}: time per step ratio {r['s_per_step']:.3f} (target <= 0.333): "
                         f"{'MET' if r['s_per_step'] <= 1 / 3 else 'NOT MET'}")
        if "reached_careless_cc_half" in row:
            if row["reached_careless_cc_half"]:
                text = (f"  {name}: skmerge reached careless's {settings['careless_steps']}-step CC1/2; time to reach it "
                        f"<= skmerge's wall time = {row['time_to_careless_cc_ratio_at_most']:.3f} x careless's "
                        f"(target <= 0.1): {'MET' if row['time_to_careless_cc_ratio_at_most'] <= 0.1 else 'NOT MET'}")
                if "time_to_careless_cc_vs_train_only" in row:
                    text += (f"; vs careless's {settings['careless_steps']} training steps alone "
                             f"(est. {row['careless_train_only_est_s']:.0f} s): "
                             f"{row['time_to_careless_cc_vs_train_only']:.3f}")
                lines.append(text)
            else:
                lines.append(f"  {name}: skmerge did NOT reach careless's {settings['careless_steps']}-step CC1/2 "
                             f"({row['skmerge'].get('cc_half')} vs {row['careless'].get('cc_half')})")
        if "peak_rss_mib" in r:
            lines.append(f"  {name}: peak memory ratio {r['peak_rss_mib']:.3f} (target <= 1): "
                         f"{'MET' if r['peak_rss_mib'] <= 1 else 'NOT MET'}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main
def versions(careless_exe):
    import skmerge

    venv_python = Path(careless_exe).parent / "python"
    probe = subprocess.run(
        [str(venv_python), "-c", "import importlib.metadata as m; print(m.version('careless'), "
         "m.version('tensorflow'), m.version('tensorflow-probability'))"],
        capture_output=True, text=True)
    careless_v = probe.stdout.split() if probe.returncode == 0 else ["?", "?", "?"]
    from importlib.metadata import version

    return {"skmerge": skmerge.__version__, "skmerge_tensorflow": version("tensorflow"),
            "careless": careless_v[0], "careless_tensorflow": careless_v[1],
            "careless_tensorflow_probability": careless_v[2], "python": platform.python_version()}


def _default_skmerge():
    script = Path(sys.executable).parent / "skmerge"
    return str(script) if script.exists() else "skmerge"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small step counts; a few minutes")
    parser.add_argument("--datasets", help=f"comma-separated subset of {','.join(CASES)}")
    parser.add_argument("--careless-steps", type=int, help="careless's steps in the quality runs")
    parser.add_argument("--timing-steps", type=int, nargs=2, metavar=("N1", "N2"), help="steps of the timing runs")
    parser.add_argument("--out", type=Path, help="output folder (default bench/out/compare[_quick])")
    parser.add_argument("--reuse", action="store_true", help="reuse measurements already in the output folder")
    parser.add_argument("--max-wait", type=float, default=1800.0,
                        help="seconds to wait for other processes to finish before each run (default 1800)")
    parser.add_argument("--timeout", type=float, help="seconds after which a run is killed")
    parser.add_argument("--careless", help="careless executable (default: bench/.venv-careless, created if needed)")
    parser.add_argument("--skmerge", default=_default_skmerge(),
                        help="skmerge executable (default: the console script next to this Python)")
    parser.add_argument("--skmerge-batch-size", type=int, metavar="IMAGES",
                        help="skmerge trains on minibatches of this many images (default: full batch); "
                        "with --reuse and the same --out, careless's runs are reused")
    parser.add_argument("--skmerge-early-stopping", action="store_true",
                        help="skmerge's quality run stops on the loss of held-out images (--early-stopping)")
    parser.add_argument("--skmerge-error-model", action="store_true",
                        help="skmerge's quality run refines the sigmas (--error-model)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_fit(args.child)
        return 0

    mode = "quick" if args.quick else "full"
    settings = dict(MODES[mode])
    if args.careless_steps:
        settings["careless_steps"] = args.careless_steps
    if args.timing_steps:
        settings["timing_steps"] = tuple(args.timing_steps)
    names = args.datasets.split(",") if args.datasets else settings["datasets"]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown data set(s) {unknown}; choose from {list(CASES)}")
    missing = [str(f) for n in names for f in CASES[n].files if not Path(f).exists()]
    if missing:
        parser.error(f"missing data files: {missing} (the benchmark needs ../shared/data)")
    root = args.out or OUT / ("compare_quick" if args.quick else "compare")
    root.mkdir(parents=True, exist_ok=True)

    args.careless = str(args.careless or _careless.ensure_venv())
    started = datetime.now(timezone.utc)
    header = {
        "date": started.isoformat(timespec="seconds"), "mode": mode, "host": platform.node(),
        "cpu_count": os.cpu_count(), "loadavg_at_start": _careless._loadavg(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "versions": versions(args.careless),
        "settings": {**settings, "datasets": names, **NETWORK, "seed": SEED, "skmerge_batch_size": args.skmerge_batch_size,
                     "skmerge_early_stopping": args.skmerge_early_stopping,
                     "skmerge_error_model": args.skmerge_error_model},
    }
    log(f"compare_careless ({mode}) {header['date']}  {header['cpu_count']} CPUs, {header['memory_gib']} GiB, "
        f"load average at start {header['loadavg_at_start']}")
    log("versions: " + ", ".join(f"{k} {v}" for k, v in header["versions"].items()))
    log(f"settings: timing runs {settings['timing_steps'][0]} and {settings['timing_steps'][1]} steps; careless "
        f"{settings['careless_steps']} steps (+ as many per half) with --merge-half-datasets; skmerge defaults "
        f"(<= 2000 steps, convergence) with --merge-half-datasets"
        + (f", minibatches of {args.skmerge_batch_size} images" if args.skmerge_batch_size else ", full batch")
        + (", early stopping on held-out images" if args.skmerge_early_stopping else "")
        + (", error model" if args.skmerge_error_model else "")
        + f"; network {NETWORK['mlp_layers']}x"
        f"{NETWORK['mlp_width']}, {NETWORK['mc_samples']} MC sample, seed {SEED}")
    for n in names:
        c = CASES[n]
        log(f"  {n}: {c.mode} '{c.keys}' {' '.join(f.name for f in c.files)} "
            f"{' '.join(c.shared_flags())}{' --anomalous' if c.anomalous else ''}" + (f"  ({c.note})" if c.note else ""))

    results, analyses = {}, {}
    json_path = root / f"compare_careless{_variant('skmerge', args, quality=True)}.json"
    for n in names:
        results[n] = run_case(CASES[n], settings, args, root)
        analyses[n] = analyse(results[n], settings)
        json_path.write_text(json.dumps({"header": header, "analysis": analyses, "runs": results}, indent=1,
                                        default=str))

    elapsed = (datetime.now(timezone.utc) - started).total_seconds()
    header["elapsed_s"] = elapsed
    header["loadavg_at_end"] = _careless._loadavg()
    log("")
    log(f"skmerge {header['versions']['skmerge']} vs careless {header['versions']['careless']} on {header['host']}: "
        f"{header['cpu_count']} CPUs, load average at start {header['loadavg_at_start']}, at end "
        f"{header['loadavg_at_end']}; {mode} mode, {elapsed / 60:.1f} min")
    log(table(analyses))
    log("")
    log(targets(analyses, settings))
    others = [(n, p, results[n][k].get("others_cpu_cores")) for n in results for p in ("careless", "skmerge")
              for k in results[n] if k.startswith(p) and isinstance(results[n][k], dict)]
    busy = [f"{n}/{p}: {o}" for n, p, o in others if o is not None and o > 0.25]
    log("other processes' CPU during the runs: " + ("all below 0.25 cores" if not busy else
                                                     "BUSY during " + ", ".join(busy)))
    json_path.write_text(json.dumps({"header": header, "analysis": analyses, "runs": results}, indent=1,
                                    default=str))
    log(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
