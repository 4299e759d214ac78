"""skmerge on simulated data with known truth: the small signals and the honesty of σ.

Four data sets from ``skmerge.datasets.make_unmerged`` (P 2₁2₁2₁, 2 Å, 1° images; a full
180° sweep unless ``--images`` says otherwise):

- **anomalous**: 1 % gross outliers (×3–10 zingers and shadowed spots), two images at a
  third of their scale, honest σ;
- **understated**: the same with every reported σ divided by 3;
- **time-resolved**: two states (``time_points=2``, every structure factor changed by a
  random 0.3·√(εΣ)), 1 % outliers, merged with ``separate_files``.
- **stills**: serial stills (``stills=True``, two thirds as many images as the rotation
  sets), anomalous, 1 % outliers, two images at a third of their scale, each still's
  partiality width spread log-normally by 0.5 about the mean (``mosaicity_spread``, which
  the data do not report), metadata dHKL, EWALD_OFFSET, XDET, YDET. Not run by default
  (``--datasets stills``).

For every variant of the estimator (``--variants``; names below) the script reports
CC(F, truth) (over every merged reflection, and over those the reference has, and there
again after an overall B: each merge's F times exp(B/(4d²)), B chosen for the largest CC,
since the fall-off shared between F and the scales is not in the data — the reference,
which divides by the true scales, knows it); the z-scores z = (F − F_true')/SIGF with F_true' the truth brought onto the
merge by a fitted scale and B (least squares of log F over reflections with
F/SIGF > 3), their SD and robust SD (1.4826·MAD) — also with SIGF the posterior's, before
the images' scale weights' factors (median and 90th percentile reported) and the sandwich
ratio J/H widen it (``posterior`` columns) — and for the anomalous sets those of
DANO's z (DANO − DANO_true')/SIGDANO, over the acentric pairs with both halves measured;
CC(ΔF, truth) of the anomalous (F(+) − F(−)) or time-resolved (F₁ − F₀) differences; and
for each fifth of the inlying observations by true intensity the robust SD of their
residuals about the fit over that about the truth, the amplitude's share of each
observation divided out (1 when the scales absorb none of the noise; below 1 where they
follow it).
The reference is a perfect scaler: the observations divided by their true scales,
outliers removed, merged by inverse-variance weights, F = √max(I, 0).

Usage::

    python bench/simulated.py                      # every data set, the default variants
    python bench/simulated.py --variants old,default --seeds 0,1
    python bench/simulated.py --images 60          # the 60° sweep of the earlier tables

Prints one table (markdown) and writes it to bench/out/simulated.json.
"""

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"


def variants():
    from skmerge import DoubleWilsonPrior, ErrorModel, MixtureLikelihood, StudentTLikelihood

    return {
        "old": dict(likelihood="normal", prior="wilson", error_model=None),
        "studentt": dict(likelihood=StudentTLikelihood(learn_dof=True), prior="wilson", error_model=None),
        "studentt+em": dict(likelihood=StudentTLikelihood(learn_dof=True), prior="wilson", error_model=ErrorModel()),
        "studentt+dw": dict(likelihood=StudentTLikelihood(learn_dof=True), prior=DoubleWilsonPrior(),
                            error_model=None),
        "studentt+em+dw": dict(likelihood=StudentTLikelihood(learn_dof=True), prior=DoubleWilsonPrior(),
                               error_model=ErrorModel()),
        "mixture+em": dict(likelihood=MixtureLikelihood(), prior="wilson", error_model=ErrorModel()),
        "mixture+em+dw": dict(likelihood=MixtureLikelihood(), prior=DoubleWilsonPrior(), error_model=ErrorModel()),
        "tmixture+em+dw": dict(likelihood=MixtureLikelihood(core_dof=16.0), prior=DoubleWilsonPrior(),
                               error_model=ErrorModel()),
        "default": {},
        "grid": dict(marginals="grid"),
        "two-piece": dict(likelihood="two-piece"),
        "two-piece+grid": dict(likelihood="two-piece", marginals="grid"),
        "image-layers": dict(image_layers=2),
        "image-heads": dict(image_heads=True),
        **{f"mlp{depth}": dict(mlp_layers=depth) for depth in (6, 10, 20)},
    }


def simulate(name, seed, n_images=180):
    """A data set of ``n_images`` 1° images (a third of them per state of the time-resolved
    pair, two thirds as many stills), with its truth."""
    from skmerge.datasets import make_unmerged

    options = dict(n_images=n_images, outlier_fraction=0.01, random_state=seed)
    anomalous = dict(anomalous=True, anomalous_signal=0.05)
    if name == "time-resolved":
        X, truth = make_unmerged(time_points=2, **{**options, "n_images": n_images // 3})
    elif name == "stills":
        X, truth = make_unmerged(stills=True, mosaicity_spread=0.5, **anomalous,
                                 **{**options, "n_images": 2 * n_images // 3})
    else:
        X, truth = make_unmerged(**anomalous, **options)
    # Two images at a third of their scale (the truth's scale knows it).
    images = np.unique(X["image_id"].to_numpy())
    bad = np.isin(X["image_id"].to_numpy(), images[[len(images) // 3, 2 * len(images) // 3]])
    X.loc[bad, "Iobs"] = X.loc[bad, "Iobs"] / 3
    X.loc[bad, "SIGIobs"] = X.loc[bad, "SIGIobs"] / 3
    truth.scale = np.where(bad, truth.scale / 3, truth.scale)
    truth.Itrue = np.where(bad, truth.Itrue / 3, truth.Itrue)
    if name == "understated":
        X["SIGIobs"] = X["SIGIobs"] / 3
    return X, truth


def _keys(table, group=None):
    from skmerge.symmetry import pack_hkl

    return pack_hkl(table[["H", "K", "L"]].to_numpy(np.int32), group)


def reference(X, truth, separate_files):
    """Per reflection key (ASU H, K, L as the table has them [, file]): the perfect
    scaler's F."""
    from skmerge.baseline import inverse_variance_mean

    keep = ~truth.outlier
    group = X["file_id"].to_numpy()[keep] if separate_files else None
    keys = _keys(X[keep], group)
    unique, row = np.unique(keys, return_inverse=True)
    scale = truth.scale[keep]
    mean, _ = inverse_variance_mean(row, X["Iobs"].to_numpy()[keep] / scale, X["SIGIobs"].to_numpy()[keep] / scale,
                                    len(unique))
    return dict(zip(unique.tolist(), np.sqrt(np.maximum(mean, 0.0))))


def score(merged, X, truth, name, ref):
    """CC(F), z SD, robust z SD, CC(ΔF) of a merge, and CC(F), CC(ΔF) of the reference."""
    import pandas as pd

    true = truth.merged.reset_index()
    table = merged.reset_index()
    if name == "time-resolved":
        table = table[table["file_id"] == 1]
        true = true[true["file_id"] == 1]
    both = pd.DataFrame(table).merge(pd.DataFrame(true)[["H", "K", "L", "F", "dHKL"] + (
        ["DF"] if name == "time-resolved" else ["DANO"])], on=["H", "K", "L"], suffixes=("", "_true"))
    both = both[both["N"] > 0]
    f, f_true, sigf = (both[c].to_numpy(float) for c in ("F", "F_true", "SIGF"))
    s = 1 / both["dHKL"].to_numpy(float) ** 2
    strong = (f / sigf > 3) & (f_true > 0)
    design = np.stack([np.ones(strong.sum()), -s[strong] / 4], 1)
    (log_k, b), *_ = np.linalg.lstsq(design, np.log(f[strong] / f_true[strong]), rcond=None)
    z = (f - np.exp(log_k - b * s / 4) * f_true) / sigf
    out = {"CC(F)": np.corrcoef(f, f_true)[0, 1], "z SD": z.std(),
           "robust z SD": 1.4826 * np.median(np.abs(z - np.median(z)))}
    if name == "time-resolved":
        merged_all = merged.reset_index()
        pairs = merged_all[merged_all.file_id == 0].merge(merged_all[merged_all.file_id == 1], on=["H", "K", "L"],
                                                          suffixes=("0", "1"))
        pairs = pairs.merge(pd.DataFrame(true)[["H", "K", "L", "DF"]], on=["H", "K", "L"])
        pairs = pairs[(pairs["N0"] > 0) & (pairs["N1"] > 0)]
        out["CC(ΔF)"] = np.corrcoef(pairs["F1"] - pairs["F0"], pairs["DF"])[0, 1]
        from skmerge.symmetry import pack_hkl

        hkl = pairs[["H", "K", "L"]].to_numpy(np.int32)
        r0 = np.array([ref.get(k, np.nan) for k in pack_hkl(hkl, np.zeros(len(hkl), int)).tolist()])
        r1 = np.array([ref.get(k, np.nan) for k in pack_hkl(hkl, np.ones(len(hkl), int)).tolist()])
        ok = np.isfinite(r0) & np.isfinite(r1)
        out["reference CC(ΔF)"] = np.corrcoef((r1 - r0)[ok], pairs["DF"].to_numpy()[ok])[0, 1]
        ref_f = np.array([ref.get(k, np.nan) for k in _keys(both, np.ones(len(both), int)).tolist()])
    else:
        acentric = both["DANO_true"].to_numpy(float) != 0
        measured = (both["N(+)"] > 0).to_numpy() & (both["N(-)"] > 0).to_numpy() & acentric
        out["CC(ΔF)"] = np.corrcoef(both["DANO"][measured], both["DANO_true"][measured])[0, 1]
        # DANO's z with the truth on the merge's scale and B, as F's.
        z_dano = ((both["DANO"] - np.exp(log_k - b * s / 4) * both["DANO_true"]) / both["SIGDANO"])[measured]
        out["DANO z SD"] = z_dano.std()
        out["robust DANO z SD"] = 1.4826 * np.median(np.abs(z_dano - np.median(z_dano)))
        from skmerge.symmetry import pack_hkl

        hkl = both[["H", "K", "L"]].to_numpy(np.int32)
        plus = np.array([ref.get(k, np.nan) for k in pack_hkl(hkl).tolist()])
        minus = np.array([ref.get(k, np.nan) for k in pack_hkl(-hkl).tolist()])
        ok = np.isfinite(plus) & np.isfinite(minus) & acentric
        out["reference CC(ΔF)"] = np.corrcoef((plus - minus)[ok], both["DANO_true"].to_numpy()[ok])[0, 1]
        ref_f = np.nanmean(np.stack([plus, np.where(acentric, minus, plus)]), axis=0)
    ok = np.isfinite(ref_f)
    # On the reflections the reference has (not those seen only in outliers), so that
    # the two CCs compare like with like.
    out["CC(F), reference's reflections"] = np.corrcoef(f[ok], f_true[ok])[0, 1]
    out["reference CC(F)"] = np.corrcoef(ref_f[ok], f_true[ok])[0, 1]
    out["CC(F), overall B"] = _cc_after_overall_b(f[ok], f_true[ok], s[ok])
    out["reference CC(F), overall B"] = _cc_after_overall_b(ref_f[ok], f_true[ok], s[ok])
    return out


def _posterior_table(merger, X):
    """The merged table with SIGF the posterior's, not widened by the sandwich ratio
    (skmerge.model.sandwich) nor for the images' scale weights
    (skmerge.model.scale_uncertainty), to show what they do on the same fit."""
    model = merger._get_model()
    ratio, own = model.sandwich_ratio, model.image_weight_ratio
    model.sandwich_ratio, model.image_weight_ratio = 1.0, None
    try:
        return merger.transform(X)
    finally:
        model.sandwich_ratio, model.image_weight_ratio = ratio, own


def _absorbed(merger, X, truth, fifths=5):
    """How much of the observations' noise the fit's scales absorb: for each fifth of the
    inlying observations by true intensity, the robust SD of their residuals about the
    fit's prediction over that about the truth, both in units of the reported σ.

    The truth's residuals are the simulated noise. A fit follows some of it with its own
    parameters: its amplitude takes observation i's share hᵢ = wᵢ/Σw of its reflection's
    weight (w = (true scale/σ)²), which leaves a residual √(1 − hᵢ) as wide — divided out
    here (observations with hᵢ > ½ left out), so that what stays below 1 is what the
    scales absorbed. A noise model fitted to such residuals claims more than the data
    hold, and no residual-based correction of SIGF (the error model, the sandwich J/H)
    can see it."""
    import pandas as pd

    prediction = merger.predict(X)
    sigma = X["SIGIobs"].to_numpy(float)
    observed = X["Iobs"].to_numpy(float)
    inlier = ~np.asarray(truth.outlier, bool)
    true = np.asarray(truth.Itrue, float)
    # The merge's reflections: Friedel halves apart in anomalous merges, files apart in
    # separate ones.
    asu = X.copy().hkl_to_asu(anomalous=merger.anomalous).reset_index()
    columns = ["H", "K", "L"] + (["file_id"] if merger.separate_files else [])
    weight = pd.Series(np.where(inlier, (np.asarray(truth.scale, float) / sigma) ** 2, 0.0))
    share = weight / weight.groupby([asu[c] for c in columns]).transform("sum")
    rank = np.argsort(np.argsort(np.where(inlier, true, np.inf)))
    fifth = rank * fifths // inlier.sum()
    # Observations that outweigh the rest of their reflection are left out: their
    # residual is mostly the amplitude's, and √(1 − h) divides noise by almost nothing.
    kept = inlier & (share.to_numpy() <= 0.5)
    fit_residual = (observed - prediction) / sigma / np.sqrt(1 - share.to_numpy())

    def robust(v):
        return 1.4826 * np.median(np.abs(v - np.median(v)))

    return [round(float(robust(fit_residual[sel]) / robust((observed - true)[sel] / sigma[sel])), 3)
            for sel in (kept & (fifth == k) for k in range(fifths))]


def _cc_after_overall_b(f, f_true, s):
    """The largest CC(F·exp(B·s/4), truth) over an overall B (s = 1/d²)."""
    from scipy.optimize import minimize_scalar

    best = minimize_scalar(lambda b: -np.corrcoef(f * np.exp(b * s / 4), f_true)[0, 1], bounds=(-50.0, 50.0),
                           method="bounded")
    return -best.fun


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="anomalous,understated,time-resolved")
    parser.add_argument("--variants", default="old,default")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--images", type=int, default=180, help="1° images of the anomalous sets (a full "
                        "180° sweep by default; the time-resolved states get a third each)")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    from skmerge import VariationalMerger
    from skmerge.model.fitted import learned_likelihood

    table = []
    for name in args.datasets.split(","):
        for seed in map(int, args.seeds.split(",")):
            X, truth = simulate(name, seed, args.images)
            separate = name == "time-resolved"
            metadata = ["dHKL", "EWALD_OFFSET" if name == "stills" else "BATCH", "XDET", "YDET"]
            ref = reference(X, truth, separate)
            for variant in args.variants.split(","):
                params = dict(variants()[variant])
                if separate and ("prior" not in params or variant.endswith("dw")):
                    from skmerge import DoubleWilsonPrior

                    params["prior"] = DoubleWilsonPrior(parents=[None, 0])
                t0 = time.perf_counter()
                merger = VariationalMerger(metadata=metadata, anomalous=not separate,
                                           separate_files=separate, random_state=seed, **params).fit(X)
                posterior = score(_posterior_table(merger, X), X, truth, name, ref)
                row = {"data": name, "images": args.images, "seed": seed, "variant": variant, "steps": int(merger.n_iter_),
                       "fit s": round(time.perf_counter() - t0, 1),
                       **{k: round(float(v), 4) for k, v in score(merger.transform(X), X, truth, name, ref).items()},
                       "J/H": round(float(merger.sandwich_ratio_), 3),
                       "image weight ratio median, p90": [round(float(q), 3) for q in np.quantile(
                           getattr(merger, "image_weight_ratio_", np.ones(1)), [0.5, 0.9])],
                       "fit/true residual by fifth of I": _absorbed(merger, X, truth),
                       **{f"{k}, posterior": round(float(posterior[k]), 4) for k in ("z SD", "robust z SD")},
                       "likelihood": {k: round(v, 3) for k, v in learned_likelihood(merger).items()}}
                table.append(row)
                print(json.dumps(row), flush=True)
    columns = list(dict.fromkeys(c for row in table for c in row))
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in table:
        print("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
    OUT.mkdir(exist_ok=True)
    (OUT / "simulated.json").write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    sys.exit(main())
