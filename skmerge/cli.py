"""The ``skmerge`` command line: thin argument parsing over the public API."""

import argparse
import sys

from . import __version__


def _demo(args):
    """Simulate a data set with known truth, merge it and print the statistics."""
    import numpy as np

    from .datasets import make_unmerged
    from .merger import VariationalMerger
    from .stats import cc_half, half_dataset_merges, resolution_shells

    X, truth = make_unmerged(n_images=args.images, outlier_fraction=0.01, random_state=args.seed)
    print(f"simulated {len(X):,} observations of {X['asu_index'].nunique():,} reflections on {args.images} images")
    merger = VariationalMerger(
        metadata=["dHKL", "BATCH", "XDET", "YDET"], likelihood="studentt", random_state=args.seed,
        verbose=not args.quiet,
    ).fit(X)
    print(f"fitted in {merger.n_iter_} steps")
    merged = merger.transform(X)
    halves = half_dataset_merges(merger, X, random_state=args.seed)
    table = cc_half(halves, n_bins=args.shells)
    true = truth.merged.loc[merged.index]
    shell, _ = resolution_shells(true["dHKL"].to_numpy(), args.shells)
    f, f_true = merged["F"].to_numpy(float), true["F"].to_numpy(float)
    cc_true = [np.corrcoef(f[shell == i], f_true[shell == i])[0, 1] for i in range(args.shells)]
    table["CC(F,truth)"] = [*cc_true, np.corrcoef(f, f_true)[0, 1]]
    print(table.to_string(float_format=lambda v: f"{v:.3f}"))
    return 0


def build_parser():
    parser = argparse.ArgumentParser(prog="skmerge", description="Merge X-ray diffraction data by variational inference.")
    parser.add_argument("--version", action="version", version=f"skmerge {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="simulate a data set, merge it and print the statistics")
    demo.add_argument("--images", type=int, default=90, help="number of simulated images (default 90)")
    demo.add_argument("--shells", type=int, default=8, help="resolution shells in the table (default 8)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(run=_demo)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
