"""
Merge Laue data: harmonic deconvolution
=======================================

In a polychromatic (Laue) experiment the crystal is held still in a beam that spans a
band of wavelengths. Reflections h, 2h, 3h, … diffract in the same direction at λ, λ/2,
λ/3, …, so when more than one of them lies inside the band they land on one spot, whose
intensity is their sum. ``VariationalMerger(laue=True)`` expands every spot into its
harmonics (:func:`skmerge.laue.expand_harmonics`) and fits the sum of their predicted
intensities, so the amplitudes of reflections that are only ever seen overlapped are
recovered too. The scale model sees the wavelength, which lets it learn the source
spectrum.

On the command line this is ``skmerge poly`` (careless's ``poly``); the real
photoactive-yellow-protein Laue data in the shared data folder merge the same way.
"""

# %%
# Simulated Laue images
# ---------------------
# Six still images, the crystal turned by 10° between them, in a 0.9–1.9 Å band. Each row
# of ``X`` is a spot, indexed by its lowest harmonic; ``truth.harmonics`` lists every
# harmonic of every spot.
import warnings

import matplotlib.pyplot as plt
import numpy as np
from sklearn.exceptions import ConvergenceWarning

import skmerge
from skmerge.datasets import make_unmerged
from skmerge.laue import expand_harmonics

# The fits below take few steps on purpose, to keep the example quick.
warnings.filterwarnings("ignore", category=ConvergenceWarning)

BAND = (0.9, 1.9)
X, truth = make_unmerged(n_images=6, laue=True, oscillation=10.0, wavelength_range=BAND, random_state=5)
rows = expand_harmonics(X, wavelength_range=BAND, dmin=2.0)
harmonics_per_spot = rows.groupby("spot_id").size()
print(f"{len(X)} spots; {(harmonics_per_spot > 1).mean():.1%} of them hold more than one harmonic")
rows[["Hobs", "Kobs", "Lobs", "harmonic", "Wavelength", "spot_id", "Iobs"]].head()

# %%
# The reflections that are only ever recorded in overlapped spots carry no intensity of
# their own: a merge that ignores the harmonics cannot know them.
size = truth.harmonics.groupby("spot")["n"].transform("size")
in_multiplets = set(map(tuple, truth.harmonics[size > 1][["H", "K", "L"]].to_numpy()))
single = set(map(tuple, truth.harmonics[size == 1][["H", "K", "L"]].to_numpy()))
hidden = in_multiplets - single
print(f"{len(hidden)} reflections are only seen overlapped with others")

# %%
# Merge with and without the harmonic expansion
# ---------------------------------------------
settings = dict(metadata=["dHKL", "Wavelength", "XDET", "YDET"], mlp_layers=4, max_iter=400, random_state=0)
laue = skmerge.VariationalMerger(laue=True, wavelength_range=BAND, **settings).fit(X)
naive = skmerge.VariationalMerger(**settings).fit(X)


def compare(merger):
    """Merged and true F of every merged reflection, and which are hidden in multiplets."""
    merged = merger.transform(X)
    both = merged[["F"]].join(truth.merged[["F"]], rsuffix="_true").dropna()
    both["hidden"] = [hkl in hidden for hkl in both.index]
    return both


for name, merger in (("harmonics expanded", laue), ("spots as single reflections", naive)):
    both = compare(merger)
    hid = both[both["hidden"]]
    print(f"{name}: CC(F) all {np.corrcoef(both['F'], both['F_true'])[0, 1]:.3f}, "
          f"hidden in multiplets {np.corrcoef(hid['F'], hid['F_true'])[0, 1]:.3f}")

# %%
both = compare(laue)
plt.figure(figsize=(5, 4))
plt.scatter(both["F_true"], both["F"], s=2, alpha=0.3, label="seen alone at least once")
hid = both[both["hidden"]]
plt.scatter(hid["F_true"], hid["F"], s=6, color="C3", label="only seen overlapped")
plt.xlabel("true F")
plt.ylabel("merged F (laue=True)")
plt.legend()
plt.tight_layout()

# %%
# Predictions are per spot
# ------------------------
# ``predict`` and ``score`` of a Laue merger take the spots and sum over each spot's
# harmonics, so the predicted intensity is comparable with the measured one.
prediction = laue.predict(X)
print(f"{len(prediction)} predicted spot intensities; CC with the measured: "
      f"{np.corrcoef(prediction, X['Iobs'])[0, 1]:.3f}")
