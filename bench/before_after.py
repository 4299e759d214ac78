"""skmerge against an earlier skmerge: the same runs from two checkouts, side by side.

A change that should not alter behaviour (a refactor) is checked here on the real data
sets of ``compare_careless.py`` (hypf, thermolysin, PYP) with the defaults — skmerge's
own scale network too, not the 20 × 10 that ``compare_careless.py`` matches to careless,
so that a change of the defaults is measured:

- **quality**: ``skmerge mono|poly --merge-half-datasets`` with the benchmark's flags, run
  from each checkout (``python -P -m skmerge`` with the checkout on ``PYTHONPATH``;
  ``-P`` keeps the working directory's skmerge out);
  overall half-dataset CC1/2 and CCanom from the ``_xval_`` files (the one function
  ``compare_careless.py`` uses), and the correlation and largest relative difference of
  the merged F between the two checkouts.
- **time per step**: ``compare_careless.py``'s API runner with exactly n1 and n2 steps
  from each checkout, alternating checkouts so that a drift of the machine hits both;
  (t2 − t1) / (n2 − n1).

Usage::

    python bench/before_after.py --before /path/to/old/checkout          # both, all data sets
    python bench/before_after.py --before ../baseline --only quality --datasets hypf

Results go to ``bench/out/before_after/`` (one folder per checkout and data set) and a
table is printed. Runs already made are reused with ``--reuse``.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _careless  # noqa: E402
import compare_careless  # noqa: E402

OUT = HERE / "out" / "before_after"


def _environment(checkout):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(checkout) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(command, directory, checkout, args):
    directory.mkdir(parents=True, exist_ok=True)
    stored = directory / "measurement.json"
    if args.reuse and stored.exists():
        data = json.loads(stored.read_text())
        if data.get("command") == command and data.get("returncode") == 0:
            return data
    for path in directory.iterdir():
        if path.name != "spec.json":  # the input of the timing runner
            path.unlink()
    quiet = _careless.wait_until_quiet(max_wait=args.max_wait, log=print)
    with open(directory / "run.log", "w") as handle:
        result = _careless.run_measured(command, handle, env=_environment(checkout))
    result.update(command=command, before=quiet, checkout=str(checkout))
    stored.write_text(json.dumps(result, indent=1, default=str))
    if result["returncode"] != 0:
        raise SystemExit(f"{' '.join(command)} failed; see {directory / 'run.log'}")
    return result


def quality(case, label, checkout, args):
    tag = "" if not args.tag or label != "after" else f"_{args.tag}"
    directory = OUT / ((label if args.seed == compare_careless.SEED else f"{label}_seed{args.seed}") + tag) / case.name
    prefix = directory / case.name
    command = [sys.executable, "-P", "-m", "skmerge", case.mode, "--disable-progress-bar", "--merge-half-datasets",
               *case.shared_flags(seed=False, network=False), "--seed", str(args.seed)]
    if case.anomalous:
        command.append("--anomalous")
    if label == "after" and args.flags:
        command += [flag.replace("{n-1}", ",".join(["None"] + ["0"] * (len(case.files) - 1)))
                    for flag in args.flags.split()]
    command += [case.keys, *map(str, case.files), str(prefix)]
    result = _run(command, directory, checkout, args)
    n_sets = len(case.files) if case.separate_files else 1
    result["cc"] = [_careless.half_dataset_cc(Path(f"{prefix}_xval_{i}.mtz"), case.anomalous) for i in range(n_sets)]
    result["merged"] = [f"{prefix}_{i}.mtz" for i in range(n_sets)]
    history = Path(f"{prefix}_history.csv").read_text().strip().splitlines()
    result["steps"] = len(history) - 1
    return result


def seconds_per_step(case, label, checkout, args):
    times = []
    extra = args.api_params if label == "after" else args.before_api_params
    for steps in args.timing_steps:
        tag = f"_{args.tag}" if args.tag and label == "after" else ""
        directory = OUT / (label + tag) / f"{case.name}_timing_{steps}"
        directory.mkdir(parents=True, exist_ok=True)
        spec = {"files": [str(f) for f in case.files], "keys": case.keys, "anomalous": case.anomalous,
                "intensity_key": case.intensity_key, "sigma_key": case.sigma_key, "steps": steps,
                "separate_files": case.separate_files, "mode": case.mode, "wavelength_key": case.wavelength_key,
                "out": str(directory / case.name), "result": str(directory / "child.json"), "batch_size": None,
                "extra": extra, "network": False}
        spec_path = directory / "spec.json"
        command = [sys.executable, "-P", str(HERE / "compare_careless.py"), "--child", str(spec_path)]
        spec_path.write_text(json.dumps(spec, indent=1))
        times.append(_run(command, directory, checkout, args)["wall_time_s"])
    n1, n2 = args.timing_steps
    return (times[1] - times[0]) / (n2 - n1)


def _cc_diff(command):
    """Overall CCdiff1/2 of every child file of a separate-files run (its stats JSON)."""
    prefix = command[-1]
    document = json.loads(Path(f"{prefix}_stats.json").read_text())
    overall = [next(row for row in d["shells"] if row["shell"] == "overall") for d in document["datasets"][1:]]
    return [row.get("cc_diff", float("nan")) for row in overall]


def _f_agreement(before_paths, after_paths):
    import reciprocalspaceship as rs

    ccs, worst = [], 0.0
    for a, b in zip(before_paths, after_paths):
        fa, fb = rs.read_mtz(a)["F"], rs.read_mtz(b)["F"]
        both = fa.index.intersection(fb.index)
        x, y = fa.loc[both].to_numpy(float), fb.loc[both].to_numpy(float)
        ccs.append(float(np.corrcoef(x, y)[0, 1]))
        worst = max(worst, float(np.max(np.abs(x - y) / np.maximum(np.abs(x), 1e-6 * np.abs(x).max()))))
    return ccs, worst


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="checkout of the earlier skmerge")
    parser.add_argument("--after", type=Path, default=HERE.parent, help="checkout of the new skmerge (this one)")
    parser.add_argument("--datasets", default="hypf,thermolysin,pyp")
    parser.add_argument("--only", choices=["quality", "timing"])
    parser.add_argument("--timing-steps", type=int, nargs=2, default=(200, 1200), metavar=("N1", "N2"))
    parser.add_argument("--seed", type=int, default=compare_careless.SEED,
                        help="seed of the quality runs; other seeds measure the run-to-run spread")
    parser.add_argument("--side", choices=["before", "after"], help="run one checkout only (no comparison)")
    parser.add_argument("--flags", default="", help="extra flags of the 'after' quality runs (a variant of the "
                        "defaults); '{n-1}' becomes None,0,… over the data set's files")
    parser.add_argument("--api-params", default="", help="estimator parameters of the 'after' timing runs, "
                        "e.g. \"prior=skmerge.DoubleWilsonPrior()\"")
    parser.add_argument("--before-api-params", default="", help="the same for the 'before' timing runs")
    parser.add_argument("--tag", default="", help="name of the variant (folder suffix of the 'after' runs)")
    parser.add_argument("--reuse", action="store_true")
    parser.add_argument("--max-wait", type=float, default=1800.0)
    args = parser.parse_args(argv)
    checkouts = {"before": args.before.resolve(), "after": args.after.resolve()}
    if args.side:
        checkouts = {args.side: checkouts[args.side]}
    rows = []
    for name in args.datasets.split(","):
        case = compare_careless.CASES[name]
        row = {"data set": name}
        if args.only != "timing":
            runs = {label: quality(case, label, path, args) for label, path in checkouts.items()}
            for label, run in runs.items():
                if case.separate_files and len(run["cc"]) > 1:
                    row[f"CCdiff {label}"] = " / ".join(f"{c:.3f}" for c in _cc_diff(run["command"]))
                row[f"CC1/2 {label}"] = " / ".join(f"{c['cc_half']:.3f}" for c in run["cc"])
                if case.anomalous:
                    row[f"CCanom {label}"] = " / ".join(f"{c['cc_anom']:.3f}" for c in run["cc"])
                row[f"steps {label}"] = run["steps"]
            if len(runs) == 2:
                ccs, worst = _f_agreement(runs["before"]["merged"], runs["after"]["merged"])
                row["CC(F before, after)"] = " / ".join(f"{c:.4f}" for c in ccs)
                row["max |ΔF|/F"] = f"{worst:.3g}"
        if args.only != "quality":
            per_step = {label: seconds_per_step(case, label, path, args) for label, path in checkouts.items()}
            for label, value in per_step.items():
                row[f"s/step {label}"] = f"{value:.4f}"
            if len(per_step) == 2:
                row["ratio"] = f"{per_step['after'] / per_step['before']:.3f}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"before_after_seed{args.seed}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
