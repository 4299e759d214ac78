"""Every way :func:`skmerge.read_unmerged` can refuse its input.

Each case checks the exception type (:class:`skmerge.InputError`, a ``ValueError``) and
that the message names the culprit: the file, the column or the value.
"""

import re

import numpy as np
import pytest
import reciprocalspaceship as rs

import skmerge
from skmerge import InputError

CELL = (40.0, 50.0, 60.0, 90.0, 90.0, 90.0)
HKL = [[1, 1, 1], [2, 1, 1], [3, 1, 1], [1, 2, 1], [2, 2, 1], [3, 2, 1]]


def small_dataset(spacegroup="P 21 21 21", cell=CELL, **columns):
    """Six observations of P 21 21 21 with MTZ dtypes; keyword columns replace or add."""
    hkl = np.array(HKL)
    data = {
        "H": hkl[:, 0],
        "K": hkl[:, 1],
        "L": hkl[:, 2],
        "BATCH": np.array([1, 1, 2, 2, 3, 3]),
        "I": np.arange(1.0, 7.0) * 10,
        "SIGI": np.ones(6),
    }
    data.update(columns)
    ds = rs.DataSet(data, spacegroup=spacegroup, cell=cell, merged=False)
    return ds.infer_mtz_dtypes().astype({"H": "HKL", "K": "HKL", "L": "HKL"})


def raises_input_error(*culprits):
    """pytest.raises(InputError) whose message must contain every culprit verbatim."""
    return pytest.raises(InputError, match="(?s)" + "".join(f"(?=.*{re.escape(c)})" for c in culprits))


def test_input_error_is_a_value_error():
    assert issubclass(InputError, ValueError)
    assert issubclass(InputError, skmerge.SkmergeError)


def test_the_well_formed_small_dataset_reads():
    # the positive control of every case below
    X = skmerge.read_unmerged(small_dataset())
    assert len(X) == 6


# --------------------------------------------------------------------------- files


def test_missing_file(tmp_path):
    with raises_input_error("nothere.mtz", "no such file"):
        skmerge.read_unmerged(tmp_path / "nothere.mtz")


def test_unknown_format(tmp_path):
    path = tmp_path / "mystery.dat"
    path.write_bytes(np.random.default_rng(0).bytes(2000))
    with raises_input_error("mystery.dat", "unknown file format"):
        skmerge.read_unmerged(path)


def test_merged_mtz_given_as_unmerged(tmp_path):
    merged = rs.algorithms.merge(small_dataset(), anomalous=False).infer_mtz_dtypes()
    path = tmp_path / "already_merged.mtz"
    merged.write_mtz(str(path))
    with raises_input_error("already_merged.mtz", "merged data"):
        skmerge.read_unmerged(path)


def test_one_bad_file_among_good_ones_is_named(tmp_path):
    good = tmp_path / "good.mtz"
    # a Friedel mate makes rs write M/ISYM and a repeated ASU index makes it read as unmerged
    unmerged = small_dataset(H=np.array([1, 2, 3, -1, 2, 3]), K=np.array([1, 1, 1, -1, 2, 2]),
                             L=np.array([1, 1, 1, -1, 1, 1]))
    unmerged.write_mtz(str(good))
    assert len(skmerge.read_unmerged(good)) == 6
    with raises_input_error("missing_second.mtz"):
        skmerge.read_unmerged([good, tmp_path / "missing_second.mtz"])


def test_no_input_at_all():
    with raises_input_error("no reflection files"):
        skmerge.read_unmerged([])


def test_input_of_the_wrong_type():
    with raises_input_error("input 1", "int"):
        skmerge.read_unmerged([small_dataset(), 42])


# --------------------------------------------------------------------------- columns


def test_missing_intensity_column():
    ds = small_dataset().rename(columns={"I": "COUNTS"}).astype({"COUNTS": "MTZReal"})
    with raises_input_error("<data set 0>", "no intensity column", "intensity_key=", "COUNTS"):
        skmerge.read_unmerged(ds)


def test_ambiguous_sigma_column():
    # two Stddev columns, neither right after I nor named after it
    ds = small_dataset(XDET=np.ones(6), SIGA=np.ones(6), SIGB=np.ones(6)).drop(columns="SIGI")
    ds = ds.astype({"SIGA": "Stddev", "SIGB": "Stddev"})
    with raises_input_error("SIGA", "SIGB", "sigma_key="):
        skmerge.read_unmerged(ds)


def test_two_sigma_columns_named_after_the_intensity_are_ambiguous():
    ds = small_dataset(XDET=np.ones(6), SIGI=np.ones(6), SigI=np.ones(6))
    ds = ds[["H", "K", "L", "BATCH", "I", "XDET", "SIGI", "SigI"]].astype({"SigI": "Stddev"})
    with raises_input_error("SIGI", "SigI", "sigma_key="):
        skmerge.read_unmerged(ds)


def test_no_sigma_column():
    ds = small_dataset().drop(columns="SIGI")
    with raises_input_error("no σ column", "'I'", "sigma_key="):
        skmerge.read_unmerged(ds)


def test_intensity_key_that_is_not_a_column():
    with raises_input_error("intensity_key='NOPE'", "not a column"):
        skmerge.read_unmerged(small_dataset(), intensity_key="NOPE")


def test_sigma_key_that_is_not_a_column():
    with raises_input_error("sigma_key='SIGNOPE'", "not a column"):
        skmerge.read_unmerged(small_dataset(), sigma_key="SIGNOPE")


def test_no_batch_column_without_image_key():
    ds = small_dataset().rename(columns={"BATCH": "FRAME"}).astype({"FRAME": "MTZInt"})
    with raises_input_error("<data set 0>", "no image column", "image_key="):
        skmerge.read_unmerged(ds)


def test_image_key_rescues_a_missing_batch_column():
    ds = small_dataset().rename(columns={"BATCH": "FRAME"}).astype({"FRAME": "MTZInt"})
    X = skmerge.read_unmerged(ds, image_key="FRAME")
    np.testing.assert_array_equal(X["image_id"].to_numpy(), [0, 0, 1, 1, 2, 2])


def test_fractional_image_numbers():
    ds = small_dataset(FRAME=np.array([1.0, 1.5, 2.0, 2.0, 3.0, 3.0]))
    with raises_input_error("'FRAME'", "whole numbers"):
        skmerge.read_unmerged(ds, image_key="FRAME")


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize(
    "column, value, shown",
    [("I", np.nan, "I=nan"), ("I", np.inf, "I=inf"), ("SIGI", np.nan, "SIGI=nan"), ("SIGI", np.inf, "SIGI=inf")],
)
def test_non_finite_intensity_or_sigma(column, value, shown):
    ds = small_dataset()
    ds.loc[3, column] = value
    with raises_input_error("<data set 0>", "1 observation(s)", "row 3", shown, "drop_invalid=True"):
        skmerge.read_unmerged(ds)


@pytest.mark.parametrize("value, shown", [(0.0, "SIGI=0.0"), (-2.0, "SIGI=-2.0")])
def test_sigma_not_positive(value, shown):
    ds = small_dataset()
    ds.loc[4, "SIGI"] = value
    with raises_input_error("row 4", shown, "≤ 0"):
        skmerge.read_unmerged(ds)


def test_drop_invalid_drops_bad_rows_instead():
    ds = small_dataset()
    ds.loc[1, "I"] = np.nan
    ds.loc[3, "SIGI"] = np.inf
    ds.loc[5, "SIGI"] = 0.0
    X = skmerge.read_unmerged(ds, drop_invalid=True)
    np.testing.assert_array_equal(X["Iobs"].to_numpy(), [10.0, 30.0, 50.0])
    np.testing.assert_array_equal(X[["Hobs", "Kobs", "Lobs"]].to_numpy(), np.array(HKL)[[0, 2, 4]])


def test_nothing_left_after_filters():
    with raises_input_error("<data set 0>", "no observations left", "dHKL < 100"):
        skmerge.read_unmerged(small_dataset(), dmin=100.0)


def test_nothing_left_after_isigi_cutoff():
    with raises_input_error("no observations left", "I/σ < 1000"):
        skmerge.read_unmerged(small_dataset(), isigi_cutoff=1000)


@pytest.mark.parametrize("value", [-1.0, 0.0, np.nan, "abc"])
def test_invalid_dmin(value):
    with raises_input_error(f"dmin={value!r}"):
        skmerge.read_unmerged(small_dataset(), dmin=value)


# --------------------------------------------------------------------------- symmetry and cell


def test_no_space_group():
    ds = small_dataset(spacegroup=None)
    with raises_input_error("<data set 0>", "no space group", "spacegroup="):
        skmerge.read_unmerged(ds)


def test_spacegroup_argument_supplies_a_missing_space_group():
    X = skmerge.read_unmerged(small_dataset(spacegroup=None), spacegroup="P 21 21 21")
    assert X.spacegroup.xhm() == "P 21 21 21"


@pytest.mark.parametrize("value", ["P 7 7 7", "NOT A GROUP", 999])
def test_unknown_spacegroup(value):
    with raises_input_error(f"spacegroup={value!r}"):
        skmerge.read_unmerged(small_dataset(), spacegroup=value)


def test_conflicting_space_groups_of_two_inputs():
    other = small_dataset(spacegroup="P 1 21 1")
    with raises_input_error("different space groups", "P 21 21 21 in <data set 0>", "P 1 21 1 in <data set 1>"):
        skmerge.read_unmerged([small_dataset(), other])


def test_spacegroup_argument_resolves_a_conflict():
    X = skmerge.read_unmerged([small_dataset(), small_dataset(spacegroup="P 1 21 1")], spacegroup="P 21 21 21")
    assert len(X) == 12 and X.spacegroup.xhm() == "P 21 21 21"


def test_cell_incompatible_with_space_group():
    ds = small_dataset(spacegroup="P 43 21 2", cell=(50.0, 60.0, 70.0, 90.0, 90.0, 90.0))
    with raises_input_error("<data set 0>", "50.00, 60.00, 70.00", "P 43 21 2"):
        skmerge.read_unmerged(ds)


def test_cell_argument_incompatible_with_space_group():
    with raises_input_error("cell=", "41.00, 50.00, 60.00, 90.00, 90.00, 100.00", "P 21 21 21"):
        skmerge.read_unmerged(small_dataset(), cell=(41, 50, 60, 90, 90, 100))


def test_malformed_cell_argument():
    with raises_input_error("cell=(40, 50)", "six numbers"):
        skmerge.read_unmerged(small_dataset(), cell=(40, 50))


def test_non_isomorphous_inputs():
    other = small_dataset(cell=tuple(x * 1.1 for x in CELL[:3]) + CELL[3:])
    with raises_input_error("<data set 1>", "44.00, 55.00, 66.00", "not isomorphous", "<data set 0>"):
        skmerge.read_unmerged([small_dataset(), other])


def test_cell_argument_overrides_non_isomorphous_cells():
    other = small_dataset(cell=tuple(x * 1.1 for x in CELL[:3]) + CELL[3:])
    X = skmerge.read_unmerged([small_dataset(), other], cell=(42.0, 52.0, 62.0, 90.0, 90.0, 90.0))
    assert len(X) == 12
    assert X.cell.parameters == pytest.approx((42.0, 52.0, 62.0, 90.0, 90.0, 90.0))
    # the imposed cell is the one the resolution is computed from, for both files
    d = X["dHKL"].to_numpy()
    np.testing.assert_allclose(d[:6], d[6:])
    assert d[0] == pytest.approx(1 / np.sqrt(1 / 42**2 + 1 / 52**2 + 1 / 62**2), rel=1e-5)


def test_slightly_different_cells_are_isomorphous():
    other = small_dataset(cell=tuple(x * 1.01 for x in CELL[:3]) + CELL[3:])
    assert len(skmerge.read_unmerged([small_dataset(), other])) == 12
