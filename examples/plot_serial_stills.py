"""
Merge serial stills, indexed in two settings
============================================

In serial crystallography every image is a still of a new crystal (or a new part of
one) in a random orientation. A still records only the reflections close to the Ewald
sphere, and only a fraction of each — a fraction set by how far the reflection lies from
the sphere, which the integration program reports (CrystFEL's excitation error, the
``ewald_offset`` column of the shared thermolysin data). Every image has its own scale.

When the lattice has more symmetry than the space group — here P 6₃, whose hexagonal
lattice also has the twin law −h−k, k, −l — each still is indexed in one of two
equivalent settings at random, and merged as they come the images mix the intensities
of two structures. The merger resolves that by default (``reindexing="auto"``): it
finds each image's setting from the agreement of the images' intensities, checks it
with the fitted model, and merges every image in one setting.

:func:`~skmerge.datasets.make_unmerged` simulates such stills (``stills=True``) with
40 % of the images reindexed by the twin law (``reindexed_fraction=0.4``), and returns
the operator each image got. With real data, read the stills instead, e.g.
``skmerge.read_unmerged("thermolysin_xfel/unmerged_n395.mtz")`` with the metadata
``["dHKL", "xobs", "yobs", "ewald_offset"]``.
"""

# %%
import warnings

import matplotlib.pyplot as plt
import numpy as np
from sklearn.exceptions import ConvergenceWarning

import skmerge
from skmerge.datasets import make_unmerged

# The fits below take few steps on purpose, to keep the example quick.
warnings.filterwarnings("ignore", category=ConvergenceWarning)

X, truth = make_unmerged(n_images=100, stills=True, mosaicity=0.0004, dmin=2.5, spacegroup="P 63",
                         cell=(60, 60, 90, 90, 90, 120), reindexed_fraction=0.4, random_state=0)
per_image = X.groupby("image_id").size()
print(f"{len(X)} observations on {len(per_image)} stills ({per_image.mean():.0f} per still); "
      f"{(truth.image_operator != 'h,k,l').sum()} stills indexed in the other setting")

# %%
# Two merges
# ----------
# The same estimator, once with the ambiguity left alone and once resolved (the
# default). The scale model sees the resolution, the detector position and the
# excitation error, which carries the partiality.


def cc_with_truth(merged):
    both = merged[["F"]].join(truth.merged[["F"]], rsuffix="_true").dropna()
    return np.corrcoef(both["F"], both["F_true"])[0, 1]


settings = dict(metadata=["dHKL", "XDET", "YDET", "EWALD_OFFSET"], mlp_layers=4, max_iter=300, random_state=0)
as_indexed = skmerge.VariationalMerger(reindexing="none", **settings).fit(X)
resolved = skmerge.VariationalMerger(**settings).fit(X)

scores = {"as indexed": cc_with_truth(as_indexed.transform(X)), "resolved": cc_with_truth(resolved.transform(X))}
for name, cc in scores.items():
    print(f"{name:11s} CC(F, F true) = {cc:.3f}")

# %%
# Each image's setting
# --------------------
# ``image_reindexing()`` lists, per image, the operator that brought it into the merge's
# setting and its posterior probability under the fitted model. The merge takes the
# setting of most images, so the operators found equal the simulator's up to one global
# operator.
table = resolved.image_reindexing()
print(table.head())
right = (table["operator"].to_numpy() != "h,k,l") == (truth.image_operator != "h,k,l")
print(f"images in the right setting: {max(right.mean(), 1 - right.mean()):.1%}; "
      f"least probable choice {table['probability'].min():.3f}")

# %%
plt.figure(figsize=(6, 3))
plt.barh(list(scores), list(scores.values()))
plt.xlim(0, 1)
plt.xlabel("CC(F merged, F true)")
plt.tight_layout()

# %%
# The learned scale against the excitation error
# ----------------------------------------------
# The predicted scale of each observation, against its distance from the Ewald sphere,
# traces the partiality the simulation used (up to the overall scale, which is
# arbitrary).
_, _, scale, _ = resolved.predict(X, return_std=True, return_scale=True)
plt.figure(figsize=(5, 3.5))
plt.scatter(X["EWALD_OFFSET"], truth.scale / np.median(truth.scale), s=1, alpha=0.2, label="true")
plt.scatter(X["EWALD_OFFSET"], scale / np.median(scale), s=1, alpha=0.2, label="learned")
plt.xlabel("excitation error (Å⁻¹)")
plt.ylabel("scale / median")
plt.legend(markerscale=8)
plt.tight_layout()

# %%
# Large serial data sets hold tens of thousands of stills; ``batch_size=32`` trains on
# random batches of 32 whole images per step, so the cost of a step and its memory no
# longer grow with the data.
