"""Online merging with ``partial_fit`` against a fit of every image at once and against a
warm start that forgets.

Simulates a rotation data set (:func:`skmerge.datasets.make_unmerged`), splits its images
into ``--chunks`` consecutive chunks and merges it three ways with the same parameters:
``fit`` on every image; ``partial_fit`` chunk by chunk; and ``fit`` on the first chunk
followed by ``warm_start=True`` fits on each later chunk alone (the scales and the
posterior of reflections seen before are reused, but each fit sees only its chunk under
Wilson's prior). Prints CC(F, truth) of each (over the reflections each merge holds and
over the reflections observed in the first and the last chunk), CC(F) of the online and
the forgetting merges with the all-at-once merge, and each method's wall time.

Usage::

    python bench/partial_fit.py --images 120 --mean-intensity 20
    python bench/partial_fit.py --images 180 --chunks 3 --max-iter 2000 --mlp-layers 20
"""

import argparse
import copy
import time
import warnings

import numpy as np
import pandas as pd

from skmerge import VariationalMerger
from skmerge.datasets import make_unmerged
from skmerge.model.data import encode


def correlation(merged, reference, index=None):
    """CC of F over the reflections both tables hold (and ``index`` holds)."""
    joined = merged[["F"]].join(reference[["F"]], rsuffix="_ref", how="inner")
    if index is not None:
        joined = joined.loc[joined.index.intersection(index)]
    return np.corrcoef(joined["F"].to_numpy(float), joined["F_ref"].to_numpy(float))[0, 1], len(joined)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=120)
    parser.add_argument("--chunks", type=int, default=2)
    parser.add_argument("--mean-intensity", type=float, default=20.0)
    parser.add_argument("--max-iter", type=int, default=1000)
    parser.add_argument("--mlp-layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # short fits warn that they did not converge
    X, truth = make_unmerged(n_images=args.images, mean_intensity=args.mean_intensity, random_state=args.seed)
    bounds = np.linspace(0, args.images, args.chunks + 1).round().astype(int)
    chunks = [X[(X["image_id"] >= a) & (X["image_id"] < b)] for a, b in zip(bounds[:-1], bounds[1:])]
    params = dict(mlp_layers=args.mlp_layers, max_iter=args.max_iter, random_state=0)

    times = {}
    start = time.perf_counter()
    whole = VariationalMerger(**params).fit(X)
    times["all at once"] = time.perf_counter() - start
    start = time.perf_counter()
    online = VariationalMerger(**params).partial_fit(chunks[0])
    first_chunk = time.perf_counter() - start
    forgetting = copy.deepcopy(online).set_params(warm_start=True)
    for update, name in ((online.partial_fit, "partial_fit"), (forgetting.fit, "forgetting warm start")):
        start = time.perf_counter()
        for chunk in chunks[1:]:
            update(chunk)
        times[name] = first_chunk + time.perf_counter() - start

    merges = {"all at once": whole.transform(X), "partial_fit": online.transform(X),
              "forgetting warm start": forgetting.transform(chunks[-1])}
    first, last = (encode(c, anomalous=False, separate_files=False).keys for c in (chunks[0], chunks[-1]))
    hkl = whole.reflections_.hkl[np.isin(whole.reflections_.keys, np.intersect1d(first, last))]
    both = pd.MultiIndex.from_arrays(hkl.T, names=["H", "K", "L"])
    print(f"{args.images} images in {args.chunks} chunks, mean intensity {args.mean_intensity}, {params}; "
          f"{len(both)} reflections observed in the first and the last chunk")
    print(f"{'method':<24}{'CC(F, truth)':>14}{'n':>7}{'  on both':>10}{'CC(F, all)':>12}{'  on both':>10}"
          f"{'time (s)':>10}")
    for name, merged in merges.items():
        cc_truth, n = correlation(merged, truth.merged)
        cc_whole = correlation(merged, merges["all at once"])[0]
        print(f"{name:<24}{cc_truth:>14.4f}{n:>7}{correlation(merged, truth.merged, both)[0]:>10.4f}"
              f"{cc_whole:>12.4f}{correlation(merged, merges['all at once'], both)[0]:>10.4f}{times[name]:>10.1f}")


if __name__ == "__main__":
    main()
