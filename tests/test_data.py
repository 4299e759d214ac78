"""The encoding step: observation table → the arrays a model needs."""

import numpy as np
import pytest

import skmerge
from skmerge.datasets import make_unmerged
from skmerge.model import data
from skmerge.symmetry import map_to_asu, pack_hkl


@pytest.fixture(scope="module")
def tables():
    X, _ = make_unmerged(n_images=6, spacegroup="P 21 21 21", anomalous=True, random_state=2)
    return {anomalous: skmerge.read_unmerged(X, anomalous=anomalous) for anomalous in (False, True)}


def _expected_keys(X, anomalous):
    return pack_hkl(map_to_asu(X[["Hobs", "Kobs", "Lobs"]].to_numpy(np.int32), X.spacegroup, anomalous)[0])


@pytest.mark.parametrize("table_anomalous", [False, True])
@pytest.mark.parametrize("merger_anomalous", [False, True])
def test_keys_follow_the_merger_convention_whatever_the_table(tables, table_anomalous, merger_anomalous):
    X = tables[table_anomalous]
    observations = data.encode(X, anomalous=merger_anomalous, separate_files=False)
    np.testing.assert_array_equal(observations.keys, _expected_keys(X, merger_anomalous))


@pytest.mark.parametrize("anomalous", [False, True])
def test_a_table_in_the_merger_convention_is_not_mapped_again(tables, anomalous, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("mapped to the ASU a second time")

    monkeypatch.setattr(data, "map_to_asu", refuse)
    observations = data.encode(tables[anomalous], anomalous=anomalous, separate_files=False)
    reflections, refl = observations.reflections(anomalous, separate=False)
    X = tables[anomalous]
    # The reflections carry the table's own centric flags and ε.
    np.testing.assert_array_equal(reflections.centric[refl], X["CENTRIC"].to_numpy(bool))
    np.testing.assert_array_equal(reflections.epsilon[refl], X["EPSILON"].to_numpy(np.float32))
    np.testing.assert_array_equal(reflections.keys[refl], observations.keys)


def test_separate_files_key_reflections_by_file(tables):
    X = tables[False].copy()
    X["file_id"] = (X["image_id"].to_numpy() % 2).astype("int32")
    observations = data.encode(X, anomalous=False, separate_files=True)
    reflections, _ = observations.reflections(False, separate=True)
    assert set(reflections.group) == {0, 1}
    single = data.encode(X, anomalous=False, separate_files=False).reflections(False, separate=False)[0]
    assert len(reflections) > len(single)


def test_bad_tables(tables):
    X = tables[False]
    with pytest.raises(skmerge.InputError, match="image_id"):
        data.encode(X.drop(columns=["image_id"]), anomalous=False, separate_files=False)
    with pytest.raises(skmerge.InputError, match="non-finite"):
        data.encode(X, np.full(len(X), np.nan), anomalous=False, separate_files=False)
    with pytest.raises(skmerge.InputError, match="file_id"):
        data.encode(X.drop(columns=["file_id"]), anomalous=False, separate_files=True)
    with pytest.raises(skmerge.InputError, match="wavelength"):
        data.laue_band(X, "Wavelength", None)
