"""The Python API against hostile inputs: readers given damaged files of every format,
the estimator given bad tables and parameters, and the contract of scikit-learn
estimators (clone, pickle, determinism). Each case asserts the exception type, that the
message names the culprit, and that no file is left behind."""

import copy
import pickle
import signal

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

import skmerge
from skmerge import InputError, NumericalError, VariationalMerger
from skmerge.errors import ParameterError
from skmerge.cli import main

from _hostile import DAMAGE, FAST, FLAGS, WRITERS, damaged, listing, simulated

# Damage that leaves a file of its format readable elsewhere: its middle scrambled.
SCRAMBLED = {"XDS_ASCII.HKL": "utf-8", "crystals.stream": "malformed CrystFEL stream",
             "integrated.refl": "beyond single precision", "unmerged.mtz": "not a readable MTZ file"}


@pytest.mark.parametrize("how", DAMAGE)
@pytest.mark.parametrize("name", WRITERS)
def test_a_damaged_file_is_an_input_error_naming_it(tmp_path, name, how):
    path = damaged(tmp_path, name, how)
    before = listing(tmp_path)
    with pytest.raises(InputError, match=name.replace(".", r"\.")):
        skmerge.read_unmerged(path, spacegroup="P 21 21 21" if name.endswith(".stream") else None)
    assert listing(tmp_path) == before


@pytest.mark.parametrize("name", WRITERS)
def test_a_file_scrambled_in_the_middle_is_an_input_error(tmp_path, name):
    path = WRITERS[name](tmp_path / name)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 300] = np.random.default_rng(0).bytes(300)
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match=rf"{name.replace('.', '[.]')}: .*{SCRAMBLED[name]}"):
        skmerge.read_unmerged(path, spacegroup="P 21 21 21" if name.endswith(".stream") else None)


def test_an_mtz_header_cut_short_still_gives_every_observation(tmp_path):
    # The records after the data and the column list are not needed to read the data.
    path = WRITERS["unmerged.mtz"](tmp_path / "cut.mtz")
    whole = skmerge.read_unmerged(path)
    path.write_bytes(path.read_bytes()[:-40])
    np.testing.assert_array_equal(skmerge.read_unmerged(path)["Iobs"], whole["Iobs"])


@pytest.mark.parametrize("name", ["XDS_ASCII.HKL", "unmerged.mtz", "integrated.refl"])
def test_a_directory_is_not_a_reflection_file(tmp_path, name):
    (tmp_path / name).mkdir()
    with pytest.raises(InputError, match=f"{name.replace('.', '[.]')}: is a directory"):
        skmerge.read_unmerged(tmp_path / name)


# ------------------------------------------------------------ bad tables
@pytest.fixture(scope="module")
def table():
    return simulated(4, 0)


def with_value(X, column, value, row=5):
    X = X.copy()
    values = X[column].to_numpy().copy()
    values[row] = value
    X[column] = values
    return X


@pytest.mark.parametrize("column, value", [("Iobs", np.nan), ("Iobs", np.inf), ("Iobs", -np.inf),
                                           ("SIGIobs", np.nan), ("SIGIobs", 0.0), ("SIGIobs", -2.0)])
def test_non_finite_intensities_and_sigmas_name_their_row(table, column, value):
    with pytest.raises(InputError, match=rf"1 observation.*first at row 5: .*{column}={value}.*drop_invalid"):
        VariationalMerger(**FAST).fit(with_value(table, column, value))


@pytest.mark.parametrize("change, culprit", [
    (lambda X: X.to_numpy(), "not ndarray"),
    (lambda X: X.iloc[:0], "no observations"),
    (lambda X: X.drop(columns="image_id"), "image_id"),
    (lambda X: X.drop(columns="SIGIobs"), "SIGIobs"),
    (lambda X: X.drop(columns=["Hobs", "H"]), "Hobs/Kobs/Lobs"),
    (lambda X: setattr(X, "spacegroup", None) or X, "no space group"),
])
def test_a_table_a_model_cannot_use_is_refused_by_name(table, change, culprit):
    with pytest.raises(InputError, match=culprit):
        VariationalMerger(**FAST).fit(change(table.copy()))


@pytest.mark.parametrize("params, data, culprit", [
    (dict(metadata=["dHKL", "NOPE"]), None, "'NOPE' not in the data"),
    (dict(metadata=["dHKL", "XDET"]), ("XDET", np.nan), "'XDET' holds NaN"),
    (dict(metadata=["dHKL", "XDET"]), ("XDET", np.inf), "'XDET' holds NaN or infinite"),
    (dict(separate_files=True), "no file_id", "needs a file_id column"),
    (dict(laue=True), None, r"'Wavelength' is not one of .*--wavelength-key"),
])
def test_columns_the_parameters_need_are_checked(table, params, data, culprit):
    X = table
    if data == "no file_id":
        X = X.drop(columns="file_id")
    elif data is not None:
        X = with_value(X, *data)
    with pytest.raises(InputError, match=culprit):
        VariationalMerger(**params, **FAST).fit(X)


def test_y_of_another_length_is_refused(table):
    with pytest.raises(InputError, match="y has 3 values for"):
        VariationalMerger(**FAST).fit(table, y=np.ones(3))


def test_data_without_signal_is_refused(table):
    with pytest.raises(InputError, match="mean intensity is not positive"):
        VariationalMerger(**FAST).fit(table.assign(Iobs=np.zeros(len(table))))


def test_intensities_beyond_any_scale_stop_with_a_numerical_error(table):
    extreme = table.assign(Iobs=np.full(len(table), 1e30))
    with pytest.raises(NumericalError, match="extreme values"):
        VariationalMerger(**{**FAST, "max_iter": 5, "error_model": None, "likelihood": "normal"}).fit(extreme)
    # The error model's SdAdd·Ipred term keeps σ' in proportion: a finite merge, not NaN.
    merged = VariationalMerger(**{**FAST, "max_iter": 5}).fit(extreme).transform(extreme)
    assert np.isfinite(merged["F"].to_numpy(float)).all()


@pytest.mark.parametrize("params, culprit", [
    (dict(mlp_layers=0), "'mlp_layers'"), (dict(learning_rate=float("nan")), "'learning_rate'"),
    (dict(mc_samples=0), "'mc_samples'"), (dict(likelihood="nope"), "'likelihood'"),
    (dict(likelihood=skmerge.StudentTLikelihood(dof=-1)), "'dof'"), (dict(batch_size=0), "'batch_size'"),
    (dict(validation_fraction=1.0), "'validation_fraction'"), (dict(freeze="scales"), "freeze='scales'"),
])
def test_bad_parameters_are_refused_before_any_work(table, params, culprit):
    with pytest.raises(ParameterError, match=culprit):
        VariationalMerger(**{**FAST, **params}).fit(table)


# ------------------------------------------------------------ a fitted merger at use
@pytest.fixture(scope="module")
def fitted(table):
    return VariationalMerger(**FAST).fit(table)


def test_an_unfitted_merger_does_not_predict(table):
    for method in (VariationalMerger().predict, VariationalMerger().transform, VariationalMerger().score):
        with pytest.raises(NotFittedError):
            method(table)


def test_a_table_without_the_fits_columns_is_refused(fitted, table):
    with pytest.raises(InputError, match="lacks column.*dHKL"):
        fitted.predict(table.drop(columns="dHKL"))


def test_an_empty_table_is_refused_at_use(fitted, table):
    with pytest.raises(InputError, match="no observations"):
        fitted.transform(table.iloc[:0])


def test_clone_gives_an_unfitted_merger_with_the_same_parameters(fitted):
    cloned = clone(fitted)
    assert cloned.get_params() == fitted.get_params() and not hasattr(cloned, "posterior_weights_")


@pytest.mark.parametrize("duplicate", [lambda m: pickle.loads(pickle.dumps(m)), copy.deepcopy])
def test_copies_predict_exactly_as_the_original(fitted, table, duplicate):
    np.testing.assert_array_equal(duplicate(fitted).predict(table), fitted.predict(table))


def test_the_same_seed_gives_the_same_fit(fitted, table):
    np.testing.assert_array_equal(VariationalMerger(**FAST).fit(table).predict(table), fitted.predict(table))


# ------------------------------------------------------------ signals during a fit
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_during_the_fit_leaves_no_outputs(tmp_path, monkeypatch, capsys, interruptible, sig):
    import os

    path = WRITERS["unmerged.mtz"](tmp_path / "unmerged.mtz")
    (tmp_path / "out").mkdir()
    fit = VariationalMerger.fit

    def interrupted(self, X, y=None, **options):
        os.kill(os.getpid(), getattr(signal, sig))
        return fit(self, X, y, **options)

    monkeypatch.setattr(VariationalMerger, "fit", interrupted)
    assert main(["mono", *FLAGS, "dHKL", str(path), str(tmp_path / "out" / "x")]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert listing(tmp_path / "out") == [] and listing(tmp_path) == ["out", "unmerged.mtz"]
