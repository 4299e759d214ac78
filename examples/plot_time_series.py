"""
A time series with related-data-set priors
==========================================

In a time-resolved experiment the same crystal is measured in a dark state and at time
points after a trigger; most structure factors barely change. Merging every time point
on its own (each with Wilson's prior) ignores that, and the noise of two independent
merges swamps the small differences. The double-Wilson prior
(:class:`~skmerge.DoubleWilsonPrior`) draws each child data set's amplitudes around
``r`` times its parent's, with the correlation ``r`` learned from the data, so the
merges are tied where the data agree and free where they differ.

With ``separate_files=True`` the data sets share one scale model and are merged
separately; ``parents=[None, 0]`` makes file 1 (the time point) the child of file 0 (dark).
On the command line this is careless's
``--separate-files --double-wilson-parents None,0``.
"""

# %%
# Two simulated states of one crystal
# -----------------------------------
# ``make_unmerged(time_points=2)`` repeats the experiment on a second state in which
# every structure factor has changed by a random amount, of root-mean-square size 0.3 of
# its expected size. ``truth.merged`` holds both states, and ``DF`` = F(time point) − F(dark).
import warnings

import matplotlib.pyplot as plt
import numpy as np
from sklearn.exceptions import ConvergenceWarning

import skmerge
from skmerge.datasets import make_unmerged

# The fits below take few steps on purpose, to keep the example quick.
warnings.filterwarnings("ignore", category=ConvergenceWarning)

X, truth = make_unmerged(n_images=16, time_points=2, outlier_fraction=0.01, random_state=1)
print(X.groupby("file_id").size().rename("observations"))
true_change = truth.merged.reset_index().query("file_id == 1")[["H", "K", "L", "DF"]]


def merged_difference(merger):
    """F(time point) − F(dark) of every reflection merged in both files, with the truth."""
    merged = merger.transform(X).reset_index()
    dark, light = merged[merged.file_id == 0], merged[merged.file_id == 1]
    pairs = dark.merge(light, on=["H", "K", "L"], suffixes=("_dark", "_light")).merge(true_change, on=["H", "K", "L"])
    pairs["DF_merged"] = pairs["F_light"] - pairs["F_dark"]
    return pairs


# %%
# Independent merges and tied merges
# ----------------------------------
# Both fits share every setting but the prior.
settings = dict(separate_files=True, metadata=["dHKL", "XDET", "YDET", "BATCH"], mlp_layers=4, max_iter=300,
                random_state=0)
independent = skmerge.VariationalMerger(prior="wilson", **settings).fit(X)
tied = skmerge.VariationalMerger(prior=skmerge.DoubleWilsonPrior(parents=[None, 0]), **settings).fit(X)

results = {}
for name, merger in (("Wilson (independent)", independent), ("double-Wilson (tied)", tied)):
    pairs = merged_difference(merger)
    results[name] = pairs
    print(f"{name}: CC(ΔF merged, ΔF true) = {np.corrcoef(pairs['DF_merged'], pairs['DF'])[0, 1]:.3f}")
print(f"learned correlation of the time point with the dark state: r = {np.ravel(tied.prior_r_)[-1]:.3f}")

# %%
fig, axes = plt.subplots(1, 2, figsize=(9, 4), sharex=True, sharey=True)
for axis, (name, pairs) in zip(axes, results.items()):
    cc = np.corrcoef(pairs["DF_merged"], pairs["DF"])[0, 1]
    axis.scatter(pairs["DF"], pairs["DF_merged"], s=2, alpha=0.4)
    axis.set(title=f"{name}\nCC = {cc:.3f}", xlabel="true ΔF")
axes[0].set_ylabel("merged ΔF")
fig.tight_layout()

# %%
# The same merge as the command line runs it
# ------------------------------------------
# :func:`skmerge.run_merge` adds half-dataset merges and the statistics; for a child data
# set they include CCdiff1/2, the half-dataset correlation of ΔF, which measures the
# difference signal on real data, where the truth is unknown.
result = skmerge.run_merge(
    X, prior=skmerge.DoubleWilsonPrior(parents=[None, 0]), half_datasets=1, log=lambda level, message: None,
    **settings,
)
print(result.statistics[1])
