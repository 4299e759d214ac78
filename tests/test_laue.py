"""Laue data: harmonic expansion and the spot-sum likelihood, against simulated truth
and an independent computation on the real PYP files."""

from math import gcd

import numpy as np
import pytest

import skmerge
from skmerge import VariationalMerger
from skmerge.datasets import make_unmerged
from skmerge.laue import expand_harmonics
from skmerge.stats import resolution_shells

BAND = (0.9, 1.9)
METADATA = ["dHKL", "Wavelength", "XDET", "YDET"]
# A smaller network than the default keeps these fits quick; the spectrum is smooth.
NETWORK = dict(metadata=METADATA, mlp_layers=6, max_iter=1500, random_state=0)


@pytest.fixture(scope="module")
def crystal():
    settings = dict(n_images=6, laue=True, oscillation=10.0, wavelength_range=BAND, random_state=5)
    overlapped = make_unmerged(**settings)
    resolved = make_unmerged(**settings, resolve_harmonics=True)
    return overlapped, resolved


def test_expansion_reproduces_the_simulated_harmonics(crystal):
    (X, truth), _ = crystal
    rows = expand_harmonics(X, wavelength_range=BAND, dmin=2.0).sort_values(["spot_id", "harmonic"])
    harmonics = truth.harmonics.sort_values(["spot", "n"])
    np.testing.assert_array_equal(rows.groupby("spot_id").size(), harmonics.groupby("spot").size())
    np.testing.assert_array_equal(rows[["H", "K", "L"]].to_numpy(int), harmonics[["H", "K", "L"]].to_numpy(int))
    np.testing.assert_allclose(rows["Wavelength"], harmonics["Wavelength"], rtol=1e-6)
    multiplets = (harmonics.groupby("spot").size() > 1).mean()
    assert 0.01 < multiplets < 0.15


def _cc(merged, truth, hkl=None):
    if hkl is not None:
        merged = merged[merged.index.isin(hkl)]
    true = truth.merged.loc[merged.index]
    shell, _ = resolution_shells(true["dHKL"].to_numpy(), 5)
    f, f_true = merged["F"].to_numpy(float), true["F"].to_numpy(float)
    return np.mean([np.corrcoef(f[shell == i], f_true[shell == i])[0, 1] for i in range(5)])


def test_deconvolution_recovers_what_overlap_hides(crystal):
    (X, truth), (X_resolved, truth_resolved) = crystal
    harmonics = truth.harmonics
    size = harmonics.groupby("spot")["n"].transform("size")
    in_multiplets = set(map(tuple, harmonics[size > 1][["H", "K", "L"]].to_numpy()))
    only_in_multiplets = in_multiplets - set(map(tuple, harmonics[size == 1][["H", "K", "L"]].to_numpy()))
    assert len(only_in_multiplets) > 100

    laue = VariationalMerger(laue=True, wavelength_range=BAND, **NETWORK).fit(X).transform(X)
    resolved = VariationalMerger(**NETWORK).fit(X_resolved).transform(X_resolved)
    naive = VariationalMerger(**NETWORK).fit(X).transform(X)
    print(f"CC laue {_cc(laue, truth):.4f} resolved {_cc(resolved, truth_resolved):.4f} naive {_cc(naive, truth):.4f}; "
          f"only in multiplets: laue {_cc(laue, truth, only_in_multiplets):.4f} naive {_cc(naive, truth, only_in_multiplets):.4f}")

    assert _cc(laue, truth) > _cc(resolved, truth_resolved) - 0.02
    recovered = _cc(laue, truth, only_in_multiplets)
    assert recovered > 0.7
    assert _cc(laue, truth, in_multiplets) > _cc(naive, truth, in_multiplets) + 0.1
    assert recovered > _cc(naive, truth, only_in_multiplets) + 0.2


def test_predictions_and_scores_are_per_spot(crystal):
    (X, _), _ = crystal
    merger = VariationalMerger(laue=True, wavelength_range=BAND, mlp_layers=2, max_iter=100, random_state=0).fit(X)
    assert merger.predict(X).shape == (len(X),)
    assert merger.score_samples(X).shape == (len(X),)
    rows = expand_harmonics(X, wavelength_range=BAND, dmin=2.0)
    np.testing.assert_allclose(merger.predict(rows), merger.predict(X), rtol=1e-5)
    assert np.corrcoef(merger.predict(X), X["Iobs"])[0, 1] > 0.8


def test_laue_needs_a_wavelength_column(crystal):
    (X, _), _ = crystal
    with pytest.raises(skmerge.InputError, match="Lambda"):
        VariationalMerger(laue=True, wavelength_key="Lambda").fit(X)


def _direct_expansion(hkl, wavelength, dhkl, low, high, dmin, spacegroup):
    """Harmonics of one spot by brute force over n."""
    n0 = gcd(gcd(abs(int(hkl[0])), abs(int(hkl[1]))), abs(int(hkl[2])))
    out = []
    for n in range(1, 200):
        lam = wavelength * n0 / n
        harmonic = [int(v) // n0 * n for v in hkl]
        inside = (low - 1e-6 <= lam <= high + 1e-6 and dhkl * n0 / n >= dmin - 1e-6) or n == n0
        if inside and not spacegroup.operations().is_systematically_absent(harmonic):
            out.append(lam)
    return out


@pytest.mark.realdata
def test_pyp_expansion_agrees_with_a_direct_computation(data_dir):
    X = skmerge.read_unmerged([data_dir / "pyp_laue" / "off.mtz", data_dir / "pyp_laue" / "2ms.mtz"])
    rows = expand_harmonics(X)
    per_spot = rows.groupby("spot_id")["Wavelength"].apply(list)
    dmin = float(X["dHKL"].min())
    picked = np.random.RandomState(0).choice(len(X), 3000, replace=False)
    multiplets = 0
    for i in picked:
        f = X["file_id"].iloc[i]
        band = X.loc[X["file_id"] == f, "Wavelength"]
        expected = _direct_expansion(
            X[["Hobs", "Kobs", "Lobs"]].iloc[i].to_numpy(), float(X["Wavelength"].iloc[i]),
            float(X["dHKL"].iloc[i]), band.min(), band.max(), dmin, X.spacegroup,
        )
        got = sorted(per_spot.loc[i], reverse=True)
        assert len(got) == len(expected)
        np.testing.assert_allclose(got, expected, rtol=1e-5)
        multiplets += len(got) > 1
    assert len(rows) > len(X)
