"""Time per training step of several estimator settings on one data set, timed in one
process in alternating rounds.

Separate runs on this machine drift by up to 2× within minutes (bench/RESULTS.md), more
than most differences worth measuring, and ``before_after.py --only timing`` times each
setting in its own process. Here every setting is fitted for a few steps (which builds
its compiled training step), then the settings' steps run in turn, ``--steps`` steps per
setting per round, for ``--rounds`` rounds. Each setting's figure is the median over
the rounds of its time divided by the first setting's time in the same round, so that
drift slower than a round cancels. Each setting gets skmerge's own network (serial stills
a shallower shared stack under their image layers) unless ``--benchmark-network`` gives
every one careless's 20 × 10, as the quality benchmark does.

Usage (from the checkout to measure; settings are ``name=estimator parameters``)::

    python bench/step_ab.py --dataset hypf \\
        --setting "old defaults=likelihood='normal', error_model=None, prior='wilson'" \\
        --setting "defaults="
    python bench/step_ab.py --dataset thermolysin --setting "heads=image_layers=0" --setting "defaults="
"""

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # this checkout's skmerge, and the bench's modules

import compare_careless  # noqa: E402


def _trainers(X, case, settings, build_steps, benchmark_network):
    """Each setting's Trainer after a short fit. The estimator keeps no handle on its
    trainer, so the trainer is recorded as it starts to run."""
    from skmerge import VariationalMerger
    from skmerge.model import training

    spec = {**case.api_spec(build_steps), "network": benchmark_network}
    trainers, started, run = {}, [], training.Trainer.run

    def recording_run(trainer, *args, **kwargs):
        started.append(trainer)
        return run(trainer, *args, **kwargs)

    training.Trainer.run = recording_run
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a few steps neither converge nor need to
            for name, extra in settings:
                started.clear()
                VariationalMerger(**compare_careless.estimator_params({**spec, "extra": extra})).fit(X)
                trainers[name] = started[0]
    finally:
        training.Trainer.run = run
    return trainers


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="hypf", choices=sorted(compare_careless.CASES))
    parser.add_argument("--setting", action="append", required=True,
                        help="NAME=PARAMETERS, e.g. \"heads=image_layers=0\"; the first is the reference")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=50, help="steps per setting per round (one compiled chunk)")
    parser.add_argument("--benchmark-network", action="store_true",
                        help="give every setting the quality benchmark's network (careless's 20 x 10, "
                             "compare_careless.NETWORK) instead of skmerge's own (its depth by kind of data)")
    args = parser.parse_args(argv)
    settings = [tuple(s.split("=", 1)) if "=" in s else (s, "") for s in args.setting]

    import skmerge
    from skmerge._tf import tf, without_graph_rewrites

    case = compare_careless.CASES[args.dataset]
    X = skmerge.read_unmerged([str(f) for f in case.files], anomalous=case.anomalous,
                              intensity_key=case.intensity_key, sigma_key=case.sigma_key)
    trainers = _trainers(X, case, settings, build_steps=args.steps, benchmark_network=args.benchmark_network)
    n_steps = tf.constant(args.steps)
    ms = {name: [] for name, _ in settings}
    for _ in range(args.rounds):
        for name, trainer in trainers.items():
            start = time.perf_counter()
            # As Trainer.run calls it: with graph rewrites on, the step would be built again.
            with without_graph_rewrites():
                trainer._chunk(n_steps)[0].numpy()
            ms[name].append((time.perf_counter() - start) / args.steps * 1e3)
    reference = np.array(ms[settings[0][0]])
    print(f"{args.dataset}, {len(X):,} observations, {args.rounds} rounds of {args.steps} steps (skmerge {skmerge.__file__})")
    print("| setting | ms/step (median) | per round | ratio to the first (median of rounds) |")
    print("|---|---:|---|---:|")
    for name, times in ms.items():
        times = np.array(times)
        rounds = " ".join(f"{t:.1f}" for t in times)
        print(f"| {name} | {np.median(times):.1f} | {rounds} | {np.median(times / reference):.3f} |")


if __name__ == "__main__":
    main()
