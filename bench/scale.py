"""How skmerge's fit scales with the number of observations: time, memory and accuracy.

Simulates rotation data with known truth (``skmerge.datasets.make_unmerged``: cell 80 ×
90 × 100 Å, P 21 21 21, 1.8 Å, 1° images, about 2,800 observations per image, so the
number of images sets the size: 100k observations ≈ 36 images, 1M ≈ 357, 3M ≈ 1,070, i.e.
three turns of the crystal) and fits ``VariationalMerger`` to convergence (its defaults:
at most 2,000 steps, window-based stopping; metadata dHKL, BATCH, XDET, YDET; 20 × 10
network) in two modes:

- **full batch** (``batch_size=None``): every observation in every step;
- **minibatch** (``batch_size=32`` images per step by default, ``--batch-images``).

Every simulation and every fit runs in a process of its own, so the peak resident memory
reported is that process's, from the OS (GNU time); the simulated tables are cached in
``bench/out/scale/data``. The merge quality is reported too (Pearson CC of the merged F with
the true F in 10 equal-count resolution shells, their mean, and overall), so speed is not
bought with accuracy. Finally, the growth exponent b of time ∝ size^b is fitted by least
squares on log(time) against log(size), for each mode, for the time to convergence and
the time per step.

Usage::

    python bench/scale.py --quick                      # 100k and 300k: a few minutes
    python bench/scale.py                              # 100k, 300k, 1M (both modes), 3M (minibatch)
    python bench/scale.py --sizes 100000,1000000 --modes full
"""

import argparse
import json
import os
import pickle
import platform
import resource
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _careless  # noqa: E402  (the measured process runner)

OUT = HERE / "out" / "scale"
ROWS_PER_IMAGE = 2_805  # measured for the geometry below (bench/read_speed.py)
CELL = (80.0, 90.0, 100.0, 90.0, 90.0, 90.0)
SPACEGROUP = "P 21 21 21"
DMIN = 1.8
METADATA = ["dHKL", "BATCH", "XDET", "YDET"]
SEED = 0
FULL_BATCH_MAX = 1_000_000  # larger sizes run in minibatch mode only unless --full-batch-max says otherwise


def log(message):
    print(message, flush=True)


def _maxrss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _data_paths(size):
    folder = OUT / "data"
    return folder / f"sim_{size}_seed{SEED}.pkl", folder / f"sim_{size}_seed{SEED}_truth.npz"


# ---------------------------------------------------------------------- children
def child_simulate(size):
    """Simulate ``size`` observations (about) and pickle the table and the true F."""
    from skmerge.datasets import make_unmerged

    table_path, truth_path = _data_paths(size)
    table_path.parent.mkdir(parents=True, exist_ok=True)
    n_images = max(1, round(size / ROWS_PER_IMAGE))
    start = time.perf_counter()
    X, truth = make_unmerged(n_images=n_images, spacegroup=SPACEGROUP, cell=CELL, dmin=DMIN, random_state=SEED)
    seconds = time.perf_counter() - start
    tmp = table_path.with_suffix(".tmp")
    with open(tmp, "wb") as handle:
        pickle.dump(X, handle, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, table_path)
    hkl = truth.merged.reset_index()[["H", "K", "L"]].to_numpy(np.int32)
    np.savez(truth_path, hkl=hkl, F=truth.merged["F"].to_numpy(np.float64))
    info = {"n_obs": len(X), "n_images": n_images, "simulate_s": seconds, "child_maxrss_mib": _maxrss_mib()}
    table_path.with_suffix(".json").write_text(json.dumps(info, indent=1))


def child_fit(spec_path):
    """Load a simulated table, fit to convergence, merge and compare with the truth."""
    spec = json.loads(Path(spec_path).read_text())
    t0 = time.perf_counter()
    import skmerge
    from skmerge.stats import resolution_shells

    with open(spec["table"], "rb") as handle:
        X = pickle.load(handle)
    t_load = time.perf_counter()
    rss_loaded = _maxrss_mib()
    merger = skmerge.VariationalMerger(metadata=METADATA, batch_size=spec["batch_size"], random_state=SEED)
    merger.fit(X)
    t_fit = time.perf_counter()
    rss_fit = _maxrss_mib()
    merged = merger.transform(X)
    t_transform = time.perf_counter()

    truth = np.load(spec["truth"])
    import pandas as pd

    true_f = pd.Series(truth["F"], index=pd.MultiIndex.from_arrays(truth["hkl"].T.astype(np.int64), names=["H", "K", "L"]))
    index = merged.index.to_frame(index=False).astype(np.int64)
    f_true = true_f.reindex(pd.MultiIndex.from_frame(index)).to_numpy()
    f = merged["F"].to_numpy(np.float64)
    dhkl = merged.cell.calculate_d_array(index.to_numpy(np.int32))
    shell, limits = resolution_shells(dhkl, 10)
    shell_cc = [float(np.corrcoef(f[shell == i], f_true[shell == i])[0, 1]) for i in range(len(limits))]
    result = {
        "n_obs": len(X), "n_reflections": len(merger.reflections_), "n_images": int(X["image_id"].nunique()),
        "batch_size": spec["batch_size"], "n_iter": int(merger.n_iter_), "converged": bool(merger.converged_),
        "load_s": t_load - t0, "fit_s": t_fit - t_load,
        "transform_s": t_transform - t_fit, "fit_s_per_step": (t_fit - t_load) / merger.n_iter_,
        "final_loss": float(merger.loss_curve_[-1, 0]),
        "maxrss_after_load_mib": rss_loaded, "maxrss_after_fit_mib": rss_fit,
        "cc_truth_shells": shell_cc, "cc_truth_shell_mean": float(np.mean(shell_cc)),
        "cc_truth_overall": float(np.corrcoef(f, f_true)[0, 1]),
        "shell_limits": [[float(a), float(b)] for a, b in limits],
    }
    Path(spec["result"]).write_text(json.dumps(result, indent=1))


# ------------------------------------------------------------------------ parent
def _run(command, log_path, args):
    quiet = _careless.wait_until_quiet(max_wait=args.max_wait, log=log)
    with open(log_path, "w") as handle:
        result = _careless.run_measured(command, handle, args.timeout)
    result["before"] = quiet
    result["command"] = command
    result["log"] = str(log_path)
    return result


def simulate(size, args):
    table_path, truth_path = _data_paths(size)
    info_path = table_path.with_suffix(".json")
    if table_path.exists() and truth_path.exists() and info_path.exists():
        info = json.loads(info_path.read_text())
        info["cached"] = True
        return info
    table_path.parent.mkdir(parents=True, exist_ok=True)
    log(f"simulating ~{size:,} observations")
    command = [sys.executable, str(Path(__file__).resolve()), "--simulate", str(size)]
    measured = _run(command, table_path.with_suffix(".log"), args)
    if measured["returncode"] != 0:
        raise SystemExit(f"simulation failed; see {measured['log']}")
    info = json.loads(info_path.read_text())
    info.update(process=measured, cached=False)
    info_path.write_text(json.dumps(info, indent=1))
    log(f"  {info['n_obs']:,} observations on {info['n_images']} images in {info['simulate_s']:.0f} s, "
        f"peak {measured['peak_rss_bytes'] / 2**30:.2f} GiB")
    return info


def fit(size, batch_size, args):
    table_path, truth_path = _data_paths(size)
    label = "full" if batch_size is None else f"batch{batch_size}"
    folder = OUT / f"fit_{size}_{label}"
    folder.mkdir(parents=True, exist_ok=True)
    spec = {"table": str(table_path), "truth": str(truth_path), "batch_size": batch_size,
            "result": str(folder / "result.json")}
    (folder / "spec.json").write_text(json.dumps(spec, indent=1))
    result_path = folder / "result.json"
    if result_path.exists():
        result_path.unlink()
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(folder / "spec.json")]
    measured = _run(command, folder / "run.log", args)
    out = {"size": size, "mode": "full batch" if batch_size is None else f"minibatch {batch_size} img",
           "batch_size": batch_size, "process": measured}
    if measured["returncode"] == 0 and result_path.exists():
        out.update(json.loads(result_path.read_text()))
    else:
        out["error"] = f"exit status {measured['returncode']}; see {measured['log']}"
    return out


def growth_exponent(sizes, times):
    """b of time ≈ a·size^b by least squares on the logarithms (None with < 2 points)."""
    sizes, times = np.asarray(sizes, float), np.asarray(times, float)
    ok = np.isfinite(times) & (times > 0)
    if ok.sum() < 2:
        return None
    b, _ = np.polyfit(np.log(sizes[ok]), np.log(times[ok]), 1)
    return float(b)


def report(runs, sims):
    head = (f"{'mode':<18}{'obs':>10}{'images':>7}{'refls':>8}{'steps':>6}{'conv':>5}{'fit s':>8}"
            f"{'ms/step':>9}{'wall s':>8}{'RSS GiB':>8}{'CC shells':>10}{'CC all':>8}")
    lines = [head, "-" * len(head)]
    for r in runs:
        if "error" in r:
            lines.append(f"{r['mode']:<18}{r['size']:>10,}  {r['error']}")
            continue
        p = r["process"]
        lines.append(
            f"{r['mode']:<18}{r['n_obs']:>10,}{r['n_images']:>7}{r['n_reflections']:>8,}{r['n_iter']:>6}"
            f"{'yes' if r['converged'] else 'no':>5}{r['fit_s']:>8.1f}{1000 * r['fit_s_per_step']:>9.1f}"
            f"{p['wall_time_s']:>8.1f}{p['peak_rss_bytes'] / 2**30:>8.2f}{r['cc_truth_shell_mean']:>10.4f}"
            f"{r['cc_truth_overall']:>8.4f}")
    lines.append("fit s: VariationalMerger.fit (initialisation, compilation, steps); ms/step: fit s / steps; wall s, RSS:")
    lines.append("the whole fitting process from the OS (start-up, loading the pickled table, fit, transform, truth")
    lines.append("comparison); CC shells: mean over 10 equal-count resolution shells of CC(F, true F); CC all: overall.")
    sim_line = ", ".join(f"{s['n_obs']:,} obs: {s['simulate_s']:.0f} s"
                         + (f" / {s['process']['peak_rss_bytes'] / 2**30:.2f} GiB" if s.get("process") else
                            f" / {s['child_maxrss_mib'] / 1024:.2f} GiB")
                         for s in sims)
    lines.append(f"simulation (own process; time / peak RSS): {sim_line}")
    exponents = {}
    for mode in dict.fromkeys(r["mode"] for r in runs):
        ok = [r for r in runs if r["mode"] == mode and "error" not in r]
        if len(ok) < 2:
            continue
        n = [r["n_obs"] for r in ok]
        exponents[mode] = {
            "fit_time": growth_exponent(n, [r["fit_s"] for r in ok]),
            "time_per_step": growth_exponent(n, [r["fit_s_per_step"] for r in ok]),
            "wall_time": growth_exponent(n, [r["process"]["wall_time_s"] for r in ok]),
            "peak_rss": growth_exponent(n, [r["process"]["peak_rss_bytes"] for r in ok]),
            "sizes": n,
        }
        e = exponents[mode]
        lines.append(f"growth exponent, {mode} ({len(ok)} sizes): time to convergence ~ n^{e['fit_time']:.2f}, "
                     f"time per step ~ n^{e['time_per_step']:.2f}, process wall ~ n^{e['wall_time']:.2f}, "
                     f"peak RSS ~ n^{e['peak_rss']:.2f}")
    return "\n".join(lines), exponents


def targets(runs):
    lines = ["Targets:"]
    for r in runs:
        if "error" in r:
            continue
        gib = r["process"]["peak_rss_bytes"] / 2**30
        if 0.8e6 <= r["n_obs"] <= 1.3e6:
            ok = r["converged"] and r["fit_s"] < 600 and gib < 6
            lines.append(f"  ~1M, {r['mode']}: {'converged' if r['converged'] else 'NOT converged'} in "
                         f"{r['fit_s']:.0f} s fit ({r['process']['wall_time_s']:.0f} s process), {gib:.2f} GiB "
                         f"(target: to convergence < 600 s and < 6 GiB): {'MET' if ok else 'NOT MET'}")
        if r["n_obs"] >= 2.5e6 and r["batch_size"] is not None:
            lines.append(f"  ~3M, {r['mode']}: {gib:.2f} GiB (target < 8 GiB): {'MET' if gib < 8 else 'NOT MET'}; "
                         f"{r['fit_s']:.0f} s, {'converged' if r['converged'] else 'NOT converged'}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", help="comma-separated numbers of observations (default 100000,300000,1000000,3000000)")
    parser.add_argument("--quick", action="store_true", help="only 100k and 300k")
    parser.add_argument("--modes", default="full,minibatch", help="full, minibatch or both (default)")
    parser.add_argument("--batch-images", type=int, default=32, help="images per minibatch step (default 32)")
    parser.add_argument("--full-batch-max", type=float, default=FULL_BATCH_MAX,
                        help=f"largest size run in full-batch mode (default {FULL_BATCH_MAX:,})")
    parser.add_argument("--max-wait", type=float, default=1800.0,
                        help="seconds to wait for other processes to finish before each run (default 1800)")
    parser.add_argument("--timeout", type=float, help="seconds after which a fit is killed")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--simulate", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_fit(args.child)
        return 0
    if args.simulate:
        child_simulate(args.simulate)
        return 0

    if args.sizes:
        sizes = [int(float(s)) for s in args.sizes.split(",")]
    elif args.quick:
        sizes = [100_000, 300_000]
    else:
        sizes = [100_000, 300_000, 1_000_000, 3_000_000]
    modes = [m.strip() for m in args.modes.split(",")]
    if not set(modes) <= {"full", "minibatch"}:
        parser.error("--modes takes full and/or minibatch")
    import skmerge

    started = datetime.now(timezone.utc)
    header = {"date": started.isoformat(timespec="seconds"), "host": platform.node(), "cpu_count": os.cpu_count(),
              "loadavg_at_start": _careless._loadavg(), "skmerge": skmerge.__version__,
              "python": platform.python_version(), "sizes": sizes, "modes": modes, "batch_images": args.batch_images,
              "geometry": {"cell": CELL, "spacegroup": SPACEGROUP, "dmin": DMIN, "rows_per_image": ROWS_PER_IMAGE},
              "metadata": METADATA, "seed": SEED}
    log(f"scale.py {header['date']}: skmerge {skmerge.__version__}, {os.cpu_count()} CPUs, load average at start "
        f"{header['loadavg_at_start']}")
    log(f"sizes {sizes}; modes {modes} (minibatch: {args.batch_images} images per step; full batch up to "
        f"{args.full_batch_max:,.0f} observations); metadata {','.join(METADATA)}; VariationalMerger defaults "
        f"otherwise (max_iter 2000, tol 1e-3, n_iter_no_change 200, 20x10 network)")

    sims, runs = [], []
    json_path = HERE / "out" / f"scale{'_quick' if args.quick else ''}.json"
    for size in sizes:
        sims.append(simulate(size, args))
        for mode in modes:
            if mode == "full" and size > args.full_batch_max:
                log(f"skipping full batch at {size:,} (> --full-batch-max)")
                continue
            batch = None if mode == "full" else args.batch_images
            log(f"fitting {size:,} observations, {'full batch' if batch is None else f'{batch} images per step'}")
            r = fit(size, batch, args)
            runs.append(r)
            if "error" in r:
                log(f"  FAILED: {r['error']}")
            else:
                log(f"  {r['n_iter']} steps ({'converged' if r['converged'] else 'not converged'}), fit {r['fit_s']:.1f} s, "
                    f"process {r['process']['wall_time_s']:.1f} s, peak {r['process']['peak_rss_bytes'] / 2**30:.2f} GiB, "
                    f"CC(F, truth) shells {r['cc_truth_shell_mean']:.4f}, others {r['process']['others_cpu_cores']} cores")
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps({"header": header, "simulations": sims, "runs": runs}, indent=1, default=str))

    header["elapsed_s"] = (datetime.now(timezone.utc) - started).total_seconds()
    header["loadavg_at_end"] = _careless._loadavg()
    text, exponents = report(runs, sims)
    log("")
    log(f"skmerge {skmerge.__version__} on {platform.node()}: {os.cpu_count()} CPUs, load average at start "
        f"{header['loadavg_at_start']}, at end {header['loadavg_at_end']}; {header['elapsed_s'] / 60:.1f} min")
    log(text)
    log("")
    log(targets(runs))
    busy = [f"{r['size']:,} {r['mode']}: {r['process']['others_cpu_cores']}" for r in runs
            if (r["process"].get("others_cpu_cores") or 0) > 0.25]
    log("other processes' CPU during the fits: " + ("all below 0.25 cores" if not busy else "BUSY during " + ", ".join(busy)))
    json_path.write_text(json.dumps({"header": header, "simulations": sims, "runs": runs, "exponents": exponents},
                                    indent=1, default=str))
    log(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
