"""Data-parallel training on tf.distribute: the time per step with 1 and with n worker
processes on this machine.

Simulates rotation data with known truth (``skmerge.datasets.make_unmerged``, the geometry
of ``bench/scale.py``: about 2,800 observations per image) and fits ``VariationalMerger``
for a fixed number of steps, in one process (no strategy) and as n workers of a
``tf.distribute.MultiWorkerMirroredStrategy`` on localhost (``skmerge.model.distributed``),
full batch and in minibatches of images. Each worker gets cores // n threads
(``OMP_NUM_THREADS``), so that the workers together use the cores that one process uses.
The time per step is the difference of the times of two fits (``--steps`` and a fifth of
it, after an untimed first fit) over the difference of their steps, which leaves out
reading, building and tracing.
CC(F, truth) of the longer fit is reported so that speed is not bought with accuracy.

Usage::

    python bench/distributed.py                     # 36 images (~100k observations), 1 and 2 workers
    python bench/distributed.py --images 12 --steps 100 --workers 1,2,3
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

CELL = (80.0, 90.0, 100.0, 90.0, 90.0, 90.0)
SIMULATION = {"spacegroup": "P 21 21 21", "cell": CELL, "dmin": 1.8, "random_state": 0}
FIT = {"metadata": ["dHKL", "BATCH", "XDET", "YDET"], "n_iter_no_change": 10**6, "random_state": 0}


def worker(workers, index, n_images, steps, batch_size, jit_compile):
    """One process's fits; the chief prints its measurements as JSON."""
    strategy = None
    if workers:
        from skmerge.model.distributed import is_chief, multi_worker_strategy

        strategy = multi_worker_strategy(workers, index)
    import contextlib
    import warnings

    from skmerge import VariationalMerger
    from skmerge.datasets import make_unmerged

    warnings.simplefilter("ignore")
    X, truth = make_unmerged(n_images=n_images, **SIMULATION)
    times, merger = {}, None
    # The first fit of a process pays once for importing and tracing: it is not timed.
    for n_steps in (2, steps // 5, steps):
        start = time.perf_counter()
        with strategy.scope() if strategy is not None else contextlib.nullcontext():
            merger = VariationalMerger(max_iter=n_steps, batch_size=batch_size, jit_compile=jit_compile,
                                       **FIT).fit(X)
        times[n_steps] = time.perf_counter() - start
    f = merger.transform(X)["F"]
    cc = float(np.corrcoef(f.to_numpy(float), truth.merged.loc[f.index, "F"].to_numpy(float))[0, 1])
    if strategy is None or is_chief(strategy):
        short, long = sorted(times)[1:]
        print(json.dumps({"observations": len(X), "step_ms": 1000 * (times[long] - times[short]) / (long - short),
                          "fit_s": times[long], "cc_truth": cc}), flush=True)
    sys.stdout.flush()
    # A worker that exits normally waits for TensorFlow's coordination service.
    os._exit(0)


def measure(n_workers, args, batch_size):
    """Run n worker processes (one plain process for n = 1); the chief's measurements."""
    sys.path.insert(0, str(ROOT))
    from skmerge.model.distributed import local_workers

    workers = local_workers(n_workers) if n_workers > 1 else ""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS=str(max(1, os.cpu_count() // n_workers)))
    env.pop("TF_CONFIG", None)
    command = [sys.executable, __file__, "--worker", workers, "--images", str(args.images), "--steps",
               str(args.steps), "--batch-images", str(batch_size or 0)] + (["--jit-compile"] if args.jit_compile else [])
    processes = [subprocess.Popen([*command, "--index", str(i)], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True) for i in range(n_workers)]
    outputs = [p.communicate(timeout=3600)[0] for p in processes]
    if any(p.returncode for p in processes):
        raise RuntimeError(f"a worker failed: return codes {[p.returncode for p in processes]}")
    return json.loads(next(line for out in outputs for line in out.splitlines() if line.startswith("{")))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=36)
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--batch-images", type=int, default=8, help="minibatch size in images (0: full batch only)")
    parser.add_argument("--workers", default="1,2", help="numbers of worker processes to compare")
    parser.add_argument("--jit-compile", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker, args.index, args.images, args.steps, args.batch_images or None, args.jit_compile)
        return
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the start; {args.images} images, "
          f"{args.steps} steps" + (", XLA" if args.jit_compile else ""))
    print(f"{'mode':>12} {'workers':>7} {'obs':>8} {'ms/step':>8} {'fit s':>7} {'CC(F,truth)':>11}")
    modes = [("full batch", None)] + ([(f"{args.batch_images} images", args.batch_images)]
                                      if args.batch_images else [])
    for mode, batch_size in modes:
        for n_workers in (int(n) for n in args.workers.split(",")):
            result = measure(n_workers, args, batch_size)
            print(f"{mode:>12} {n_workers:>7} {result['observations']:>8} {result['step_ms']:>8.1f} "
                  f"{result['fit_s']:>7.1f} {result['cc_truth']:>11.4f}", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
