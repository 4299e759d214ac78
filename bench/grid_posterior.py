"""How honest would SIGF be with each amplitude's exact posterior instead of the fit's
mean-field one?

After a default fit of a simulated set of ``simulated.py`` (anomalous, or σ understated
3×), each Friedel half's posterior given the fitted scales, noise model and learned ν is
one-dimensional: p(F | data) ∝ Wilson(F) · Πᵢ t_ν(Iᵢ | Σᵢ F², σ′ᵢ(F)). It is evaluated on a
grid of F (Wilson's Σ per resolution shell from the fitted amplitudes; the
double-Wilson coupling of the Friedel halves is left out) and its mean and standard
deviation are compared with the fit's F(±) and SIGF(±): CC with the true F, and the SD,
robust SD and largest |z| of z = (F − k·exp(−B s/4)·F_true)/SIGF over the Friedel halves
(k and B fitted as in ``simulated.py``). Where the observations of a half disagree so that
its posterior has two modes, the fit keeps one; the grid's moments span both.

Usage::

    python bench/grid_posterior.py --dataset anomalous        # a few minutes: one fit
"""

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import simulated  # noqa: E402

GRID = 600


def _halves(merger, X):
    """Each observation's Friedel half (2·row + minus; centric reflections have one)
    and the fit's F, SIGF of every half."""
    import reciprocalspaceship as rs
    from skmerge.symmetry import pack_hkl

    merged = merger.transform(X).reset_index()
    asu, isym = rs.utils.hkl_to_asu(X[["H", "K", "L"]].to_numpy(np.int32), X.spacegroup)
    keys = pack_hkl(merged[["H", "K", "L"]].to_numpy(np.int32))
    row = np.searchsorted(keys, pack_hkl(asu.astype(np.int32)), sorter=np.argsort(keys))
    row = np.argsort(keys)[row]
    minus = (isym % 2 == 0) & ~X["CENTRIC"].to_numpy(bool)
    fit_f = np.stack([merged["F(+)"].to_numpy(float), merged["F(-)"].to_numpy(float)], 1).ravel()
    fit_sigf = np.stack([merged["SIGF(+)"].to_numpy(float), merged["SIGF(-)"].to_numpy(float)], 1).ravel()
    return merged, 2 * row + minus, fit_f, fit_sigf


def _half_mean(half, values, n):
    """The mean of ``values`` over each Friedel half's observations (0 without any)."""
    return np.bincount(half, values, n) / np.maximum(np.bincount(half, minlength=n), 1)


def grid_moments(merger, X, half, fit_f, fit_sigf):
    """Mean and SD of every Friedel half's posterior on a grid of F (NaN for halves
    without observations)."""
    n = len(fit_f)
    ipred = merger.predict(X)
    iobs, sigma = X["Iobs"].to_numpy(float), X["SIGIobs"].to_numpy(float)
    scale = ipred / (fit_f[half] ** 2 + fit_sigf[half] ** 2)
    count = np.bincount(half, minlength=n)
    measured = count > 0
    s = _half_mean(half, 1 / X["dHKL"].to_numpy(float) ** 2, n)
    epsilon = _half_mean(half, X["EPSILON"].to_numpy(float), n)
    centric = _half_mean(half, X["CENTRIC"].to_numpy(float), n) > 0
    edges = np.quantile(s[measured], np.linspace(0, 1, 21))
    shell = np.clip(np.digitize(s, edges[1:-1]), 0, 19)
    mean_square = (fit_f**2 + fit_sigf**2) / epsilon
    wilson = np.array([mean_square[measured & (shell == k)].mean() for k in range(20)])[shell] * epsilon
    dof, sdfac, sdadd = float(merger.likelihood_dof_), float(merger.sdfac_), float(merger.sdadd_)
    order = np.argsort(half, kind="stable")
    bounds = np.searchsorted(half[order], np.arange(n + 1))
    mean, sd = np.full(n, np.nan), np.full(n, np.nan)
    for h in np.flatnonzero(measured):
        rows = order[bounds[h]:bounds[h + 1]]
        top = max(6 * np.sqrt(wilson[h]), 3 * np.sqrt(np.max(np.maximum(iobs[rows], 0) / scale[rows])),
                  fit_f[h] + 8 * fit_sigf[h])
        f = np.linspace(0, top, GRID)
        intensity = scale[rows][None, :] * f[:, None] ** 2
        width = sdfac * np.sqrt(sigma[rows] ** 2 + (sdadd * intensity) ** 2)
        u = (iobs[rows][None, :] - intensity) / width
        log_like = (-(dof + 1) / 2 * np.log1p(u**2 / dof) - np.log(width)).sum(axis=1)
        log_prior = -f**2 / (2 * wilson[h]) if centric[h] else np.log(np.maximum(f, 1e-300)) - f**2 / wilson[h]
        weight = np.exp(log_like + log_prior - np.max(log_like + log_prior))
        weight /= weight.sum()
        mean[h] = weight @ f
        sd[h] = np.sqrt(weight @ (f - mean[h]) ** 2)
    return mean, sd


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=["anomalous", "understated"], default="anomalous")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    from skmerge import VariationalMerger
    from skmerge.symmetry import pack_hkl

    X, truth = simulated.simulate(args.dataset, args.seed)
    merger = VariationalMerger(metadata=["dHKL", "BATCH", "XDET", "YDET"], anomalous=True,
                               random_state=args.seed).fit(X)
    merged, half, fit_f, fit_sigf = _halves(merger, X)
    mean, sd = grid_moments(merger, X, half, fit_f, fit_sigf)
    true = truth.merged.reset_index()
    true_keys = pack_hkl(true[["H", "K", "L"]].to_numpy(np.int32))
    rows = np.argsort(true_keys)[np.searchsorted(true_keys, pack_hkl(merged[["H", "K", "L"]].to_numpy(np.int32)),
                                                 sorter=np.argsort(true_keys))]
    true_f = np.stack([true["F(+)"].to_numpy(float)[rows], true["F(-)"].to_numpy(float)[rows]], 1).ravel()
    # Halves without observations (among them the second of a centric pair) have no grid moments.
    use = np.isfinite(mean)
    s = _half_mean(half, 1 / X["dHKL"].to_numpy(float) ** 2, len(mean))
    print(f"{args.dataset}, seed {args.seed}: {use.sum()} Friedel halves; learned ν {float(merger.likelihood_dof_):.2f}")
    for label, f, sigf in [("fit (mean-field)", fit_f, fit_sigf), ("grid posterior", mean, sd)]:
        strong = use & (f / sigf > 3) & (true_f > 0)
        design = np.stack([np.ones(strong.sum()), -s[strong] / 4], 1)
        (log_k, b), *_ = np.linalg.lstsq(design, np.log(f[strong] / true_f[strong]), rcond=None)
        z = ((f - np.exp(log_k - b * s / 4) * true_f) / sigf)[use]
        robust = 1.4826 * np.median(np.abs(z - np.median(z)))
        print(f"  {label:17s} CC(F, truth) {np.corrcoef(f[use], true_f[use])[0, 1]:.4f}  z SD {z.std():.3f}  "
              f"robust {robust:.3f}  largest |z| {np.abs(z).max():.1f}")
    apart = use & (np.abs(mean - fit_f) > 3 * np.maximum(sd, fit_sigf))
    print(f"  halves whose fitted F lies more than 3 SD from the grid's mean: {int(apart.sum())}")


if __name__ == "__main__":
    main()
