"""How fast skmerge.read_unmerged reads a large unmerged MTZ file.

Simulates about a million observations with skmerge.datasets.make_unmerged and writes them
once as an unmerged MTZ (observed H, K, L, BATCH, I, SIGI, XDET, YDET; reciprocalspaceship
adds M/ISYM) in a child process, then times read_unmerged on that file (best of --repeat
runs) here, so that the peak memory reported (resource.getrusage) is that of reading alone.

Usage::

    python bench/read_speed.py [--rows N] [--repeat R] [--keep DIR]
"""

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Rows per image of the simulated geometry below (cell 80 × 90 × 100 Å, P 21 21 21,
# 1.8 Å, 1° per image), measured: 360 images give 1.01 million observations.
_ROWS_PER_IMAGE = 2_805
_CELL = (80.0, 90.0, 100.0, 90.0, 90.0, 90.0)
_DMIN = 1.8


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


def time_read(path, repeat):
    """Time read_unmerged and report the peak memory of this process."""
    import skmerge

    skmerge.read_unmerged  # import the table module before measuring
    before = peak_rss_mib()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        X = skmerge.read_unmerged(path)
        times.append(time.perf_counter() - start)
        del X
    X = skmerge.read_unmerged(path)
    best = min(times)
    print(f"rows: {len(X):,}")
    print(f"seconds (best of {repeat}): {best:.2f}   (all: {', '.join(f'{t:.2f}' for t in times)})")
    print(f"rows per second: {len(X) / best:,.0f}")
    print(f"peak memory: {peak_rss_mib():,.0f} MiB (after imports: {before:,.0f} MiB)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="about this many observations")
    parser.add_argument("--repeat", type=int, default=3, help="timed reads; the best is reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, help="write the MTZ file into this folder and keep it")
    parser.add_argument("--write", type=Path, help=argparse.SUPPRESS)  # the simulating child
    args = parser.parse_args(argv)

    if args.write is not None:
        write_file(args.rows, args.write, args.seed)
        return

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "bench_unmerged.mtz"
        subprocess.run(
            [sys.executable, __file__, "--write", str(path), "--rows", str(args.rows), "--seed", str(args.seed)],
            check=True,
        )
        time_read(path, args.repeat)


if __name__ == "__main__":
    main()
