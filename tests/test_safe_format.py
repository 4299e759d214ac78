"""The safe format of fitted mergers (``merger.save`` / ``VariationalMerger.load``):
arrays and JSON without pickle, exact predictions after loading, damage refused."""

import json
import subprocess
import sys
import zipfile

import numpy as np
import pandas as pd
import pytest

import skmerge
from skmerge import DamagedFileError, IncompatibleVersionError, NotSerializableError, VariationalMerger
from skmerge.datasets import make_unmerged

from _hostile import assert_damage_refused_or_harmless

FAST = dict(mlp_layers=2, mlp_width=4, max_iter=30, random_state=0)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A merger with every kind of model piece, fitted and written by the workflow
    (OUT.npz beside OUT.joblib), and its table."""
    X, _ = make_unmerged(n_images=8, anomalous=True, random_state=2)
    out = tmp_path_factory.mktemp("saved") / "x"
    result = skmerge.run_merge(
        X, out, anomalous=True, error_model=True, metadata=["dHKL", "XDET", "image_id"], positional_encoding=2,
        prior=skmerge.WilsonPrior(b_factor=5.0), likelihood=skmerge.StudentTLikelihood(dof=8),
        log=lambda *args: None, **FAST,
    )
    return X, result.merger, out.parent / "x.npz"


def test_the_workflow_writes_the_safe_format_beside_the_joblib_file(saved):
    _, _, path = saved
    assert {"x.joblib", "x.npz"} <= {p.name for p in path.parent.iterdir()}


def test_predictions_are_identical_after_loading_in_a_new_process(saved, tmp_path):
    X, merger, path = saved
    X.to_pickle(tmp_path / "X.pkl")
    script = (
        "import sys, numpy as np, pandas as pd, skmerge\n"
        "merger = skmerge.VariationalMerger.load(sys.argv[1])\n"
        "X = pd.read_pickle(sys.argv[2])\n"
        "mean, std, scale, scale_std = merger.predict(X, return_std=True, return_scale=True)\n"
        "merged = merger.transform(X)\n"
        "np.savez(sys.argv[3], mean=mean, std=std, scale=scale, F=merged['F'].to_numpy(),\n"
        "         DANO=merged['DANO'].to_numpy(), score=merger.score(X))\n"
    )
    subprocess.run([sys.executable, "-c", script, str(path), str(tmp_path / "X.pkl"), str(tmp_path / "out.npz")],
                   check=True, timeout=300)
    with np.load(tmp_path / "out.npz") as loaded:
        mean, std, scale, _ = merger.predict(X, return_std=True, return_scale=True)
        merged = merger.transform(X)
        for name, expected in [("mean", mean), ("std", std), ("scale", scale), ("F", merged["F"].to_numpy()),
                               ("DANO", merged["DANO"].to_numpy()), ("score", merger.score(X))]:
            np.testing.assert_array_equal(loaded[name], expected, err_msg=name)


def test_the_file_is_read_without_pickle(saved):
    _, merger, path = saved
    with np.load(path, allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    assert not any(array.dtype.hasobject for array in arrays.values())
    document = json.loads(str(arrays["document"][()]))
    assert document["skmerge_version"] == skmerge.__version__ and len(document["checksum"]) == 64
    assert document["params"]["likelihood"]["$object"] == "skmerge.model.likelihoods.StudentTLikelihood"


def test_parameters_and_fitted_attributes_round_trip(saved):
    _, merger, path = saved
    loaded = skmerge.load(path)  # dispatches on the suffix
    assert type(loaded) is VariationalMerger
    assert repr(loaded.get_params(deep=False)) == repr(merger.get_params(deep=False))
    for name in ("reflection_counts_", "image_ids_", "loss_curve_", "feature_names_in_"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(merger, name))
    for name in ("intensity_scale_", "sdfac_", "sdadd_", "n_iter_", "converged_", "seed_", "n_metadata_features_"):
        assert getattr(loaded, name) == getattr(merger, name) and type(getattr(loaded, name)) is type(
            getattr(merger, name))
    assert loaded.reflections_.spacegroup.xhm() == merger.reflections_.spacegroup.xhm()
    assert loaded.reflections_.cell.parameters == merger.reflections_.cell.parameters
    np.testing.assert_array_equal(loaded.reflections_.hkl, merger.reflections_.hkl)


def _refit_copy(merger, **params):
    """A fitted copy of ``merger`` with other parameters (no refit)."""
    copy = VariationalMerger(**{**merger.get_params(deep=False), **params})
    copy.__dict__.update({k: v for k, v in vars(merger).items() if k.endswith("_")})
    return copy


def test_new_plain_fitted_attributes_round_trip_unchanged(saved, tmp_path):
    _, merger, _ = saved
    extended = _refit_copy(merger)
    extended.prior_r_ = np.linspace(0, 1, 5, dtype=np.float32)
    extended.prior_weights_ = {"loc": np.ones(3), 2: (1.5, float("nan")), "n": np.int64(4)}
    loaded = VariationalMerger.load(extended.save(tmp_path / "extended.npz"))
    np.testing.assert_array_equal(loaded.prior_r_, extended.prior_r_)
    assert loaded.prior_r_.dtype == np.float32
    weights = loaded.prior_weights_
    np.testing.assert_array_equal(weights["loc"], np.ones(3))
    assert weights[2][0] == 1.5 and np.isnan(weights[2][1]) and weights["n"] == 4 and type(weights["n"]) is np.int64


def test_a_transformer_of_the_users_is_refused_naming_joblib(tmp_path):
    from sklearn.preprocessing import StandardScaler
    from sklearn.compose import make_column_transformer

    X, _ = make_unmerged(n_images=4, random_state=0)
    transformer = make_column_transformer((StandardScaler(), ["dHKL"]), sparse_threshold=0)
    merger = VariationalMerger(metadata=transformer, **FAST).fit(X)
    with pytest.raises(NotSerializableError, match="metadata: a ColumnTransformer cannot be saved.*joblib"):
        merger.save(tmp_path / "mine.npz")
    relabelled = _refit_copy(merger, metadata=["dHKL"])  # a list, yet the fitted transformer is not skmerge's
    with pytest.raises(NotSerializableError, match="metadata_transformer_: a metadata transformer of your own"):
        relabelled.save(tmp_path / "mine.npz")
    assert list(tmp_path.iterdir()) == []


def test_a_reference_held_in_memory_is_refused_and_a_path_is_kept(saved, tmp_path):
    _, merger, _ = saved
    in_memory = _refit_copy(merger, prior=skmerge.ReferencePrior(pd.DataFrame({"F": [1.0]})))
    with pytest.raises(NotSerializableError, match="prior.ReferencePrior.reference: a DataFrame.*joblib"):
        in_memory.save(tmp_path / "ref.npz")
    assert list(tmp_path.iterdir()) == []
    by_path = _refit_copy(merger, prior=skmerge.ReferencePrior(tmp_path / "reference.mtz", kind="studentt"))
    prior = VariationalMerger.load(by_path.save(tmp_path / "ref.npz")).prior
    assert prior.reference == tmp_path / "reference.mtz" and prior.kind == "studentt"


def test_an_unfitted_merger_is_not_saved(tmp_path):
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        VariationalMerger().save(tmp_path / "unfitted.npz")


def test_damage_anywhere_is_refused_or_harmless(saved, tmp_path):
    X, merger, path = saved
    copy = tmp_path / "damaged.npz"
    copy.write_bytes(path.read_bytes())
    assert_damage_refused_or_harmless(copy, X, merger.predict(X))


@pytest.mark.parametrize("content", ["random", "truncated", "joblib", "empty zip"])
def test_files_that_are_not_saved_mergers_are_refused(saved, tmp_path, content):
    import joblib

    _, merger, path = saved
    target = tmp_path / f"{content.replace(' ', '_')}.npz"
    if content == "random":
        target.write_bytes(np.random.default_rng(3).bytes(2048))
    elif content == "truncated":
        target.write_bytes(path.read_bytes()[:-500])
    elif content == "joblib":
        joblib.dump(merger, target)
    else:
        zipfile.ZipFile(target, "w").close()
    with pytest.raises(DamagedFileError, match=target.name):
        VariationalMerger.load(target)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(skmerge.InputError, match="nothere.npz: no such file"):
        VariationalMerger.load(tmp_path / "nothere.npz")


def test_another_version_is_refused_by_name(saved, tmp_path):
    from skmerge._persistence import _checksum

    _, _, path = saved
    with np.load(path) as archive:
        arrays = {name: archive[name] for name in archive.files}
    document = json.loads(str(arrays.pop("document")[()]))
    del document["checksum"]
    document["skmerge_version"] = "9.9.0"
    document["checksum"] = _checksum({"document": document, "arrays": arrays})
    np.savez(tmp_path / "future.npz", document=np.array(json.dumps(document)), **arrays)
    with pytest.raises(IncompatibleVersionError, match="future.npz: .*skmerge 9.9.0"):
        VariationalMerger.load(tmp_path / "future.npz")


@pytest.mark.parametrize("likelihood, names", [
    ("t-mixture", ["likelihood_outlier_fraction_", "likelihood_outlier_scale_", "likelihood_dof_"]),
    ("two-piece", ["likelihood_dof_below_", "likelihood_dof_above_"]),
])
def test_a_likelihood_keeps_its_learned_parameters(tmp_path, likelihood, names):
    X, _ = make_unmerged(n_images=6, outlier_fraction=0.02, random_state=3)
    merger = VariationalMerger(likelihood=likelihood, **FAST).fit(X)
    learned = [getattr(merger, name) for name in names]
    assert all(v > 0 for v in learned)
    assert not hasattr(merger, "likelihood_dof_") or "likelihood_dof_" in names
    merger.save(tmp_path / "m.npz")
    loaded = VariationalMerger.load(tmp_path / "m.npz")
    assert [getattr(loaded, name) for name in names] == learned
    np.testing.assert_array_equal(loaded.predict(X), merger.predict(X))


def test_a_merger_saved_before_image_heads_existed_loads_without_them(tmp_path):
    """Files of both formats written before ``image_heads`` and ``image_layers`` existed
    (their fits had neither) load as mergers without them and predict as they did: a
    file without the parameter gets the value of fits before it (False and 0, not
    today's default "auto"), and without the fitted attribute the parameter's."""
    import pickle

    from skmerge._persistence import _CHECKSUM_KEY, _checksum

    X, _ = make_unmerged(n_images=4, random_state=0)
    merger = VariationalMerger(image_heads=False, **FAST).fit(X)
    expected = merger.predict(X)

    path = merger.save(tmp_path / "m.npz")
    with np.load(path) as archive:
        arrays = {name: archive[name] for name in archive.files}
    document = json.loads(str(arrays.pop("document")[()]))
    del document["checksum"], document["params"]["image_heads"], document["attributes"]["image_heads_"]
    del document["params"]["image_layers"], document["attributes"]["image_layers_"]
    del document["attributes"]["mlp_layers_"]  # before mlp_layers could be "auto"
    del document["attributes"]["sandwich_ratio_"]  # before the sandwich widened SIGF
    del document["attributes"]["image_weight_ratio_"]  # before the images' scale weights did
    del document["attributes"]["image_scale_variance_"]  # before predictions carried them
    document["checksum"] = _checksum({"document": document, "arrays": arrays})
    np.savez(tmp_path / "old.npz", document=np.array(json.dumps(document)), **arrays)
    loaded = VariationalMerger.load(tmp_path / "old.npz")
    assert loaded.image_heads is False and loaded.image_layers == 0
    np.testing.assert_array_equal(loaded.predict(X), expected)
    # SIGF as such a fit reported it: the posterior's.
    assert loaded._get_model().sandwich_ratio == 1.0
    assert loaded._get_model().image_weight_ratio is None
    assert loaded._get_model().image_scale_variance is None

    state = merger.__getstate__()
    del state["image_heads"], state["image_heads_"], state["image_layers"], state["image_layers_"], state["mlp_layers_"]
    del state[_CHECKSUM_KEY]
    state[_CHECKSUM_KEY] = _checksum({k: v for k, v in state.items()})
    unpickled = VariationalMerger.__new__(VariationalMerger)
    unpickled.__setstate__(pickle.loads(pickle.dumps(state)))
    assert unpickled.image_heads is False and unpickled.image_layers == 0
    np.testing.assert_array_equal(unpickled.predict(X), expected)
