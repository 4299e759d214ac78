"""Predictions for images a fit never saw: a fold of whole images held out, as
``GroupKFold`` scores them.

For each data set the defaults are fitted on four fifths of the images (drawn with
``--seed``) and the held-out fifth is predicted: the mean log predictive density per
observation (``score``, the figure ``GridSearchCV`` ranks by) and the calibration of the
predictive law by its probability integral transform (PIT) — the share of observations
inside its central 68 % and 95 % intervals and the PIT histogram (flat when calibrated).
The predictive law of an observation is the model's prediction with the observation's
own σ (after the fitted error model, at the predicted intensity) added: with :func:`skmerge.model.fitted.mixture_images`, the equal mixture of the
normals of its predictions as each of those training images; on a checkout without it
(run with ``PYTHONPATH=/path/to/old/checkout``), the single normal of ``predict``.

    python bench/unseen_images.py --datasets thermolysin,hypf
    PYTHONPATH=../old python bench/unseen_images.py --reuse     # the same fits, older predictions

The fitted mergers are kept in ``bench/out/unseen_images/`` (``--reuse`` loads them).
"""

import argparse
import json
import time
from pathlib import Path

import joblib
import numpy as np
from scipy.stats import norm

import skmerge
from skmerge.calibration import predictive_z, refined_sigma

HERE = Path(__file__).resolve().parent
DATA = (HERE.parent.parent / "shared" / "data").resolve()
OUT = HERE / "out" / "unseen_images"

SETS = {
    "thermolysin": (DATA / "thermolysin_xfel" / "unmerged_n395.mtz", "I", "SigI",
                    ["dHKL", "Hobs", "Kobs", "Lobs", "BATCH", "ewald_offset", "xobs", "yobs"]),
    "hypf": (DATA / "hypf_hg_sad" / "hypf_unmerged.mtz", "I", "SIGI",
             ["dHKL", "Hobs", "Kobs", "Lobs", "XDET", "YDET", "BATCH", "FRACTIONCALC"]),
}


def held_out_fold(name, seed, reuse):
    """The merger fitted on four fifths of the images and the held-out observations."""
    path = OUT / f"{name}_seed{seed}.joblib"
    if reuse and path.exists():
        return joblib.load(path)
    mtz, intensity, sigma, metadata = SETS[name]
    X = skmerge.read_unmerged(mtz, anomalous=True, intensity_key=intensity, sigma_key=sigma)
    images = np.unique(X["image_id"])
    held = np.isin(X["image_id"], np.random.default_rng(seed).permutation(images)[: len(images) // 5])
    merger = skmerge.VariationalMerger(anomalous=True, metadata=metadata, random_state=seed).fit(X[~held])
    OUT.mkdir(parents=True, exist_ok=True)
    joblib.dump((merger, X[held]), path)
    return merger, X[held]


def predictive_pit(merger, X):
    """P(I ≤ Iobs) of every observation under its predictive law (see the module docstring)."""
    observed, sigma = X["Iobs"].to_numpy(), X["SIGIobs"].to_numpy()

    def normal_pit(X_as):
        mean, sd = merger.predict(X_as, return_std=True)
        return norm.cdf(predictive_z(observed, mean, refined_sigma(merger, sigma, mean), sd))

    try:
        from skmerge.model.fitted import mixture_images
    except ImportError:
        return normal_pit(X)
    components = mixture_images(merger._get_model(), len(merger.image_ids_), merger)
    return np.mean([normal_pit(X.assign(image_id=image)) for image in merger.image_ids_[components]], 0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default="thermolysin,hypf")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reuse", action="store_true", help="load the fits of an earlier run")
    args = parser.parse_args()
    print(f"skmerge from {Path(skmerge.__file__).parent}")
    print("| data set | held-out obs. | score | in 68 % | in 95 % | PIT histogram (10 bins, %) | score s |")
    print("|---|---:|---:|---:|---:|---|---:|")
    for name in args.datasets.split(","):
        merger, X = held_out_fold(name, args.seed, args.reuse)
        start = time.perf_counter()
        score = merger.score(X)
        seconds = time.perf_counter() - start
        pit = predictive_pit(merger, X)
        central = np.abs(pit - 0.5)
        histogram = np.histogram(pit, bins=10, range=(0, 1))[0] / len(pit) * 100
        print(f"| {name} | {len(X):,} | {score:.4f} | {np.mean(central < 0.34):.3f} | {np.mean(central < 0.475):.3f} "
              f"| {' '.join(f'{h:.1f}' for h in histogram)} | {seconds:.1f} |")
        print(json.dumps({"data set": name, "seed": args.seed, "score": score, "in68": float(np.mean(central < 0.34)),
                          "in95": float(np.mean(central < 0.475))}))


if __name__ == "__main__":
    main()
