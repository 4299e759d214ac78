"""Per-image scale offsets against the image encoder (``image_model``), on simulated
serial stills and on thermolysin (XFEL stills).

For each data set 10 % of the images (seeded) are held out. The merger is fitted on the
other 90 % with ``image_model="offsets"`` and with ``"encoder"`` (otherwise the same
settings), and reports:

- **CC(F, truth)** (simulated data): Pearson CC of the merged F of the training images
  with the true F;
- **held-out score**: ``merger.score`` on the held-out images, the mean log predictive
  density per observation (higher is better; offsets give an unseen image the mean
  offset, the encoder its own observations' embedding);
- **r(scale)** (simulated data): the correlation, over held-out images, of the log of
  each image's mean predicted scale Σ with the log of its mean true scale;
- **CC1/2, CCanom** (thermolysin): ``skmerge.run_merge(..., half_datasets=1)`` on every
  image, with the settings above;
- **time**: wall time of the 90 % fit and of the ``run_merge`` (the machine is shared:
  other jobs change these by up to a factor of two).

Simulated stills: ``make_unmerged(n_images=300, stills=True, mosaicity=0.0004,
dmin=2.5)``, metadata dHKL, XDET, YDET, EWALD_OFFSET; "stills ×spread" multiplies every
image's I and σ by a log-normal factor (σ of log 0.7), images with strongly different
scales. Thermolysin: ``unmerged_n395.mtz``, ``--anomalous`` with the metadata of
``compare_careless.py``.

Usage::

    python bench/image_model.py --part stills
    python bench/image_model.py --part thermolysin --max-iter 1000

Prints a markdown table and writes bench/out/image_model_<part>.json.
"""

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
DATA = HERE.parents[1] / "shared" / "data"
KINDS = ("offsets", "encoder")
STILLS_METADATA = ["dHKL", "XDET", "YDET", "EWALD_OFFSET"]
THERMOLYSIN_METADATA = ["dHKL", "Hobs", "Kobs", "Lobs", "BATCH", "ewald_offset", "xobs", "yobs"]


def split_images(X, fraction, seed):
    """Training and held-out rows of X, holding out ``fraction`` of the images."""
    images = np.unique(X["image_id"])
    held = np.random.RandomState(seed).choice(images, max(1, round(fraction * len(images))), replace=False)
    test = X["image_id"].isin(held).to_numpy()
    return ~test, test


def simulated(spread, seed):
    from skmerge.datasets import make_unmerged

    X, truth = make_unmerged(n_images=300, stills=True, mosaicity=0.0004, dmin=2.5, random_state=seed)
    scale = np.asarray(truth.scale, float)
    if spread:
        images = np.unique(X["image_id"])
        factor = np.exp(np.random.RandomState(seed + 100).normal(0, 0.7, len(images)))
        row_factor = factor[np.searchsorted(images, X["image_id"].to_numpy())]
        X = X.copy()
        X["Iobs"] *= row_factor
        X["SIGIobs"] *= row_factor
        scale = scale * row_factor
    return X, truth, scale


def image_scale_correlation(merger, X, true_scale):
    _, scale, _ = merger.predict(X, return_scale=True)
    image = np.unique(X["image_id"].to_numpy(), return_inverse=True)[1].ravel()
    count = np.bincount(image)
    predicted, true = (np.log(np.bincount(image, v) / count) for v in (scale, true_scale))
    return float(np.corrcoef(predicted, true)[0, 1])


def run_stills(args):
    from skmerge import VariationalMerger

    rows = []
    for name, spread in (("stills", False), ("stills ×spread", True)):
        X, truth, scale = simulated(spread, args.seed)
        train, test = split_images(X, 0.1, args.seed)
        for kind in KINDS:
            start = time.perf_counter()
            merger = VariationalMerger(metadata=STILLS_METADATA, image_model=kind, max_iter=args.max_iter,
                                       random_state=args.seed).fit(X[train])
            seconds = time.perf_counter() - start
            merged = merger.transform(X[train])
            f_true = truth.merged.loc[merged.index, "F"].to_numpy(float)
            rows.append({
                "data": name, "image_model": kind, "n_obs": int(train.sum()),
                "cc_truth": float(np.corrcoef(merged["F"].to_numpy(float), f_true)[0, 1]),
                "heldout_score": merger.score(X[test]),
                "r_scale": image_scale_correlation(merger, X[test], scale[test]),
                "n_iter": int(merger.n_iter_), "fit_s": seconds,
                "n_scale_weights": int(sum(np.size(w) for w in merger.scale_weights_)),
            })
            print(rows[-1], flush=True)
    return rows


def run_thermolysin(args):
    import skmerge

    path = DATA / "thermolysin_xfel" / "unmerged_n395.mtz"
    X = skmerge.read_unmerged(path, intensity_key="I", sigma_key="SigI", anomalous=True)
    train, test = split_images(X, 0.1, args.seed)
    settings = dict(metadata=THERMOLYSIN_METADATA, anomalous=True, max_iter=args.max_iter, random_state=args.seed)
    rows = []
    for kind in KINDS:
        start = time.perf_counter()
        merger = skmerge.VariationalMerger(image_model=kind, **settings).fit(X[train])
        fit_s = time.perf_counter() - start
        score = merger.score(X[test])
        start = time.perf_counter()
        result = skmerge.run_merge(X, half_datasets=1, image_model=kind, log=lambda level, message: None,
                                   **settings)
        merge_s = time.perf_counter() - start
        overall = result.statistics[0].table.loc["overall"]
        rows.append({"data": "thermolysin", "image_model": kind, "n_obs": int(train.sum()),
                     "heldout_score": score, "cc_half": float(overall["cc_half"]),
                     "cc_anom": float(overall["cc_anom"]), "n_iter": int(merger.n_iter_), "fit_s": fit_s,
                     "run_merge_s": merge_s,
                     "n_scale_weights": int(sum(np.size(w) for w in merger.scale_weights_))})
        print(rows[-1], flush=True)
    return rows


def table(rows):
    columns = [("data", "{}"), ("image_model", "{}"), ("cc_truth", "{:.4f}"), ("cc_half", "{:.3f}"),
               ("cc_anom", "{:.3f}"), ("heldout_score", "{:.3f}"), ("r_scale", "{:.3f}"),
               ("n_scale_weights", "{:,}"), ("n_iter", "{}"), ("fit_s", "{:.0f}"), ("run_merge_s", "{:.0f}")]
    columns = [(c, f) for c, f in columns if any(c in row for row in rows)]
    lines = ["| " + " | ".join(c for c, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(f.format(row[c]) if c in row else "" for c, f in columns) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["stills", "thermolysin"], required=True)
    parser.add_argument("--max-iter", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    rows = run_stills(args) if args.part == "stills" else run_thermolysin(args)
    OUT.mkdir(exist_ok=True)
    (OUT / f"image_model_{args.part}.json").write_text(json.dumps(rows, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
