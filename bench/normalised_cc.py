"""Overall half-dataset CC1/2 that does not depend on the fall-off a program leaves in
its merged intensities.

The benchmark's overall CC1/2 (``_careless.half_dataset_cc``) is Pearson's correlation of
the halves' intensities over all reflections. A program whose intensities keep the
data's fall-off with resolution (skmerge) has most of that variance in a few strong
low-resolution reflections; one whose intensities are normalised by its prior (careless,
⟨F²⟩ = ε in every shell) spreads it over all shells. Dividing each reflection's
intensity by the mean of its resolution shell (both halves' mean, equal-count shells in
1/d²) before correlating removes that difference, so the two programs' halves compare
on the same footing. Printed per half-dataset repeat and averaged, next to the plain
statistic, the mean of ten equal-count shells' CC1/2 and Spearman's rank correlation
(neither depends on the fall-off either).

Usage::

    python bench/normalised_cc.py out/pyp_xval_0.mtz careless_out/pyp_xval_0.mtz
"""

import argparse

import numpy as np
import reciprocalspaceship as rs
from scipy.stats import spearmanr


def normalised_cc_half(path, n_shells=20):
    """Per repeat, the plain and the shell-normalised Pearson CC1/2 of column ``I`` of an
    ``_xval_`` MTZ file (skmerge's or careless's layout: ``repeat`` and ``half`` columns),
    the mean of ten shells' CC1/2 and Spearman's CC1/2: an array of shape (repeats, 4)."""
    data = rs.read_mtz(str(path))
    if "I" not in data.columns:
        raise SystemExit(f"{path}: no column I (columns: {', '.join(data.columns)})")
    data.compute_dHKL(inplace=True)
    result = []
    for repeat in sorted(data["repeat"].unique()):
        merges = data[data["repeat"] == repeat]
        first, second = merges[merges["half"] == 0], merges[merges["half"] == 1]
        pairs = first[["I", "dHKL"]].join(second[["I"]], rsuffix="_2", how="inner").dropna()
        a, b, d = (pairs[c].to_numpy(np.float64) for c in ("I", "I_2", "dHKL"))
        s = 1 / d**2
        edges = np.quantile(s, np.linspace(0, 1, n_shells + 1))
        shell = np.clip(np.digitize(s, edges[1:-1]), 0, n_shells - 1)
        mean = np.bincount(shell, (a + b) / 2, n_shells) / np.bincount(shell, minlength=n_shells)
        tenth = np.minimum(shell * 10 // n_shells, 9)
        per_shell = np.mean([np.corrcoef(a[tenth == k], b[tenth == k])[0, 1] for k in range(10)])
        result.append((np.corrcoef(a, b)[0, 1], np.corrcoef(a / mean[shell], b / mean[shell])[0, 1], per_shell,
                       spearmanr(a, b)[0]))
    return np.array(result)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("xval", nargs="+", help="_xval_ MTZ files of skmerge or careless")
    parser.add_argument("--shells", type=int, default=20, help="resolution shells of the normalisation")
    args = parser.parse_args(argv)
    for path in args.xval:
        ccs = normalised_cc_half(path, args.shells)
        plain, normalised, per_shell, rank = ccs.mean(axis=0)
        print(f"{path}: CC1/2 of I {plain:.3f}, of I/<I>shell {normalised:.3f} "
              f"(per repeat {', '.join(f'{v:.3f}' for v in ccs[:, 1])}), mean of 10 shells {per_shell:.3f}, "
              f"Spearman {rank:.3f}")


if __name__ == "__main__":
    main()
