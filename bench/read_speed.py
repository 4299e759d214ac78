"""How fast skmerge reads unmerged data: one large MTZ file, observation stores, and
many files of each format in parallel.

1. ``mtz``: simulates about a million observations with skmerge.datasets.make_unmerged
   and writes them once as an unmerged MTZ (observed H, K, L, BATCH, I, SIGI, XDET, YDET;
   reciprocalspaceship adds M/ISYM) in a child process. Then, each in a fresh child process
   so that its peak memory (resource.getrusage) is its own: read_unmerged of the MTZ, its
   conversion into an observation store (skmerge.store.write_store), and read_unmerged
   of the store (best of --repeat runs each).
2. ``formats``: --copies copies of a real file of each format from ../shared/data
   (MTZ: the thermolysin stills; XDS: XDS_ASCII.HKL; stream: crystfel.stream; refl:
   integrated.refl + .expt) read with read_unmerged serially and with n_jobs=2, in a
   child process each. The pool's workers are started by a first call that is not
   timed (loky keeps them for later calls); observations per second per core is the
   rate divided by the number of processes parsing.

The CPU cores other processes kept busy during each measurement are printed with it
(psutil; the machine has 2 cores shared with other jobs).

Usage::

    python bench/read_speed.py [--rows N] [--repeat R] [--copies C] [--only mtz|formats] [--keep DIR]
"""

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _careless import _busy_cpu_seconds  # noqa: E402

# Rows per image of the simulated geometry below (cell 80 × 90 × 100 Å, P 21 21 21,
# 1.8 Å, 1° per image), measured: 360 images give 1.01 million observations.
_ROWS_PER_IMAGE = 2_805
_CELL = (80.0, 90.0, 100.0, 90.0, 90.0, 90.0)
_DMIN = 1.8
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# One real file per format, with what read_unmerged needs for it; companions are copied along.
FORMATS = {
    "MTZ": ("thermolysin_xfel/unmerged_n395.mtz", {}, ()),
    "XDS": ("formats/XDS_ASCII.HKL", {}, ()),
    "stream": ("formats/crystfel.stream", {"spacegroup": "P 43 21 2"}, ()),
    "refl": ("formats/integrated.refl", {}, ("formats/integrated.expt",)),
}


def peak_rss_mib():
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_file(rows, path, seed):
    import reciprocalspaceship as rs

    from skmerge.datasets import make_unmerged

    n_images = max(1, round(rows / _ROWS_PER_IMAGE))
    start = time.perf_counter()
    X, _ = make_unmerged(n_images=n_images, cell=_CELL, dmin=_DMIN, random_state=seed)
    simulated = time.perf_counter() - start
    raw = rs.DataSet(
        {
            "H": X["Hobs"].to_numpy(),
            "K": X["Kobs"].to_numpy(),
            "L": X["Lobs"].to_numpy(),
            "BATCH": X["BATCH"].to_numpy(),
            "I": X["Iobs"].to_numpy(),
            "SIGI": X["SIGIobs"].to_numpy(),
            "XDET": X["XDET"].to_numpy(),
            "YDET": X["YDET"].to_numpy(),
        },
        spacegroup=X.spacegroup,
        cell=X.cell,
        merged=False,
    ).astype(
        {
            "H": "HKL", "K": "HKL", "L": "HKL", "BATCH": "Batch", "I": "Intensity",
            "SIGI": "Stddev", "XDET": "MTZReal", "YDET": "MTZReal",
        }
    )
    start = time.perf_counter()
    raw.write_mtz(str(path))
    written = time.perf_counter() - start
    print(
        f"simulated {len(raw):,} observations on {n_images} images in {simulated:.1f} s; "
        f"wrote {path.name} ({path.stat().st_size / 2**20:.0f} MiB) in {written:.1f} s"
    )
    return len(raw)


def measure(spec):
    """Run one measurement in this (child) process; prints its result as JSON."""
    import skmerge
    from skmerge.store import write_store

    inputs, options, repeat = spec["inputs"], spec.get("options", {}), spec["repeat"]
    n_jobs = spec.get("n_jobs")
    if spec["what"] == "convert":
        def run():
            write_store(inputs, spec["store"], **options)
            return skmerge.store.read_manifest(spec["store"])["observations"]
    else:
        def run():
            return len(skmerge.read_unmerged(inputs, n_jobs=n_jobs, **options))
    if n_jobs:  # start the pool's workers outside the timed calls
        skmerge.read_unmerged(inputs[:n_jobs], n_jobs=n_jobs, **options)
    before = peak_rss_mib()
    times = []
    busy, own = _busy_cpu_seconds(), _own_cpu_seconds()
    for _ in range(repeat):
        start = time.perf_counter()
        rows = run()
        times.append(time.perf_counter() - start)
    print(json.dumps({"rows": rows, "times": times, "peak_mib": peak_rss_mib(), "imports_mib": before,
                      "busy": _busy_cpu_seconds() - busy, "own_cpu": _own_cpu_seconds() - own,
                      "wall": sum(times)}))


def _own_cpu_seconds():
    """CPU seconds of this process and of its pool's workers (psutil), which are its own load."""
    import psutil

    me = psutil.Process()
    return sum(sum(p.cpu_times()[:2]) for p in [me, *me.children(recursive=True)])


def run_child(spec):
    """Measure ``spec`` in a fresh interpreter; its result, with the cores others used."""
    out = subprocess.run([sys.executable, __file__, "--measure", json.dumps(spec)], check=True,
                         capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result["others_cores"] = max(result["busy"] - result["own_cpu"], 0.0) / result["wall"]
    return result


def _line(label, result, workers=1):
    best = min(result["times"])
    rate = result["rows"] / best
    others = result.get("others_cores")
    load = f"; others used {others:.1f} cores" if others is not None else ""
    print(f"  {label:<34} {result['rows']:>10,} obs  {best:7.2f} s  {rate:>10,.0f} obs/s  "
          f"{rate / workers:>10,.0f} obs/s/core  peak {result['peak_mib']:,.0f} MiB{load}")
    return best


def bench_mtz(args, folder):
    path = folder / "bench_unmerged.mtz"
    if not path.exists():
        subprocess.run([sys.executable, __file__, "--write", str(path), "--rows", str(args.rows), "--seed",
                        str(args.seed)], check=True)
    store = folder / "bench_unmerged.parquet"
    print(f"one MTZ file (best of {args.repeat}):")
    read = _line("read_unmerged(MTZ)", run_child({"what": "read", "inputs": [str(path)], "repeat": args.repeat}))
    convert = _line("write_store(MTZ) (convert)", run_child({"what": "convert", "inputs": [str(path)],
                                                              "store": str(store), "repeat": args.repeat}))
    reread = _line("read_unmerged(store)", run_child({"what": "read", "inputs": str(store), "repeat": args.repeat}))
    size = sum(p.stat().st_size for p in store.iterdir()) / 2**20
    print(f"  convert / read = {convert / read:.2f} (target ≤ 1: {'MET' if convert <= read else 'NOT MET'}); "
          f"re-reading the store is {read / reread:.1f}× faster than parsing; store {size:.0f} MiB, "
          f"MTZ {path.stat().st_size / 2**20:.0f} MiB")


def bench_formats(args, folder):
    print(f"{args.copies} copies of a file of each format, serial vs n_jobs=2 (best of {args.repeat}):")
    for label, (name, options, companions) in FORMATS.items():
        source = DATA / name
        if not source.exists():
            print(f"  {label}: {source} is missing; skipped")
            continue
        inputs = []
        for i in range(args.copies):
            copy = folder / label / f"copy{i:03d}" / source.name
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, copy)
            for companion in companions:
                shutil.copy(DATA / companion, copy.parent)
            inputs.append(str(copy))
        serial = _line(f"{label} serial", run_child({"what": "read", "inputs": inputs, "options": options,
                                                     "repeat": args.repeat}))
        parallel = _line(f"{label} n_jobs=2", run_child({"what": "read", "inputs": inputs, "options": options,
                                                         "repeat": args.repeat, "n_jobs": 2}), workers=2)
        print(f"  {label}: speed-up {serial / parallel:.2f} with 2 workers")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="about this many observations in the MTZ")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs; the best is reported")
    parser.add_argument("--copies", type=int, default=16, help="copies of each format's file")
    parser.add_argument("--only", choices=("mtz", "formats"), help="run one of the two parts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, help="write the files into this folder and keep them")
    parser.add_argument("--write", type=Path, help=argparse.SUPPRESS)  # the simulating child
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # a measuring child
    args = parser.parse_args(argv)

    if args.write is not None:
        write_file(args.rows, args.write, args.seed)
        return
    if args.measure is not None:
        measure(json.loads(args.measure))
        return

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        if args.only in (None, "mtz"):
            bench_mtz(args, folder)
        if args.only in (None, "formats"):
            bench_formats(args, folder)


if __name__ == "__main__":
    main()
