"""Linear-response covariances of prior-coupled amplitudes, and what they do to the
merged table's σ: against dense matrix inverses, against the Gaussian case in closed form,
and on simulated data with known truth."""

import numpy as np
import pytest

from skmerge import DoubleWilsonPrior, VariationalMerger
from skmerge.datasets import make_unmerged
from skmerge.merged import combine_friedel
from skmerge.model.linear_response import FamilyCovariance


def _dense_precision(variance, parent, coupling):
    precision = np.diag(1 / variance)
    for child in np.flatnonzero(parent >= 0):
        precision[child, parent[child]] = precision[parent[child], child] = -coupling[child]
    return precision


def test_family_covariance_is_the_inverse_of_each_familys_precision():
    rng = np.random.default_rng(0)
    # Roots alone, a pair, a chain of three, a star of four (a time series), and again.
    parent = np.array([-1, -1, 1, -1, 3, 4, -1, 6, 6, 6, -1, 10, -1])
    variance = rng.uniform(0.5, 2.0, len(parent))
    coupling = rng.uniform(0.0, 0.3, len(parent))
    covariance = FamilyCovariance(variance, parent, coupling)
    expected = np.linalg.inv(_dense_precision(variance, parent, coupling))
    rows, cols = (a.ravel() for a in np.meshgrid(np.arange(len(parent)), np.arange(len(parent))))
    np.testing.assert_allclose(covariance.variance, np.diag(expected), rtol=1e-12)
    np.testing.assert_allclose(covariance.covariance(rows, cols).reshape(expected.shape), expected, atol=1e-12)
    assert covariance.variance[0] == variance[0]  # a root without children keeps its variance


def test_a_tied_pairs_mean_and_difference_get_the_gaussian_answer():
    # Two halves each measured with precision L, tied by a prior of curvature c: mean-field
    # gives each half variance 1/(L + c); the truth is Var(mean) = 1/(2L), Var(diff) = 2/(L + 2c).
    L, c = 4.0, 100.0
    covariance = FamilyCovariance(np.array([1 / (L + c)] * 2), np.array([-1, 0]), np.array([0.0, c]))
    v = covariance.variance
    rho = covariance.covariance([0], [1])[0] / np.sqrt(v[0] * v[1])
    sigma = np.sqrt(v)
    out = combine_friedel({"F(+)": np.array([10.0]), "F(-)": np.array([10.0]), "SIGF(+)": sigma[:1],
                           "SIGF(-)": sigma[1:]}, centric=np.array([False]), correlation=np.array([rho]))
    assert out["SIGF"][0] ** 2 == pytest.approx(1 / (2 * L))
    assert out["SIGDANO"][0] ** 2 == pytest.approx(2 / (L + 2 * c))


def test_families_whose_precision_is_not_definite_keep_their_mean_field_variances():
    # A star whose couplings each pass the pairwise bound but together exceed the diagonal.
    parent = np.array([-1, 0, 0, 0, 0])
    variance = np.ones(5)
    covariance = FamilyCovariance(variance, parent, np.full(5, 0.9))
    np.testing.assert_array_equal(covariance.variance, variance)
    assert covariance.covariance([0], [1])[0] == 0.0


def test_combine_friedel_without_correlation_treats_halves_as_independent():
    halves = {"F(+)": np.array([4.0, 3.0]), "F(-)": np.array([2.0, np.nan]), "SIGF(+)": np.array([3.0, 1.0]),
              "SIGF(-)": np.array([4.0, np.nan])}
    out = combine_friedel(halves, centric=np.array([False, False]))
    np.testing.assert_allclose(out["SIGF"], [2.5, 1.0])
    np.testing.assert_allclose(out["SIGDANO"][:1], [5.0])
    # A correlation only matters where both halves are measured.
    tied = combine_friedel(halves, centric=np.array([False, False]), correlation=np.array([0.5, 0.5]))
    np.testing.assert_allclose(tied["SIGF"], [np.sqrt(9 + 16 + 12) / 2, 1.0])
    np.testing.assert_allclose(tied["SIGDANO"][:1], [np.sqrt(9 + 16 - 12)])


def _z(merged, truth, column):
    """(X − k·e^(−B·s/4)·X_true)/SIGX with a scale k and B fitted between the merge's F and
    the truth's (least squares of log F), as between a merge and a reference."""
    joined = merged.join(truth[list(dict.fromkeys(["F", "dHKL", column]))], rsuffix="_true", how="inner")
    s = 1 / joined["dHKL"].to_numpy(float) ** 2
    f, f_true = joined["F"].to_numpy(float), joined["F_true"].to_numpy(float)
    ok = (f > 0) & (f_true > 0)
    (log_k, b), *_ = np.linalg.lstsq(np.stack([np.ones(ok.sum()), -s[ok] / 4], 1), np.log(f[ok] / f_true[ok]),
                                     rcond=None)
    value, true = joined[column].to_numpy(float), joined[column + "_true"].to_numpy(float)
    return (value - np.exp(log_k - b * s / 4) * true) / joined["SIG" + column].to_numpy(float)


@pytest.mark.parametrize("marginals", ["variational", "grid"])
def test_tied_friedel_pairs_get_calibrated_sigf_and_sigdano(marginals):
    # variational: the linear-response covariance; grid: the pair's exact marginals.
    X, truth = make_unmerged(n_images=60, anomalous=True, anomalous_signal=0.05, random_state=3)
    merger = VariationalMerger(anomalous=True, prior=DoubleWilsonPrior(), likelihood="normal", error_model=None,
                               mlp_layers=4, max_iter=800, random_state=0, marginals=marginals).fit(X)
    merged = merger.transform(X)
    strong = merged["F"] / merged["SIGF"] > 5
    z_f = _z(merged[strong], truth.merged, "F")
    both = (merged["N(+)"] > 0) & (merged["N(-)"] > 0) & merged["DANO"].notna()
    z_dano = _z(merged[both], truth.merged, "DANO")
    robust = {name: 1.4826 * np.median(np.abs(z - np.median(z))) for name, z in (("F", z_f), ("DANO", z_dano))}
    assert 0.85 < robust["F"] < 1.2, robust
    assert 0.85 < robust["DANO"] < 1.15, robust
