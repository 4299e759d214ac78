"""
Save, load and transfer a fitted merger
=======================================

A fitted :class:`~skmerge.VariationalMerger` is saved in one of two ways:

- ``merger.save("merger.npz")``: the safe format — weights and parameters as arrays and
  JSON in one file, with the skmerge version and a SHA-256 checksum.
  ``VariationalMerger.load`` reads it without pickle, so loading runs no code from the
  file, and a damaged file raises :class:`~skmerge.DamagedFileError`. This is the
  format to share.
- ``joblib.dump(merger, "merger.joblib")``, as for any scikit-learn estimator (the
  command line writes ``OUT.joblib``). A joblib file is a pickle: loading it executes
  code from the file, so load joblib files only from a source you trust.

:func:`skmerge.load` reads either. A loaded merger predicts exactly as the saved one,
and can be refitted from where it stopped (``warm_start``), which transfers what it
learned — here its scale model — to a new merge.
"""

# %%
# Fit and save
# ------------
import shutil
import tempfile
import warnings
from pathlib import Path

import joblib
import matplotlib.pyplot as plt
import numpy as np
from sklearn.exceptions import ConvergenceWarning

import skmerge
from skmerge.datasets import make_unmerged

# The fits below take few steps on purpose, to keep the example quick.
warnings.filterwarnings("ignore", category=ConvergenceWarning)

folder = Path(tempfile.mkdtemp())
X, truth = make_unmerged(n_images=40, anomalous=True, anomalous_signal=0.1, random_state=3)
merger = skmerge.VariationalMerger(metadata=["dHKL", "XDET", "YDET", "BATCH"], mlp_layers=4, max_iter=400,
                                   random_state=0).fit(X)

safe = merger.save(folder / "merger.npz")
joblib.dump(merger, folder / "merger.joblib")
for path in sorted(folder.iterdir()):
    print(f"{path.name}: {path.stat().st_size / 1e6:.2f} MB")

# %%
# Load
# ----
# Both files give back a merger that predicts exactly as the one in memory.
from_npz = skmerge.VariationalMerger.load(safe)
from_joblib = skmerge.load(folder / "merger.joblib")
expected = merger.predict(X)
for name, loaded in (("merger.npz", from_npz), ("merger.joblib", from_joblib)):
    print(f"{name}: same predictions as the merger in memory: {np.array_equal(loaded.predict(X), expected)}")

# %%
# A damaged file is reported, not half-read:
damaged = folder / "damaged.npz"
damaged.write_bytes(safe.read_bytes()[: len(safe.read_bytes()) // 2])
try:
    skmerge.load(damaged)
except skmerge.DamagedFileError as error:
    print(f"DamagedFileError: {error}")

# %%
# Transfer the scales
# -------------------
# careless's recipe for anomalous data: learn the scales with the Friedel mates merged
# together (above), then merge the mates apart under those frozen scales. The loaded
# merger is refitted with ``warm_start="scales"`` (keep the scale model, start the
# amplitudes afresh) and ``freeze="scales"`` (keep the scale model fixed).
transferred = from_npz.set_params(anomalous=True, warm_start="scales", freeze="scales").fit(X)
merged = transferred.transform(X)
both = merged[["DANO", "SIGDANO"]].join(truth.merged[["DANO"]], rsuffix="_true").dropna()
cc = np.corrcoef(both["DANO"], both["DANO_true"])[0, 1]
print(f"anomalous differences of {len(both)} acentric reflections: CC(DANO, DANO true) = {cc:.3f}")

# %%
plt.figure(figsize=(5, 4))
plt.scatter(both["DANO_true"], both["DANO"], s=2, alpha=0.4)
plt.xlabel("true DANO")
plt.ylabel("merged DANO (scales transferred)")
plt.title(f"CC = {cc:.3f}")
plt.tight_layout()

# %%
shutil.rmtree(folder)
