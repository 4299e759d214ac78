"""
Merge serial stills
===================

In serial crystallography every image is a still of a new crystal (or a new part of
one) in a random orientation. A still records only the reflections close to the Ewald
sphere, and only a fraction of each — a fraction set by how far the reflection lies from
the sphere, which the integration program reports (CrystFEL's excitation error, the
``ewald_offset`` column of the shared thermolysin data). Every image has its own scale,
and no reflection is measured on enough images of one crystal to scale it the way a
rotation series is scaled.

The merger needs no special mode for stills: give the scale model the metadata that
carries the partiality, and keep the default error model (stills' σ leave out the
error of the partiality, so they need refining).

Simulated stills
----------------
:func:`~skmerge.datasets.make_unmerged` has no monochromatic-stills mode, so this example
simulates stills in a narrow band of wavelengths (±2 %, a "pink" beam; ``laue=True``).
Each reflection diffracts at the wavelength at which it meets the Ewald sphere, and the
source spectrum scales its intensity with that wavelength — the same role the excitation
error plays for monochromatic stills. The band is too narrow for harmonics to overlap,
so every spot is one reflection. With real data, read the stills instead, e.g.
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

X, truth = make_unmerged(n_images=100, laue=True, oscillation=7.3, wavelength_range=(0.98, 1.02), random_state=0)
per_image = X.groupby("image_id").size()
multiplicity = X.groupby("asu_index").size()
print(f"{len(X)} observations on {len(per_image)} stills ({per_image.mean():.0f} per still); "
      f"{len(multiplicity)} reflections, each seen {multiplicity.mean():.1f} times on average")

# %%
# Three merges
# ------------
# The inverse-variance mean (:func:`skmerge.merge_inverse_variance`) does no scaling at
# all. The merger learns a scale per observation, first from the resolution and the
# detector position only, then with the partiality's proxy (the wavelength) as well.


def cc_with_truth(merged):
    both = merged[["I"]].join(truth.merged[["I"]], rsuffix="_true").dropna()
    return np.corrcoef(both["I"], both["I_true"])[0, 1]


settings = dict(mlp_layers=4, max_iter=500, random_state=0)
without_partiality = skmerge.VariationalMerger(metadata=["dHKL", "XDET", "YDET"], **settings).fit(X)
with_partiality = skmerge.VariationalMerger(metadata=["dHKL", "XDET", "YDET", "Wavelength"], **settings).fit(X)

scores = {
    "inverse-variance mean": cc_with_truth(skmerge.merge_inverse_variance(X)),
    "scaled: dHKL, XDET, YDET": cc_with_truth(without_partiality.transform(X)),
    "scaled: + Wavelength": cc_with_truth(with_partiality.transform(X)),
}
for name, cc in scores.items():
    print(f"{name:26s} CC(I, I true) = {cc:.3f}")
print(f"error model: SdFac {with_partiality.sdfac_:.2f}, SdAdd {with_partiality.sdadd_:.3f}; "
      f"Student-t degrees of freedom {with_partiality.likelihood_dof_:.1f}")

# %%
plt.figure(figsize=(6, 3))
plt.barh(list(scores), list(scores.values()))
plt.xlim(min(scores.values()) - 0.05, 1)
plt.xlabel("CC(I merged, I true)")
plt.tight_layout()

# %%
# The learned scale against wavelength
# ------------------------------------
# The predictions of a merger, divided by the merged intensity of each observation's
# reflection, are its scales; against the wavelength they trace the source spectrum the
# simulation used (up to the overall scale, which is arbitrary).
merged = with_partiality.transform(X)
predicted_scale = with_partiality.predict(X) / merged["I"].reindex(X.set_index(["H", "K", "L"]).index).to_numpy()
plt.figure(figsize=(5, 3.5))
plt.scatter(X["Wavelength"], truth.scale / np.median(truth.scale), s=1, alpha=0.2, label="true")
plt.scatter(X["Wavelength"], predicted_scale / np.median(predicted_scale), s=1, alpha=0.2, label="learned")
plt.xlabel("wavelength (Å)")
plt.ylabel("scale / median")
plt.legend(markerscale=8)
plt.tight_layout()

# %%
# Large serial data sets hold tens of thousands of stills; ``batch_size=32`` trains on
# random batches of 32 whole images per step, so the cost of a step and its memory no
# longer grow with the data.
