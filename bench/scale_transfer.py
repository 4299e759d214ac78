"""Scale transfer on hypf: merge, then merge again under the first run's frozen scales,
and compare the two merges.

Merges ``hypf_unmerged.mtz`` anomalously with the metadata KEYS into OUT/A (what
``skmerge mono --anomalous KEYS hypf_unmerged.mtz OUT/A`` does, through
:func:`skmerge.workflow.run_merge` so that ``--a-steps``/``--a-tol`` can run the first fit
longer than the command line's defaults), then runs ``skmerge mono --anomalous
--scale-file OUT/A --freeze-scales KEYS hypf_unmerged.mtz OUT/B``, unless their merged
files exist, and prints CC(F), CC(I) and CC(F(+) − F(−)) between the two merges over
every reflection of both, the median ratio of B's F to A's, the wall time and peak
memory of each run (GNU time), and the last loss and number of steps of each fit.

Usage::

    python bench/scale_transfer.py --out bench/out/transfer               # A with the defaults
    python bench/scale_transfer.py --out bench/out/transfer6k --a-steps 6000 --a-tol 0
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import reciprocalspaceship as rs

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hypf_hg_sad" / "hypf_unmerged.mtz"
KEYS = "dHKL,Hobs,Kobs,Lobs,XDET,YDET,BATCH"


def run(prefix, command):
    if Path(f"{prefix}_0.mtz").is_file():
        return None
    done = subprocess.run(["/usr/bin/time", "-f", "%e %M", sys.executable, *command], capture_output=True, text=True,
                          check=True)
    seconds, kilobytes = done.stderr.strip().splitlines()[-1].split()
    return float(seconds), int(kilobytes) / 1024


def compare(first, second):
    a, b = (rs.read_mtz(f"{prefix}_0.mtz") for prefix in (first, second))
    both = a.join(b, how="inner", lsuffix="_a", rsuffix="_b")

    def cc(column):
        x, y = both[f"{column}_a"].to_numpy(float), both[f"{column}_b"].to_numpy(float)
        ok = np.isfinite(x) & np.isfinite(y)
        return float(np.corrcoef(x[ok], y[ok])[0, 1])

    anomalous = {}
    for name, frame in (("a", a), ("b", b)):
        anomalous[name] = (frame["F(+)"].astype(float) - frame["F(-)"].astype(float)).rename(name)
    dano = pd.concat(anomalous.values(), axis=1, join="inner").dropna()
    ratio = both["F_b"].to_numpy(float) / both["F_a"].to_numpy(float)
    return {"reflections": len(both), "cc_f": cc("F"), "cc_i": cc("I"),
            "cc_dano": float(np.corrcoef(dano["a"], dano["b"])[0, 1]),
            "median_f_ratio": float(np.median(ratio)), "differ_10pc": float(np.mean(np.abs(ratio - 1) > 0.1))}


def last_loss(prefix):
    history = pd.read_csv(f"{prefix}_history.csv")
    return float(history["loss"].iloc[-1]), len(history)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/out/transfer"))
    parser.add_argument("--a-steps", type=int, default=2000, help="max_iter of the first fit (default: skmerge's)")
    parser.add_argument("--a-tol", type=float, default=1e-3, help="tol of the first fit (default: skmerge's)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    first, second = args.out / "A", args.out / "B"
    merge_a = (f"from skmerge.workflow import run_merge; run_merge([{str(DATA)!r}], {str(first)!r}, anomalous=True, "
               f"metadata={KEYS.split(',')!r}, max_iter={args.a_steps}, tol={args.a_tol})")
    times = {"A": run(first, ["-c", merge_a]),
             "B": run(second, ["-m", "skmerge", "mono", "--quiet", "--anomalous", "--scale-file", str(first),
                               "--freeze-scales", KEYS, str(DATA), str(second)])}
    result = {"times_s_mb": times, "loss_steps": {"A": last_loss(first), "B": last_loss(second)},
              **compare(first, second)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
