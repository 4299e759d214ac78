"""Choose the Student-t degrees of freedom for HypF by image-grouped cross-validation.

The unmerged HypF Hg-SAD data (84 images, raw MOSFLM output, one faulty image) are
merged with a Student-t likelihood for several degrees of freedom ν, and with a normal
likelihood (ν = ∞). Each candidate is scored by 5-fold cross-validation in which whole
images are held out (``ImageKFold``): the score is the mean log-likelihood per held-out
observation, so the candidate that best predicts measurements it has not seen wins. The
best model, refitted on all images, is saved with joblib, loaded again and used to
write the merged amplitudes.

    python examples/choose_dof_hypf.py                      # the full search (slow)
    python examples/choose_dof_hypf.py --max-iter 300 --mlp-layers 6 --n-jobs 2
    python examples/choose_dof_hypf.py --dask local         # on a local dask cluster
    python examples/choose_dof_hypf.py --dask tcp://scheduler:8786   # on a lab's cluster

The scale model uses the image number (BATCH) and the other metadata instead of a free
offset per image: a held-out image has no offset of its own, so per-image offsets
cannot help predict it, while a smooth function of the image number can.
"""

import argparse
import time
from contextlib import ExitStack
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
from sklearn.model_selection import GridSearchCV

import skmerge
from skmerge import NormalLikelihood, StudentTLikelihood
from skmerge.metrics import ccpred, heldout_loglik
from skmerge.model_selection import ImageKFold

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hypf_hg_sad" / "hypf_unmerged.mtz"
# careless's metadata for rotation data. FRACTIONCALC matters here: these are raw MOSFLM
# observations, many of them partial (a fraction of the reflection recorded per image).
METADATA = ["dHKL", "Hobs", "Kobs", "Lobs", "XDET", "YDET", "BATCH", "FRACTIONCALC"]
DOFS = [2.0, 4.0, 8.0, 16.0, 32.0]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA, help="unmerged MTZ (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("hypf_dof"), help="output folder (default: %(default)s)")
    parser.add_argument("--folds", type=int, default=5, help="image-grouped folds (default: %(default)s)")
    parser.add_argument("--max-iter", type=int, default=2000, help="optimisation steps per fit (default: %(default)s)")
    parser.add_argument("--mlp-layers", type=int, default=20, help="depth of the scale network (default: %(default)s)")
    parser.add_argument("--n-jobs", type=int, default=None, help="parallel fits with joblib (default: one at a time)")
    parser.add_argument(
        "--jit", action="store_true",
        help="compile every fit's training loop with XLA (slower on CPUs; costs seconds and memory per fit)",
    )
    parser.add_argument(
        "--dask", default=None, metavar="ADDRESS",
        help="run the fits on a dask cluster: 'local' starts one on this machine, else a scheduler address",
    )
    return parser.parse_args()


def search_dof(X, args):
    merger = skmerge.VariationalMerger(
        anomalous=True, metadata=METADATA, image_scales=False,
        mlp_layers=args.mlp_layers, max_iter=args.max_iter, jit_compile=args.jit, random_state=0,
    )
    grid = {"likelihood": [*(StudentTLikelihood(dof=d) for d in DOFS), NormalLikelihood()]}
    search = GridSearchCV(
        merger, grid, cv=ImageKFold(args.folds), scoring={"loglik": heldout_loglik, "ccpred": ccpred},
        refit="loglik", n_jobs=args.n_jobs,
    )
    with ExitStack() as stack:
        if args.dask:
            import dask
            from dask.distributed import Client, LocalCluster

            if args.dask == "local":
                # Keep glibc's memory handling in the workers (see docs/model_selection.md).
                stack.enter_context(dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}))
                cluster = stack.enter_context(
                    LocalCluster(n_workers=args.n_jobs or 2, threads_per_worker=1, dashboard_address=None)
                )
                client = stack.enter_context(Client(cluster))
            else:
                client = stack.enter_context(Client(args.dask))
            print(f"fits run on the dask cluster at {client.scheduler.address}")
            stack.enter_context(joblib.parallel_backend("dask"))
        search.fit(X)
    return search


def results_table(search):
    results = pd.DataFrame(search.cv_results_)
    dof = [
        f"{params['likelihood'].dof:g}" if isinstance(params["likelihood"], StudentTLikelihood) else "∞ (normal)"
        for params in results["params"]
    ]
    table = pd.DataFrame(
        {
            "dof": dof,
            "loglik (mean)": results["mean_test_loglik"],
            "loglik (sd)": results["std_test_loglik"],
            "CCpred": results["mean_test_ccpred"],
            "rank": results["rank_test_loglik"],
        }
    )
    return table.set_index("dof")


def main():
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    X = skmerge.read_unmerged(args.data, anomalous=True)
    n_images = X["image_id"].nunique()
    print(f"{args.data.name}: {len(X)} observations on {n_images} images")

    start = time.perf_counter()
    search = search_dof(X, args)
    print(f"\n{args.folds}-fold image-grouped cross-validation ({time.perf_counter() - start:.0f} s); "
          "held-out log-likelihood per observation, higher is better:")
    with pd.option_context("display.float_format", "{:.4f}".format):
        print(results_table(search).to_string())
    best = search.best_params_
    print(f"\nbest: likelihood={best['likelihood']!r}")

    path = args.out / "hypf_best_merger.joblib"
    joblib.dump(search.best_estimator_, path)
    merger = joblib.load(path)
    merged = merger.transform(X)
    same = np.array_equal(merged["F"].to_numpy(float), search.best_estimator_.transform(X)["F"].to_numpy(float))
    merged.write_mtz(str(args.out / "hypf_merged.mtz"))
    print(f"saved {path}; reloaded it and merged {len(merged)} reflections "
          f"(identical to the in-memory model: {same}) into {args.out / 'hypf_merged.mtz'}")
    acentric = merged["DANO"].notna()
    print(f"mean F/SIGF {np.mean(merged['F'] / merged['SIGF']):.1f}; "
          f"{int(acentric.sum())} reflections with DANO, mean |DANO|/SIGDANO "
          f"{np.mean(np.abs(merged['DANO'][acentric]) / merged['SIGDANO'][acentric]):.2f}")


if __name__ == "__main__":
    main()
