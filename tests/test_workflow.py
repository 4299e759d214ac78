"""skmerge.run_merge and skmerge.diagnostics: the command line's workflow from Python."""

import contextlib
import io
import json
import warnings
from numbers import Real

import numpy as np
import pandas as pd
import pytest
import reciprocalspaceship as rs
from sklearn.base import BaseEstimator
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils._param_validation import Interval

import skmerge
from skmerge.cli import main
from skmerge.datasets import make_unmerged
from skmerge.diagnostics import check_metadata_keys, partiality_warning, sigma_scatter, sigma_scatter_warning
from skmerge.errors import InputError, ParameterError
from skmerge.workflow import MergeResult, check_options, make_merger, statistics_from_outputs

KEYS = ["dHKL", "XDET", "YDET", "BATCH"]
TINY = {"max_iter": 30, "mlp_layers": 2, "mlp_width": 8}


@pytest.fixture(scope="module")
def sim_mtz(tmp_path_factory):
    X, _ = make_unmerged(n_images=12, anomalous=True, random_state=1)
    data = rs.DataSet({"H": X["Hobs"].to_numpy(), "K": X["Kobs"].to_numpy(), "L": X["Lobs"].to_numpy(),
                       "BATCH": X["BATCH"].to_numpy(), "I": X["Iobs"].to_numpy(), "SIGI": X["SIGIobs"].to_numpy(),
                       "XDET": X["XDET"].to_numpy(), "YDET": X["YDET"].to_numpy()},
                      cell=X.cell, spacegroup=X.spacegroup, merged=False)
    data = data.astype({"H": "HKL", "K": "HKL", "L": "HKL", "BATCH": "Batch", "I": "Intensity", "SIGI": "Stddev",
                        "XDET": "MTZReal", "YDET": "MTZReal"})
    path = tmp_path_factory.mktemp("input") / "sim.mtz"
    data.set_index(["H", "K", "L"]).hkl_to_asu().write_mtz(str(path))
    return path


@pytest.fixture(scope="module")
def both_runs(sim_mtz, tmp_path_factory):
    """The same merge through ``skmerge mono`` and through ``skmerge.run_merge``."""
    cli_dir, py_dir = tmp_path_factory.mktemp("cli"), tmp_path_factory.mktemp("python")
    argv = ["mono", "--anomalous", "--merge-half-datasets", "--test-fraction", "0.1", "--seed", "3", "--quiet",
            "--iterations", "30", "--mlp-layers", "2", "--mlp-width", "8", "--shells", "4", ",".join(KEYS),
            str(sim_mtz), str(cli_dir / "sim")]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        assert main(argv) == 0, err.getvalue()
    lines = []
    result = skmerge.run_merge(str(sim_mtz), py_dir / "sim", metadata=KEYS, anomalous=True, half_datasets=1,
                               test_fraction=0.1, random_state=3, shells=4, log=lambda *line: lines.append(line),
                               **TINY)
    return cli_dir, py_dir, result, lines


def _listing(directory):
    return sorted(p.name for p in directory.iterdir())


def test_run_merge_writes_the_files_of_skmerge_mono(both_runs):
    cli_dir, py_dir, result, _ = both_runs
    assert _listing(py_dir) == _listing(cli_dir) == sorted(
        f"sim{suffix}" for suffix in ("_0.mtz", "_predictions_0.mtz", "_xval_0.mtz", "_history.csv", ".joblib",
                                      ".npz", "_stats.csv", "_stats.json", "_cchalf.png", "_history.png",
                                      "_calibration.png", "_report.html"))
    assert sorted(p.name for p in result.paths) == _listing(py_dir)


def test_run_merge_reproduces_the_merge_and_statistics_of_skmerge_mono(both_runs):
    cli_dir, py_dir, _, _ = both_runs
    for name in ("sim_0.mtz", "sim_xval_0.mtz", "sim_predictions_0.mtz"):
        cli, py = rs.read_mtz(str(cli_dir / name)), rs.read_mtz(str(py_dir / name))
        assert list(cli.columns) == list(py.columns) and cli.index.equals(py.index)
        for column in ("F", "SIGF", "DANO") if name == "sim_0.mtz" else ("I(+)",) if "xval" in name else ("Ipred",):
            np.testing.assert_allclose(py[column].to_numpy(float), cli[column].to_numpy(float), rtol=1e-5,
                                       err_msg=f"{name}:{column}")
    py_document, cli_document = (json.loads((d / "sim_stats.json").read_text()) for d in (py_dir, cli_dir))
    assert py_document.pop("run")["command"] is None and cli_document.pop("run")["command"].startswith("skmerge mono")
    assert py_document == cli_document
    pd.testing.assert_frame_equal(pd.read_csv(py_dir / "sim_stats.csv"), pd.read_csv(cli_dir / "sim_stats.csv"))


def test_run_merge_returns_what_it_wrote(both_runs):
    _, py_dir, result, lines = both_runs
    assert isinstance(result, MergeResult) and result.merger.n_iter_ <= 30
    merged = rs.read_mtz(str(py_dir / "sim_0.mtz"))
    np.testing.assert_allclose(result.merged[0]["F"].to_numpy(float), merged["F"].to_numpy(float), rtol=1e-6)
    assert len(result.predictions[0]) == len(result.observations) == len(result.test)
    assert 0.05 < result.test.mean() < 0.15
    assert (result.predictions[0]["test"].to_numpy() == 1).sum() == result.test.sum()
    assert set(result.halves[0]["half"]) == {0, 1}
    assert result.names == ["sim.mtz"] and result.error_model["sdfac"] > 0  # the default error model
    assert np.isfinite(result.statistics[0].table.loc["overall", "cc_pred"])
    levels = [level for level, _ in lines]
    assert set(levels) <= {"info", "warning"} and levels.count("info") == 9, lines
    messages = " ".join(message for _, message in lines)
    assert "decay: F and I are as the least-decayed images record them" in messages  # a rotation series
    assert "degrees of freedom (learned)" in messages and "double-Wilson prior: r file 0" in messages
    assert "SIGF: the likelihood's score varies" in messages
    assert "SIGF: the images' own scale weights are uncertain too" in messages
    assert [message for level, message in lines if level == "warning"] == result.warnings
    assert lines[-1][1].startswith("wrote sim_0.mtz")
    assert "not converged" in lines[1][1], "30 steps are too few: the status line says so"
    assert any(w.startswith("2 of 2 half-dataset merges stopped at max_iter=30") for w in result.warnings)


def test_statistics_from_outputs_recomputes_the_run(both_runs):
    _, py_dir, result, _ = both_runs
    statistics, names = statistics_from_outputs(py_dir / "sim", shells=4)
    assert names == ["sim.mtz"]
    pd.testing.assert_frame_equal(statistics[0].table, result.statistics[0].table, rtol=1e-5)
    with pytest.raises(InputError, match="no merged file"):
        statistics_from_outputs(py_dir / "other")
    with pytest.raises(ParameterError, match="'shells'"):
        statistics_from_outputs(py_dir / "sim", shells=0)


def test_run_merge_takes_a_table_and_a_ready_merger(tmp_path):
    X, _ = make_unmerged(n_images=10, random_state=2)
    merger = skmerge.VariationalMerger(metadata=["dHKL", "BATCH"], random_state=0, **TINY)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)  # reported by the status line instead
        result = skmerge.run_merge(X, merger=merger, mlp_width=4, log=lambda *line: None)
    assert not result.merger.converged_
    assert result.merger is not merger and not hasattr(merger, "n_iter_"), "a clone is fitted"
    assert result.merger.mlp_width == 4 and result.paths == [] and result.halves is None
    assert result.names == ["file 0"] and list(result.merged[0].columns) == ["F", "SIGF", "I", "SIGI", "N"]
    assert _listing(tmp_path) == []


def test_run_merge_checks_everything_before_reading(tmp_path):
    missing = str(tmp_path / "missing.mtz")  # never read: each call fails before
    with pytest.raises(ParameterError, match="'max_iter'"):
        skmerge.run_merge(missing, max_iter=0)
    with pytest.raises(ParameterError, match="no_such_parameter"):
        skmerge.run_merge(missing, no_such_parameter=1)
    with pytest.raises(ParameterError, match="'test_fraction'"):
        skmerge.run_merge(missing, test_fraction=1.0)
    with pytest.raises(ParameterError, match="'half_datasets'"):
        skmerge.run_merge(missing, half_datasets=-1)
    with pytest.raises(InputError, match="does not exist"):
        skmerge.run_merge(missing, tmp_path / "nowhere" / "x")
    X, _ = make_unmerged(n_images=4, random_state=0)
    with pytest.raises(ParameterError, match="dmin: read options apply to files"):
        skmerge.run_merge(X, dmin=2.0)
    with pytest.raises(InputError, match="unknown metadata key 'NOPE'"):
        skmerge.run_merge(X, metadata=["dHKL", "NOPE"])


class _BoundedLikelihood(BaseEstimator):
    _parameter_constraints = {"dof": [Interval(Real, 0, None, closed="neither")]}

    def __init__(self, dof=1.0):
        self.dof = dof

    def log_prob(self, intensity, predicted, sigma):
        raise NotImplementedError("never fitted")


def test_make_merger_and_check_options():
    merger = make_merger(max_iter=7)
    assert merger.max_iter == 7 and merger.get_params()["learning_rate"] == skmerge.VariationalMerger().learning_rate
    assert make_merger(merger, mlp_width=3).get_params()["max_iter"] == 7
    with pytest.raises(ParameterError, match="'learning_rate'"):
        make_merger(learning_rate=-1.0)
    # Model pieces given as objects are validated too, when they declare their constraints.
    with pytest.raises(ParameterError, match="'dof' parameter of _BoundedLikelihood"):
        make_merger(likelihood=_BoundedLikelihood(dof=-1.0))
    assert make_merger(likelihood=_BoundedLikelihood(dof=2.0)).likelihood.dof == 2.0
    check_options(shells=[10.0, 3.0, 2.0], binning="equal-volume", method="spearman")
    with pytest.raises(ParameterError, match="'method'"):
        check_options(method="kendall")


# ------------------------------------------------------------------ diagnostics
def test_partiality_warning():
    X = pd.DataFrame({"PARTIAL": [True, True, False], "FRACTIONCALC": [0.3, 0.7, 1.0]})
    assert "add FRACTIONCALC to the metadata keys" in partiality_warning(X, ["dHKL"])
    assert partiality_warning(X, ["dHKL", "FRACTIONCALC"]) is None
    assert "sum the partials" in partiality_warning(X.drop(columns=["FRACTIONCALC"]), ["dHKL"])
    assert partiality_warning(X.assign(PARTIAL=False), ["dHKL"]) is None


@pytest.mark.parametrize("spread, warned", [(5.0, True), (1.0, False)])
def test_sigma_scatter_warning(spread, warned):
    rng = np.random.default_rng(0)
    sigma = rng.uniform(5, 50, 20_000)
    ipred = rng.exponential(500, 20_000)
    test = rng.random(20_000) < 0.1
    iobs = ipred + spread * sigma * rng.normal(size=20_000)
    iobs[test] += 100 * sigma[test]  # held-out observations do not count
    predictions = pd.DataFrame({"Iobs": iobs, "SIGIobs": sigma, "Ipred": ipred, "test": test.astype(np.int32)})
    warning = sigma_scatter_warning(sigma_scatter(predictions))
    if warned:
        assert "5.0 times more than their sigmas say" in warning and "--no-error-model" in warning
    else:
        assert warning is None


def test_check_metadata_keys_lists_the_available_ones():
    X, _ = make_unmerged(n_images=4, random_state=0)
    check_metadata_keys(["dHKL", "XDET", "image_id"], X)
    with pytest.raises(InputError, match=r"unknown metadata keys 'A', 'B'; available: dHKL,.*XDET"):
        check_metadata_keys(["A", "dHKL", "B"], X)
