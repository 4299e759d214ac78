"""
Merge a rotation data set
=========================

A simulated rotation experiment (:func:`skmerge.datasets.make_unmerged`: 60 images of an
orthorhombic crystal, scales that vary with rotation, exposure and detector position) is
merged with :class:`~skmerge.VariationalMerger`. Because the data are simulated, the
merged amplitudes can be compared with the true ones; on real data the half-dataset
correlation CC1/2 (:func:`skmerge.merging_statistics`) is the measure.
"""

# %%
# Simulate the data
# -----------------
# ``X`` has one row per observation, as :func:`skmerge.read_unmerged` builds it from a
# reflection file; ``truth`` holds what a merge should recover.
import matplotlib.pyplot as plt
import numpy as np

import skmerge
from skmerge.datasets import make_unmerged

X, truth = make_unmerged(n_images=60, random_state=0)
print(f"{len(X)} observations of {X['asu_index'].nunique()} reflections on {X['image_id'].nunique()} images")
X[["Iobs", "SIGIobs", "dHKL", "BATCH", "XDET", "YDET"]].head()

# %%
# Fit the merger
# --------------
# The metadata columns drive the scale model: resolution, detector position and image
# number, as careless's ``METADATA_KEYS``. A small network and few steps keep this
# example quick; real merges use the defaults (``mlp_layers=20``, ``max_iter=2000``).
merger = skmerge.VariationalMerger(
    metadata=["dHKL", "XDET", "YDET", "BATCH"], mlp_layers=4, max_iter=400, random_state=0
)
merger.fit(X)
merged = merger.transform(X)
merged.head()

# %%
# Compare with the truth
# ----------------------
# The merged amplitudes are on an arbitrary overall scale, so the correlation with the
# true F is the measure of quality.
both = merged[["F", "SIGF"]].join(truth.merged[["F", "dHKL"]], rsuffix="_true").dropna()
cc = np.corrcoef(both["F"], both["F_true"])[0, 1]
print(f"CC(F, F true) = {cc:.3f} over {len(both)} reflections")

fig, (left, right) = plt.subplots(1, 2, figsize=(9, 4))
left.scatter(both["F_true"], both["F"], s=2, alpha=0.4)
left.set(xlabel="true F", ylabel="merged F", title=f"CC = {cc:.3f}")
right.plot(merger.loss_curve_[:, 0])
right.set(xlabel="step", ylabel="loss (−ELBO per observation)", title="training")
fig.tight_layout()

# %%
# Merging statistics
# ------------------
# Half-dataset merges refit the amplitudes on random halves of the images with the
# scale model frozen; their correlation per resolution shell is CC1/2.
halves = skmerge.half_dataset_merges(merger, X, random_state=0)
statistics = skmerge.merging_statistics(merged, halves, shells=6)
print(statistics)

# %%
shells = statistics.table.drop(index="overall")
plt.figure(figsize=(5, 3.5))
plt.plot(shells["d_min"], shells["cc_half"], "o-")
plt.gca().invert_xaxis()
plt.xlabel("resolution (Å)")
plt.ylabel("CC1/2")
plt.tight_layout()
