"""
Choose the likelihood by image-grouped cross-validation
=======================================================

Which error law fits the data better — normal or Student-t — is a question for
the data, not for the crystallographer: fit each candidate on some images, and score how
well it predicts the observations of the images it has not seen. The folds must hold out
whole images (:class:`~skmerge.model_selection.ImageKFold`), since the observations of
one image share its scale. The score, :data:`skmerge.metrics.heldout_loglik`, is the mean
log predictive density per held-out observation: higher is better, and a likelihood that
is too narrow for the outliers pays for them.

``examples/choose_dof_hypf.py`` in the repository runs the same search on the real HypF
data, over the Student-t degrees of freedom.
"""

# %%
# Data with outliers
# ------------------
# 3 % of the simulated observations are replaced by gross outliers (zingers, shadowed
# spots).
import warnings

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import GridSearchCV, GroupKFold

import skmerge
from skmerge.datasets import make_unmerged
from skmerge.metrics import ccpred, heldout_loglik
from skmerge.model_selection import ImageKFold, image_groups

# The fits below take few steps on purpose, to keep the example quick.
warnings.filterwarnings("ignore", category=ConvergenceWarning)

X, truth = make_unmerged(n_images=24, outlier_fraction=0.03, random_state=1)
print(f"{len(X)} observations on {X['image_id'].nunique()} images, {truth.outlier.sum()} outliers")

# %%
# The folds
# ---------
# Images are dealt to the folds in turn, so every fold samples the whole rotation. A
# held-out image has no scale offset of its own, so the scale model uses the image number
# (``BATCH``) instead of per-image offsets (``image_scales=False``).
cv = ImageKFold(n_splits=3)
for fold, (train, test) in enumerate(cv.split(X)):
    print(f"fold {fold}: test images {np.unique(X['image_id'].to_numpy()[test]).tolist()}")

# %%
# scikit-learn's ``GroupKFold`` gives the same guarantee when told the image of every
# row; no image is split between its training and test rows:
groups = image_groups(X)
for train, test in GroupKFold(n_splits=3).split(X, groups=groups):
    assert not set(groups[train]) & set(groups[test])

# %%
# The search
# ----------
merger = skmerge.VariationalMerger(
    metadata=["dHKL", "XDET", "YDET", "BATCH"], image_scales=False, mlp_layers=2, max_iter=100, random_state=0
)
candidates = [skmerge.NormalLikelihood(), skmerge.StudentTLikelihood(dof=4.0)]
search = GridSearchCV(
    merger, {"likelihood": candidates}, cv=cv,
    scoring={"loglik": heldout_loglik, "ccpred": ccpred}, refit="loglik",
)
search.fit(X)

results = pd.DataFrame({
    "likelihood": [repr(params["likelihood"]) for params in search.cv_results_["params"]],
    "held-out log-likelihood": search.cv_results_["mean_test_loglik"],
    "sd": search.cv_results_["std_test_loglik"],
    "CCpred": search.cv_results_["mean_test_ccpred"],
}).set_index("likelihood")
print(f"best: {search.best_params_['likelihood']!r}")
results

# %%
plt.figure(figsize=(6, 3.5))
plt.barh(results.index, results["held-out log-likelihood"], xerr=results["sd"])
plt.xlabel("mean held-out log-likelihood per observation")
plt.tight_layout()

# %%
# The refitted best model
# -----------------------
# ``GridSearchCV`` refits the winner on every image; it merges like any merger.
best = search.best_estimator_
merged = best.transform(X)
both = merged[["F"]].join(truth.merged[["F"]], rsuffix="_true").dropna()
print(f"CC(F, F true) of the chosen model: {np.corrcoef(both['F'], both['F_true'])[0, 1]:.3f}")
