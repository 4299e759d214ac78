"""The double-Wilson prior: its laws against scipy, its parent structure, its place in the
estimator and the command line, and what it buys on simulated data with known truth."""

import math
import subprocess
import sys

import gemmi
import joblib
import numpy as np
import pytest
import scipy.special
import scipy.stats
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV

from skmerge import DoubleWilsonPrior, StudentTLikelihood, VariationalMerger, WilsonPrior
from skmerge._tf import tf, tfp
from skmerge.datasets import make_unmerged
from skmerge.errors import InputError, ParameterError
from skmerge.model.data import Reflections
from skmerge.model.double_wilson import DoubleWilsonDistribution, FoldedNormal, Rice, _log_i0e
from skmerge.model.posterior import PositiveTruncatedNormal
from skmerge.model.priors import WilsonDistribution
from skmerge.model_selection import ImageKFold
from skmerge.symmetry import pack_hkl


# ------------------------------------------------------------------ the laws
def test_log_i0e_equals_tfp_and_scipy_over_twelve_decades():
    z = np.logspace(-6, 6, 61).astype(np.float32)
    ours = _log_i0e(tf.constant(z)).numpy()
    np.testing.assert_allclose(ours, np.log(tfp.math.bessel_ive(0.0, z).numpy()), rtol=1e-5, atol=3e-6)
    np.testing.assert_allclose(ours, np.log(scipy.special.i0e(z.astype(np.float64))), rtol=1e-5, atol=3e-6)


def _moments(law, low, high):
    """Mean and variance by quadrature (scipy's rice.mean is NaN for large ν/σ)."""
    from scipy.integrate import quad

    mean = quad(lambda x: x * law.pdf(x), low, high, limit=200)[0]
    return mean, quad(lambda x: (x - mean) ** 2 * law.pdf(x), low, high, limit=200)[0]


@pytest.mark.parametrize("nu, sigma", [(0.0, 1.0), (0.5, 0.3), (3.0, 0.2), (40.0, 0.05)])
def test_rice_matches_scipy(nu, sigma):
    x = np.linspace(max(1e-3, nu - 6 * sigma), nu + 6 * sigma + 1, 200)  # scipy underflows beyond
    law = Rice(np.float32(nu), np.float32(sigma))
    reference = scipy.stats.rice(nu / sigma, scale=sigma)
    np.testing.assert_allclose(law.log_prob(x.astype(np.float32)).numpy(), reference.logpdf(x), rtol=2e-4, atol=2e-4)
    mean, variance = _moments(reference, max(0.0, nu - 12 * sigma), nu + 12 * sigma + 2)
    np.testing.assert_allclose(law.mean().numpy(), mean, rtol=1e-4)
    np.testing.assert_allclose(law.variance().numpy(), variance, rtol=2e-3, atol=1e-6)
    samples = law.sample(20000, seed=(1, 2)).numpy()
    assert scipy.stats.kstest(samples, reference.cdf).pvalue > 1e-3


@pytest.mark.parametrize("mu, scale", [(0.0, 1.0), (0.7, 0.5), (-1.5, 0.4), (20.0, 0.1)])
def test_folded_normal_matches_scipy(mu, scale):
    x = np.linspace(max(1e-3, abs(mu) - 6 * scale), abs(mu) + 6 * scale, 200)
    law = FoldedNormal(np.float32(mu), np.float32(scale))
    reference = scipy.stats.foldnorm(abs(mu) / scale, scale=scale)
    np.testing.assert_allclose(law.log_prob(x.astype(np.float32)).numpy(), reference.logpdf(x), rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(law.mean().numpy(), reference.mean(), rtol=1e-4)
    np.testing.assert_allclose(law.variance().numpy(), reference.var(), rtol=2e-3, atol=1e-6)
    assert scipy.stats.kstest(law.sample(20000, seed=(3, 4)).numpy(), reference.cdf).pvalue > 1e-3


def _pairs(n=4000, r=0.8, v=2.0):
    """A forest of n roots (acentric half, centric half) and one child each."""
    centric = np.tile(np.arange(n) % 2 == 1, 2)
    parent = np.concatenate([np.full(n, -1), np.arange(n)])
    return DoubleWilsonDistribution(centric, np.full(2 * n, v), parent, np.zeros(2 * n, np.int64),
                                    _fixed(r)), centric, n


def _fixed(r):
    from skmerge.model.double_wilson import Correlation

    return Correlation(np.array([[r]]), np.array([[True]]), trainable=False)


def test_double_wilson_log_prob_is_rice_or_folded_normal_around_r_times_parent():
    prior, centric, n = _pairs(n=4, r=0.8, v=2.0)
    f = np.array([1.0, 0.5, 2.0, 1.5, 1.2, 0.3, 1.9, 1.1], np.float32)
    log_p = prior.log_prob(f).numpy()
    np.testing.assert_allclose(log_p[:n], WilsonDistribution(centric[:n], np.full(n, 2.0)).log_prob(f[:n]).numpy(),
                               rtol=1e-5)
    for i in range(n, 2 * n):
        loc = 0.8 * f[i - n]
        if centric[i]:
            expected = scipy.stats.foldnorm(loc / math.sqrt(2 * 0.36), scale=math.sqrt(2 * 0.36)).logpdf(f[i])
        else:
            s = math.sqrt(2 * 0.36 / 2)
            expected = scipy.stats.rice(loc / s, scale=s).logpdf(f[i])
        assert log_p[i] == pytest.approx(expected, rel=1e-4, abs=1e-4)


def test_double_wilson_samples_keep_wilson_marginals_and_the_correlation():
    prior, centric, n = _pairs(n=20000, r=0.9, v=2.0)
    samples = prior.sample(1, seed=(5, 6)).numpy()[0]
    parents, children = samples[:n], samples[n:]
    acentric = ~centric[:n]
    rayleigh = scipy.stats.rayleigh(scale=1.0)  # v = 2σ² = 2
    halfnormal = scipy.stats.halfnorm(scale=math.sqrt(2.0))
    assert scipy.stats.kstest(children[acentric], rayleigh.cdf).pvalue > 1e-3
    assert scipy.stats.kstest(children[~acentric], halfnormal.cdf).pvalue > 1e-3
    # E² of acentric pairs correlates as r² (the intensities of a double-Wilson pair).
    corr = np.corrcoef(parents[acentric] ** 2, children[acentric] ** 2)[0, 1]
    assert corr == pytest.approx(0.81, abs=0.03)
    np.testing.assert_allclose(prior.raw_moments()[1].numpy(), 2.0, rtol=1e-6)


def test_expected_log_prob_is_unbiased_for_the_mean_field_expectation():
    prior, _, n = _pairs(n=6, r=0.95, v=1.5)
    rng = np.random.default_rng(0)
    posterior = PositiveTruncatedNormal(rng.uniform(0.5, 2.0, 2 * n).astype(np.float32),
                                        rng.uniform(0.05, 0.4, 2 * n).astype(np.float32))
    # Independent samples for every reflection: the mean-field expectation by brute force.
    brute = prior.log_prob(posterior.sample(200000, seed=(7, 8))).numpy().mean(axis=0)
    estimates = np.mean([prior.expected_log_prob(posterior, posterior.sample(4, seed=(9, s))).numpy()
                         for s in range(400)], axis=0)
    np.testing.assert_allclose(estimates, brute, atol=0.02)



def test_coupling_is_the_cross_curvature_of_the_log_prior():
    prior, centric, n = _pairs(n=4, r=0.8, v=2.0)
    f = np.array([1.0, 0.5, 2.0, 1.5, 1.2, 0.3, 1.9, 1.1])
    coupling = prior.coupling(tf.constant(f[None], tf.float32)).numpy()
    assert (coupling[:n] == 0).all()  # roots
    k, w = 0.8, 2.0 * (1 - 0.8**2)  # v = 2: k = r, centric w = v(1 − r²), acentric half of it

    def log_p(child, parent_value, centric_pair):
        if centric_pair:
            return scipy.stats.foldnorm(k * parent_value / math.sqrt(w), scale=math.sqrt(w)).logpdf(child)
        return scipy.stats.rice(k * parent_value / math.sqrt(w / 2), scale=math.sqrt(w / 2)).logpdf(child)

    h = 1e-4
    for i in range(n, 2 * n):
        c, p = f[i], f[i - n]
        numeric = (log_p(c + h, p + h, centric[i]) - log_p(c + h, p - h, centric[i])
                   - log_p(c - h, p + h, centric[i]) + log_p(c - h, p - h, centric[i])) / (4 * h * h)
        assert coupling[i] == pytest.approx(numeric, rel=1e-3, abs=1e-4)
    # Strong acentric pairs: the Rice law is a normal in F_child around k·F_parent, curvature k/w.
    strong = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    strong[[0, 4]] = 20.0, 16.0
    assert prior.coupling(tf.constant(strong[None], tf.float32)).numpy()[4] == pytest.approx(k / (w / 2), rel=0.01)


# ----------------------------------------------------------- parents
def _reflections(hkl, group=None, anomalous=True, spacegroup="P 1 21 1"):
    sg = gemmi.SpaceGroup(spacegroup)
    keys = np.sort(pack_hkl(np.asarray(hkl, np.int32), group))
    reflections = Reflections.from_keys(keys, sg, gemmi.UnitCell(30, 40, 50, 90, 100, 90), anomalous,
                                        group is not None)
    reflections.mean_intensity = np.ones(len(keys))
    return reflections


def _parent_hkl(prior, reflections):
    parent = prior._parents(reflections, 1 if reflections.group is None else reflections.group.max() + 1)
    return {(tuple(reflections.hkl[i]), None if reflections.group is None else int(reflections.group[i])):
            None if p < 0 else tuple(reflections.hkl[p]) for i, p in enumerate(parent)}


def test_friedel_minus_reflections_have_their_plus_mate_as_parent():
    # (1,2,3) acentric with both halves; (2,0,1) centric in P2₁; (1,1,1) with only its minus half.
    reflections = _reflections([[1, 2, 3], [-1, -2, -3], [2, 0, 1], [-1, -1, -1]])
    parents = _parent_hkl(DoubleWilsonPrior(), reflections)
    assert parents[((-1, -2, -3), None)] == (1, 2, 3)
    assert parents[((1, 2, 3), None)] is None
    assert parents[((2, 0, 1), None)] is None
    assert parents[((-1, -1, -1), None)] is None  # its mate was never observed
    assert all(p is None for p in _parent_hkl(DoubleWilsonPrior(friedel=False), reflections).values())


def test_file_parents_take_precedence_and_reindexing_maps_indices():
    hkl = [[1, 2, 3], [-1, -2, -3], [1, 2, 3], [-1, -2, -3], [3, 2, 1]]
    group = [0, 0, 1, 1, 1]
    reflections = _reflections(hkl, group, spacegroup="P 1")
    parents = _parent_hkl(DoubleWilsonPrior(parents=[None, 0]), reflections)
    assert parents[((1, 2, 3), 1)] == (1, 2, 3) and parents[((-1, -2, -3), 1)] == (-1, -2, -3)
    assert parents[((-1, -2, -3), 0)] == (1, 2, 3)  # the root file keeps its Friedel pairs
    assert parents[((3, 2, 1), 1)] is None
    swapped = _parent_hkl(DoubleWilsonPrior(parents=[None, 0], reindexing_ops=["x,y,z", "z,y,x"]), reflections)
    assert swapped[((3, 2, 1), 1)] == (1, 2, 3)


@pytest.mark.parametrize("prior, group, message", [
    (DoubleWilsonPrior(parents=[None, 0]), None, "separate_files"),
    (DoubleWilsonPrior(parents=[None]), [0, 1], "2 files"),
    (DoubleWilsonPrior(parents=[None, 1]), [0, 1], "file 1 cannot have parent 1"),
    (DoubleWilsonPrior(parents=[1, 0]), [0, 1], "cycle"),
    (DoubleWilsonPrior(parents=[None, 0], reindexing_ops=["x,y,z", "nonsense"]), [0, 1], "nonsense"),
    (DoubleWilsonPrior(r=[0.5, 0.6]), [0, 1, 2], "one per file_id"),
])
def test_bad_parent_structures_raise_input_errors_naming_the_flag(prior, group, message):
    reflections = _reflections([[1, 2, 3]] * len(group) if group else [[1, 2, 3]], group, spacegroup="P 1")
    with pytest.raises(InputError, match=message):
        prior.build(reflections)


# ------------------------------------------------------------- in the estimator
@pytest.fixture(scope="module")
def anomalous_data():
    return make_unmerged(n_images=24, anomalous=True, anomalous_signal=0.08, random_state=3)


def test_fitted_r_is_reported_persisted_and_restored(anomalous_data, tmp_path):
    X, _ = anomalous_data
    merger = VariationalMerger(prior=DoubleWilsonPrior(), anomalous=True, mlp_layers=2, max_iter=150,
                               random_state=0).fit(X)
    assert merger.prior_r_.shape == (1, 1) and 0 < merger.prior_r_[0, 0] < 1
    assert merger.prior_r_[0, 0] != pytest.approx(0.9, abs=1e-4)  # learned, not left at its start
    expected = merger.transform(X)
    path = tmp_path / "merger.joblib"
    joblib.dump(merger, path)
    code = (f"import joblib, skmerge.datasets as d; m = joblib.load({str(path)!r}); "
            "X, _ = d.make_unmerged(n_images=24, anomalous=True, anomalous_signal=0.08, random_state=3); "
            f"m.transform(X).to_pickle({str(tmp_path / 'out.pkl')!r}); print(m.prior_r_[0, 0])")
    printed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert float(printed.split()[-1]) == pytest.approx(merger.prior_r_[0, 0], rel=1e-6)
    import pandas as pd

    pd.testing.assert_frame_equal(pd.read_pickle(tmp_path / "out.pkl"), expected)

    fixed = VariationalMerger(prior=DoubleWilsonPrior(r=0.5, learn_r=False), anomalous=True, mlp_layers=2,
                              max_iter=60, random_state=0).fit(X)
    assert fixed.prior_r_[0, 0] == pytest.approx(0.5, abs=1e-5)


def test_double_wilson_prior_is_a_grid_value(anomalous_data):
    X, _ = anomalous_data
    search = GridSearchCV(VariationalMerger(anomalous=True, mlp_layers=2, max_iter=40, random_state=0),
                          {"prior": [WilsonPrior(), DoubleWilsonPrior(n_shells=2)]}, cv=ImageKFold(2))
    search.fit(X)
    assert len(search.cv_results_["mean_test_score"]) == 2
    assert np.isfinite(search.cv_results_["mean_test_score"]).all()
    assert clone(DoubleWilsonPrior(parents=[None, 0], r=[0.0, 0.8])).get_params()["r"] == [0.0, 0.8]


def test_invalid_prior_parameters_are_parameter_errors(anomalous_data):
    X, _ = anomalous_data
    with pytest.raises(ParameterError, match="n_shells"):
        VariationalMerger(prior=DoubleWilsonPrior(n_shells=0)).fit(X)


def test_learned_student_t_dof_falls_on_data_with_outliers():
    X, _ = make_unmerged(n_images=20, outlier_fraction=0.03, random_state=1)
    merger = VariationalMerger(likelihood=StudentTLikelihood(16.0, learn_dof=True), mlp_layers=2, max_iter=400,
                               random_state=0).fit(X)
    assert merger.likelihood_dof_ < 10
    restored = joblib.loads(joblib.dumps(merger)) if hasattr(joblib, "loads") else None
    if restored is None:
        import pickle

        restored = pickle.loads(pickle.dumps(merger))
    np.testing.assert_allclose(restored.predict(X), merger.predict(X), rtol=1e-6)


# ----------------------------------------------------------------- accuracy
def _dano_cc(merged, truth):
    joined = merged.join(truth[["DANO"]], rsuffix="_true", how="inner")
    both = (joined["N(+)"] > 0) & (joined["N(-)"] > 0) & (joined["DANO_true"] != 0)
    return np.corrcoef(joined["DANO"][both], joined["DANO_true"][both])[0, 1]


def test_friedel_prior_recovers_more_anomalous_signal_than_wilson():
    X, truth = make_unmerged(n_images=36, anomalous=True, anomalous_signal=0.05, outlier_fraction=0.01,
                             random_state=0)
    params = dict(anomalous=True, likelihood=StudentTLikelihood(4.0), mlp_layers=4, random_state=0)
    wilson = _dano_cc(VariationalMerger(prior="wilson", **params).fit(X).transform(X), truth.merged)
    bivariate = _dano_cc(VariationalMerger(prior=DoubleWilsonPrior(), **params).fit(X).transform(X), truth.merged)
    assert bivariate >= wilson + 0.05, (wilson, bivariate)


def test_time_point_prior_recovers_more_of_the_difference_than_wilson():
    X, truth = make_unmerged(n_images=24, time_points=2, outlier_fraction=0.01, random_state=1)
    true = truth.merged.reset_index()
    change = true.loc[true.file_id == 1, "DF"] / np.sqrt(true.loc[true.file_id == 1, "I"].mean())
    assert 0.2 < change.std() < 0.4  # the simulator's rms change, 0.3·√(εΣ)

    def cc(prior):
        merger = VariationalMerger(prior=prior, separate_files=True, likelihood=StudentTLikelihood(4.0),
                                   mlp_layers=4, random_state=0).fit(X)
        merged = merger.transform(X).reset_index()
        pairs = merged[merged.file_id == 0].merge(merged[merged.file_id == 1], on=["H", "K", "L"])
        pairs = pairs.merge(true[true.file_id == 1][["H", "K", "L", "DF"]], on=["H", "K", "L"])
        return np.corrcoef(pairs["F_y"] - pairs["F_x"], pairs["DF"])[0, 1]

    wilson, bivariate = cc("wilson"), cc(DoubleWilsonPrior(parents=[None, 0]))
    assert bivariate >= wilson + 0.05, (wilson, bivariate)


# ------------------------------------------------------------ command line
@pytest.fixture(scope="module")
def time_series_files(tmp_path_factory):
    import reciprocalspaceship as rs

    folder = tmp_path_factory.mktemp("series")
    X, _ = make_unmerged(n_images=12, time_points=2, random_state=0)
    paths = []
    for k in range(2):
        part = X[X["file_id"] == k]
        table = rs.DataSet({"H": part["Hobs"], "K": part["Kobs"], "L": part["Lobs"], "BATCH": part["BATCH"],
                            "I": part["Iobs"], "SIGI": part["SIGIobs"]}, spacegroup=X.spacegroup, cell=X.cell,
                           merged=False).infer_mtz_dtypes()
        paths.append(str(folder / f"t{k}.mtz"))
        table.write_mtz(paths[-1])
    return paths


def test_command_line_ties_files_reports_r_and_ccdiff(time_series_files, tmp_path, capsys):
    import json

    from skmerge.cli import main

    out = str(tmp_path / "series")
    code = main(["mono", "--disable-progress-bar", "--iterations", "150", "--mlp-layers", "2", "--separate-files",
                 "--double-wilson-parents", "None,0", "--double-wilson-r", "0,0.95", "--merge-half-datasets", "dHKL",
                 *time_series_files, out])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "double-Wilson prior: r file 1 0.950 (fixed)" in captured.err
    document = json.load(open(f"{out}_stats.json"))
    assert document["parents"] == [None, 0]
    assert document["prior_r"][0] == [None] and document["prior_r"][1][0] == pytest.approx(0.95, abs=1e-5)
    overall = document["datasets"][1]["shells"][-1]
    assert -1 <= overall["cc_diff"] <= 1 and "cc_diff" not in document["datasets"][0]["shells"][-1]
    assert "CCdiff" in captured.out
    from skmerge.workflow import statistics_from_outputs

    statistics, _ = statistics_from_outputs(out)
    assert statistics[1].table.loc["overall", "cc_diff"] == pytest.approx(overall["cc_diff"])


@pytest.mark.parametrize("flags, message", [
    (["--double-wilson-parents", "None,0"], "--separate-files"),
    (["--separate-files", "--double-wilson-parents", "None,x"], "--double-wilson-parents None,x"),
    (["--separate-files", "--double-wilson-parents", "None,5"], "--double-wilson-parents"),
    (["--double-wilson-r", "1.5"], "--double-wilson-r"),
    (["--double-wilson-r", "0.9", "--reference-mtz", __file__], "conflicts with --reference-mtz"),
])
def test_command_line_double_wilson_mistakes_are_one_line(time_series_files, tmp_path, capsys, flags, message):
    from skmerge.cli import main

    code = main(["mono", "--disable-progress-bar", "--iterations", "5", *flags, "dHKL", *time_series_files,
                 str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not list(tmp_path.iterdir())
