"""Indexing ambiguity on simulated serial stills: images assigned, merge quality, cost.

For each space group (P 6₃, P 4₃, R 3 in hexagonal axes) the script simulates serial
stills (``make_unmerged(stills=True, ...)``) twice from the same seed: once as indexed
consistently, once with half of the images reindexed by the lattice's twin law at
random. Both are merged with skmerge's defaults (``reindexing="auto"``); the scrambled
one is also merged with ``reindexing="none"`` to show what the ambiguity costs when it is
left alone. Reported: the fraction of images given the right operator (up to one
global operator), CC(F, truth) of each merge (the truth brought into the merge's global
setting), and the fit times.

Usage::

    python bench/ambiguity.py                       # 300 images per space group
    python bench/ambiguity.py --images 120 --spacegroups "P 63"

Prints a markdown table and writes bench/out/ambiguity.json.
"""

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CELLS = {"P 63": (60, 60, 90, 90, 90, 120), "P 43": (55, 55, 80, 90, 90, 90), "R 3": (58.4, 58.4, 156.2, 90, 90, 120)}
METADATA = ["dHKL", "XDET", "YDET", "EWALD_OFFSET"]


def cc_to_truth(merger, X, truth):
    """CC(F, truth), the truth put into the merge's global setting (the operator most
    images were assigned relative to the simulator's)."""
    from skmerge.ambiguity import Operators, parse_operator
    from skmerge.symmetry import map_to_asu

    merged = merger.transform(X)
    true = truth.merged.reset_index()
    if len(merger.reindexing_operators_) > 1 and "image_operator" in truth:
        operators = Operators([parse_operator(n) for n in merger.reindexing_operators_], X.spacegroup)
        applied = np.array([operators.names.index(n) for n in truth.image_operator])
        composite = operators.product[applied, merger.image_operators_]
        global_op = int(np.bincount(composite).argmax())
        if global_op:
            hkl = operators.apply(true[["H", "K", "L"]].to_numpy(), np.full(len(true), global_op))
            true[["H", "K", "L"]] = map_to_asu(hkl, X.spacegroup)[0]
    both = merged[["F"]].join(true.set_index(["H", "K", "L"])[["F"]], rsuffix="_true", how="inner")
    return float(np.corrcoef(both["F"], both["F_true"])[0, 1])


def right_fraction(merger, truth):
    """Fraction of the images whose assigned operator, after the simulator's, gives the
    global operator of most images."""
    if len(merger.reindexing_operators_) == 1:
        return float("nan")
    applied = np.array([merger.reindexing_operators_.index(n) for n in truth.image_operator])
    composite = merger._operators().product[applied, merger.image_operators_]
    return float(np.mean(composite == np.bincount(composite).argmax()))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--spacegroups", default="P 63,P 43,R 3")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from skmerge import VariationalMerger
    from skmerge.datasets import make_unmerged

    rows = []
    for spacegroup in [s.strip() for s in args.spacegroups.split(",")]:
        kw = dict(n_images=args.images, stills=True, mosaicity=0.0004, spacegroup=spacegroup,
                  cell=CELLS[spacegroup], random_state=args.seed)
        X, truth = make_unmerged(reindexed_fraction=0.5, **kw)
        X0, truth0 = make_unmerged(**kw)
        row = {"space group": spacegroup, "observations": len(X), "images": args.images}
        for name, data, params in (("scrambled", (X, truth), {}), ("unscrambled", (X0, truth0), {}),
                                   ("scrambled, reindexing=none", (X, truth), {"reindexing": "none"})):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                start = time.perf_counter()
                merger = VariationalMerger(metadata=METADATA, random_state=args.seed, **params).fit(data[0])
                seconds = time.perf_counter() - start
            row[f"CC(F) {name}"] = cc_to_truth(merger, *data)
            row[f"time {name} (s)"] = seconds
            row[f"steps {name}"] = merger.n_iter_
            if name == "scrambled":
                row["images right"] = right_fraction(merger, data[1])
                row["least probability"] = float(merger.image_reindexing()["probability"].min())
        rows.append(row)
        print(json.dumps(row), flush=True)
    (HERE / "out").mkdir(exist_ok=True)
    (HERE / "out" / "ambiguity.json").write_text(json.dumps(rows, indent=1))
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(f"{row[k]:.4g}" if isinstance(row[k], float) else str(row[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
