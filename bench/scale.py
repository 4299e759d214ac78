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

**Streamed** (``--streamed``): simulated serial stills (``make_unmerged(stills=True)``:
cell 40 × 50 × 60 Å, P 21 21 21, 2 Å, about 1,120 observations per image) written
straight into an observation store under ``--store-dir`` (``make_unmerged(store=...)``,
never a table in memory), then ``VariationalMerger.fit(store)`` for at most ``--steps``
steps (fewer when the loss converges first; ``--batch-images`` images per step, metadata
dHKL, XDET, YDET), in a process of its own: its peak RSS from the OS, the time of the
passes that start the fit,
the time per training step, and CC(F, truth) of ``transform(store)``. At the sizes in
``--compare-sizes`` the same store is also read into memory and fitted with the same
parameters (``fit(table)``), for the accuracy and the speed of the in-memory fit beside
it. The growth exponent of the time per step with the number of observations is fitted
as above. Stores are deleted after their fits unless ``--keep-stores``.

Usage::

    python bench/scale.py --quick                      # 100k and 300k: a few minutes
    python bench/scale.py                              # 100k, 300k, 1M (both modes), 3M (minibatch)
    python bench/scale.py --sizes 100000,1000000 --modes full
    python bench/scale.py --streamed --sizes 1e6,1e7,1e8 --steps 300 --store-dir /tmp/stores
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


def _truth_comparison(merged, truth_path):
    """CC of the merged F with the true F (saved by a simulation child): in 10 equal-count
    resolution shells, their mean, and overall."""
    import pandas as pd

    from skmerge.stats import resolution_shells

    truth = np.load(truth_path)
    true_f = pd.Series(truth["F"], index=pd.MultiIndex.from_arrays(truth["hkl"].T.astype(np.int64),
                                                                   names=["H", "K", "L"]))
    index = merged.index.to_frame(index=False).astype(np.int64)
    f_true = true_f.reindex(pd.MultiIndex.from_frame(index)).to_numpy()
    f = merged["F"].to_numpy(np.float64)
    shell, limits = resolution_shells(merged.cell.calculate_d_array(index.to_numpy(np.int32)), 10)
    shell_cc = [float(np.corrcoef(f[shell == i], f_true[shell == i])[0, 1]) for i in range(len(limits))]
    return {"cc_truth_shells": shell_cc, "cc_truth_shell_mean": float(np.mean(shell_cc)),
            "cc_truth_overall": float(np.corrcoef(f, f_true)[0, 1]),
            "shell_limits": [[float(a), float(b)] for a, b in limits]}


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

    result = {
        "n_obs": len(X), "n_reflections": len(merger.reflections_), "n_images": int(X["image_id"].nunique()),
        "batch_size": spec["batch_size"], "n_iter": int(merger.n_iter_), "converged": bool(merger.converged_),
        "load_s": t_load - t0, "fit_s": t_fit - t_load,
        "transform_s": t_transform - t_fit, "fit_s_per_step": (t_fit - t_load) / merger.n_iter_,
        "final_loss": float(merger.loss_curve_[-1, 0]),
        "maxrss_after_load_mib": rss_loaded, "maxrss_after_fit_mib": rss_fit,
        **_truth_comparison(merged, spec["truth"]),
    }
    Path(spec["result"]).write_text(json.dumps(result, indent=1))


STILLS_ROWS_PER_IMAGE = 1_125  # measured for make_unmerged(stills=True)'s default crystal
STREAM_METADATA = ["dHKL", "XDET", "YDET"]


def child_simulate_store(spec_path):
    """Simulate stills straight into an observation store; save the true F beside it."""
    from skmerge.datasets import make_unmerged

    spec = json.loads(Path(spec_path).read_text())
    start = time.perf_counter()
    store, truth = make_unmerged(n_images=spec["n_images"], stills=True, random_state=SEED, store=spec["store"],
                                 chunk_images=500)
    seconds = time.perf_counter() - start
    hkl = truth.merged.reset_index()[["H", "K", "L"]].to_numpy(np.int32)
    np.savez(spec["truth"], hkl=hkl, F=truth.merged["F"].to_numpy(np.float64))
    from skmerge.store import read_manifest

    manifest = read_manifest(store)
    size = sum(f.stat().st_size for f in Path(store).iterdir())
    Path(spec["result"]).write_text(json.dumps({"n_obs": manifest["observations"], "n_images": manifest["images"],
                                                "n_reflections": manifest["reflections"], "simulate_s": seconds,
                                                "store_bytes": size, "child_maxrss_mib": _maxrss_mib()}))


def child_fit_store(spec_path):
    """Fit a store streamed (or, with ``in_memory``, its table read into memory) for a
    fixed number of steps; time the start and the steps; compare with the truth."""
    spec = json.loads(Path(spec_path).read_text())
    import skmerge
    from skmerge.model import training

    trained = {}
    run = training.Trainer.run

    def timed_run(self, max_iter, **kwargs):  # the steps alone, apart from the passes that start the fit
        start = time.perf_counter()
        out = run(self, max_iter, **kwargs)
        trained["train_s"], trained["steps"] = time.perf_counter() - start, len(out[0])
        return out

    training.Trainer.run = timed_run
    t0 = time.perf_counter()
    X = skmerge.read_unmerged(spec["store"]) if spec["in_memory"] else spec["store"]
    t_read = time.perf_counter()
    merger = skmerge.VariationalMerger(metadata=STREAM_METADATA, batch_size=spec["batch_size"],
                                       max_iter=spec["steps"], random_state=SEED)
    merger.fit(X)
    t_fit = time.perf_counter()
    rss_fit = _maxrss_mib()
    merged = merger.transform(X)
    t_transform = time.perf_counter()
    Path(spec["result"]).write_text(json.dumps({
        "in_memory": spec["in_memory"], "read_s": t_read - t0, "fit_s": t_fit - t_read,
        "start_s": t_fit - t_read - trained["train_s"], "train_s": trained["train_s"], "steps": trained["steps"],
        "s_per_step": trained["train_s"] / trained["steps"], "converged": bool(merger.converged_),
        "transform_s": t_transform - t_fit,
        "maxrss_after_fit_mib": rss_fit, "n_reflections": len(merger.reflections_),
        **_truth_comparison(merged, spec["truth"]),
    }, indent=1))


def streamed(args):
    """The streamed-fit benchmark (see the module docstring): simulate, fit, report."""
    import shutil

    sizes = [int(float(v)) for v in (args.sizes or "1e6,1e7").split(",")]
    compare = {int(float(v)) for v in args.compare_sizes.split(",") if v}
    folder = Path(args.store_dir)
    folder.mkdir(parents=True, exist_ok=True)
    runs = []
    json_path = HERE / "out" / args.output
    for size in sizes:
        store = folder / f"stills_{size}.parquet"
        work = OUT / f"streamed_{size}"
        work.mkdir(parents=True, exist_ok=True)
        spec = {"n_images": max(1, round(size / STILLS_ROWS_PER_IMAGE)), "store": str(store),
                "truth": str(work / "truth.npz"), "result": str(work / "simulated.json")}
        (work / "simulate.json").write_text(json.dumps(spec))
        log(f"simulating ~{size:,} observations of stills into {store}")
        measured = _run([sys.executable, str(Path(__file__).resolve()), "--simulate-store", str(work / "simulate.json")],
                        work / "simulate.log", args)
        if measured["returncode"] != 0:
            raise SystemExit(f"simulation failed; see {measured['log']}")
        simulated = json.loads(Path(spec["result"]).read_text())
        log(f"  {simulated['n_obs']:,} observations on {simulated['n_images']:,} images, "
            f"{simulated['n_reflections']:,} reflections, {simulated['store_bytes'] / 2**30:.2f} GiB on disk, "
            f"{simulated['simulate_s']:.0f} s, peak {measured['peak_rss_bytes'] / 2**30:.2f} GiB")
        for in_memory in ([False, True] if size in compare else [False]):
            label = "in memory" if in_memory else "streamed"
            fit_spec = {"store": str(store), "truth": spec["truth"], "in_memory": in_memory,
                        "batch_size": args.batch_images, "steps": args.steps,
                        "result": str(work / f"fit_{'memory' if in_memory else 'stream'}.json")}
            spec_path = work / f"fit_{'memory' if in_memory else 'stream'}_spec.json"
            spec_path.write_text(json.dumps(fit_spec))
            log(f"fitting {size:,} observations {label}, {args.batch_images} images per step, {args.steps} steps")
            measured = _run([sys.executable, str(Path(__file__).resolve()), "--child-store", str(spec_path)],
                            work / f"fit_{'memory' if in_memory else 'stream'}.log", args)
            run = {"size": size, "mode": label, "simulated": simulated, "process": measured}
            if measured["returncode"] == 0:
                run.update(json.loads(Path(fit_spec["result"]).read_text()))
                log(f"  start {run['start_s']:.0f} s, {run['steps']} steps at {run['s_per_step'] * 1000:.0f} ms, "
                    f"peak {measured['peak_rss_bytes'] / 2**30:.2f} GiB, CC(F, truth) {run['cc_truth_overall']:.4f} "
                    f"(shells {run['cc_truth_shell_mean']:.4f}), others {measured['others_cpu_cores']} cores")
            else:
                run["error"] = f"exit status {measured['returncode']}; see {measured['log']}"
                log(f"  FAILED: {run['error']}")
            runs.append(run)
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps({"runs": runs}, indent=1, default=str))
        if not args.keep_stores:
            shutil.rmtree(store, ignore_errors=True)
    ok = [r for r in runs if r["mode"] == "streamed" and "error" not in r]
    exponent = growth_exponent([r["simulated"]["n_obs"] for r in ok], [r["s_per_step"] for r in ok])
    rss_exponent = growth_exponent([r["simulated"]["n_obs"] for r in ok],
                                   [r["process"]["peak_rss_bytes"] for r in ok])
    head = f"{'mode':<11}{'obs':>13}{'images':>8}{'store GiB':>10}{'start s':>9}{'ms/step':>9}{'RSS GiB':>9}{'CC all':>8}"
    lines = [head, "-" * len(head)]
    for r in runs:
        if "error" in r:
            lines.append(f"{r['mode']:<11}{r['size']:>13,}  {r['error']}")
            continue
        lines.append(f"{r['mode']:<11}{r['simulated']['n_obs']:>13,}{r['simulated']['n_images']:>8,}"
                     f"{r['simulated']['store_bytes'] / 2**30:>10.2f}{r['start_s']:>9.0f}{1000 * r['s_per_step']:>9.0f}"
                     f"{r['process']['peak_rss_bytes'] / 2**30:>9.2f}{r['cc_truth_overall']:>8.4f}")
    if exponent is not None:
        lines.append(f"growth exponent of the streamed fit: time per step ~ n^{exponent:.2f}, "
                     f"peak RSS ~ n^{rss_exponent:.2f}")
    log("\n".join(lines))
    json_path.write_text(json.dumps({"runs": runs, "time_per_step_exponent": exponent,
                                     "peak_rss_exponent": rss_exponent}, indent=1, default=str))
    log(f"wrote {json_path}")
    return 0


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
    parser.add_argument("--streamed", action="store_true", help="the streamed-fit benchmark (stills in a store)")
    parser.add_argument("--steps", type=int, default=300,
                        help="streamed: at most this many training steps per fit, fewer when the loss converges "
                             "(default 300)")
    parser.add_argument("--store-dir", default="/tmp/skmerge_scale_stores",
                        help="streamed: folder for the simulated stores (default /tmp/skmerge_scale_stores)")
    parser.add_argument("--compare-sizes", default="1000000",
                        help="streamed: sizes also fitted in memory (default 1000000)")
    parser.add_argument("--keep-stores", action="store_true", help="streamed: keep the stores afterwards")
    parser.add_argument("--output", default="scale_streamed.json", help="streamed: results file under bench/out")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-store", help=argparse.SUPPRESS)
    parser.add_argument("--simulate", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--simulate-store", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_fit(args.child)
        return 0
    if args.child_store:
        child_fit_store(args.child_store)
        return 0
    if args.simulate:
        child_simulate(args.simulate)
        return 0
    if args.simulate_store:
        child_simulate_store(args.simulate_store)
        return 0
    if args.streamed:
        return streamed(args)

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
