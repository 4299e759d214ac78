"""Tests of :func:`skmerge.read_unmerged`, the builder of the observation table.

Tests marked ``realdata`` read the files in ``../shared/data`` (skipped when that folder
is missing) and check the numbers we committed to and agreement with reciprocalspaceship;
the others build small ``rs.DataSet`` objects in memory.
"""

import warnings
from types import SimpleNamespace

import gemmi
import numpy as np
import pandas as pd
import pytest
import reciprocalspaceship as rs

import skmerge
from skmerge.table import TABLE_COLUMNS

HYPF = "hypf_hg_sad/hypf_unmerged.mtz"
THERMOLYSIN = "thermolysin_xfel/unmerged_n395.mtz"
PYP = ["pyp_laue/off.mtz", "pyp_laue/2ms.mtz"]
BRAP = [f"brap_se_mad/brap_{w}_6A.mtz" for w in ("pk", "ip", "rm")]
DIALS_MTZ = "formats/dials_export_small.mtz"

MTZ_FILES = [
    HYPF,
    THERMOLYSIN,
    "thermolysin_xfel/friedel_plus_n395.mtz",
    "thermolysin_xfel/friedel_minus_n395.mtz",
    *PYP,
    *BRAP,
    DIALS_MTZ,
]
# Every reflection file of the data folder, with the arguments it needs.
REFLECTION_FILES = {
    **{name: {} for name in MTZ_FILES},
    "formats/XDS_ASCII.HKL": {},
    "formats/INTEGRATE.HKL": {},
    "formats/crystfel.stream": {"spacegroup": "P 43 21 2"},
    "formats/integrated.refl": {},
}
# Companion files that are not reflection files themselves.
NOT_REFLECTION_FILES = {"README.md", "formats/integrated.expt"}


def rs_read_mtz(path):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Mtz contains multiple datasets")
        return rs.read_mtz(str(path))


@pytest.fixture(scope="module")
def read(data_dir):
    """``read(relative_path(s), **kwargs)``: read_unmerged, cached for the module."""
    cache = {}

    def read(names, **kwargs):
        names = (names,) if isinstance(names, str) else tuple(names)
        kwargs = {k: v for k, v in kwargs.items() if not (k == "anomalous" and v is False)}
        key = (names, tuple(sorted(kwargs.items())))
        if key not in cache:
            paths = [data_dir / n for n in names]
            cache[key] = skmerge.read_unmerged(paths if len(paths) > 1 else paths[0], **kwargs)
        return cache[key]

    return read


def small_dataset(hkl, batch, intensity=None, sigma=None, spacegroup="P 21 21 21",
                  cell=(40.0, 50.0, 60.0, 90.0, 90.0, 90.0), **extra):
    """An unmerged rs.DataSet with MTZ dtypes, as a reader would return it."""
    hkl = np.asarray(hkl)
    n = len(hkl)
    columns = {
        "H": hkl[:, 0],
        "K": hkl[:, 1],
        "L": hkl[:, 2],
        "BATCH": batch,
        "I": np.arange(1.0, n + 1) * 10 if intensity is None else intensity,
        "SIGI": np.ones(n) if sigma is None else sigma,
        **extra,
    }
    ds = rs.DataSet(columns, spacegroup=spacegroup, cell=cell, merged=False)
    return ds.astype({"H": "HKL", "K": "HKL", "L": "HKL", "BATCH": "Batch", "I": "Intensity", "SIGI": "Stddev"})


def assert_contiguous_from_zero(ids):
    unique = np.unique(np.asarray(ids))
    np.testing.assert_array_equal(unique, np.arange(len(unique)))


# --------------------------------------------------------------------------- every file


@pytest.mark.realdata
def test_every_reflection_file_of_the_data_folder_is_listed(data_dir):
    found = {p.relative_to(data_dir).as_posix() for p in data_dir.rglob("*") if p.is_file()}
    assert found - NOT_REFLECTION_FILES == set(REFLECTION_FILES)


@pytest.mark.realdata
@pytest.mark.parametrize("name", sorted(REFLECTION_FILES))
def test_every_real_file_reads_into_an_observation_table(read, name):
    X = read(name, **REFLECTION_FILES[name])
    assert len(X) > 0
    assert set(TABLE_COLUMNS) <= set(X.columns)
    assert list(X.index) == list(range(len(X)))
    assert X.spacegroup is not None and X.cell is not None
    assert_contiguous_from_zero(X["image_id"])
    assert (X["file_id"].to_numpy() == 0).all()
    assert (X["SIGIobs"].to_numpy() > 0).all()
    assert np.isfinite(X["Iobs"].to_numpy()).all()


# --------------------------------------------------------------------------- committed numbers


@pytest.mark.realdata
def test_hypf_counts(read):
    X = read(HYPF)
    assert len(X) == 57_725
    assert X["image_id"].nunique() == 84
    assert X["asu_index"].nunique() == 9_105


@pytest.mark.realdata
def test_hypf_anomalous_unique_count(read):
    X = read(HYPF, anomalous=True)
    assert len(X) == 57_725
    assert X["asu_index"].nunique() == 16_795


@pytest.mark.realdata
def test_thermolysin_counts(read):
    X = read(THERMOLYSIN)
    assert len(X) == 136_308
    assert X["image_id"].nunique() == 395


@pytest.mark.realdata
def test_pyp_two_files_count_and_file_ids(read):
    X = read(PYP)
    assert len(X) == 96_124
    assert sorted(np.unique(X["file_id"].to_numpy())) == [0, 1]
    assert (X["file_id"] == 0).sum() == 48_069


@pytest.mark.realdata
def test_pyp_two_files_have_separate_contiguous_image_ids(read):
    X = read(PYP)
    image, file_id = X["image_id"].to_numpy(), X["file_id"].to_numpy()
    np.testing.assert_array_equal(np.unique(image[file_id == 0]), np.arange(20))
    np.testing.assert_array_equal(np.unique(image[file_id == 1]), np.arange(20, 40))


@pytest.mark.realdata
def test_brap_three_files_have_separate_contiguous_image_ids(read):
    X = read(BRAP)
    image, file_id = X["image_id"].to_numpy(), X["file_id"].to_numpy()
    assert sorted(np.unique(file_id)) == [0, 1, 2]
    for f in range(3):
        np.testing.assert_array_equal(np.unique(image[file_id == f]), np.arange(180 * f, 180 * (f + 1)))


@pytest.mark.realdata
def test_image_id_follows_original_image_order_within_each_file(read):
    X = read(BRAP)
    for f in range(3):
        part = X[X["file_id"] == f]
        batch = part["BATCH"].to_numpy()
        image = part["image_id"].to_numpy()
        # image_id - first id is the dense rank of the original batch number
        rank = np.unique(batch, return_inverse=True)[1].ravel()
        np.testing.assert_array_equal(image - image.min(), rank)


@pytest.mark.realdata
def test_file_order_not_batch_numbers_orders_image_ids(read):
    # rm has batches 4001.. and pk 1001..; given rm first, rm still gets the first ids.
    X = read([BRAP[2], BRAP[0]])
    image, file_id = X["image_id"].to_numpy(), X["file_id"].to_numpy()
    assert image[file_id == 0].max() < image[file_id == 1].min()
    assert X.loc[X["file_id"] == 0, "BATCH"].min() == 4001


# --------------------------------------------------------------------------- agreement with rs


@pytest.fixture(scope="module", params=[(name, anom) for name in MTZ_FILES for anom in (False, True)],
                ids=lambda p: f"{p[0]}-{'anomalous' if p[1] else 'merged_friedel'}")
def with_rs(request, read, data_dir):
    """X and reciprocalspaceship's view of the same file: its rows with absences
    removed, mapped to the ASU, with CENTRIC, EPSILON and dHKL."""
    name, anomalous = request.param
    X = read(name, anomalous=anomalous)
    ds = rs_read_mtz(data_dir / name)
    n_file = len(ds)
    ds = ds.remove_absences()
    mapped = ds.hkl_to_asu(anomalous=anomalous).label_centrics().compute_multiplicity().compute_dHKL()
    expected = SimpleNamespace(
        hkl=mapped.get_hkls(),
        centric=mapped["CENTRIC"].to_numpy(bool),
        epsilon=mapped["EPSILON"].to_numpy(int),
        dHKL=mapped["dHKL"].to_numpy(float),
    )
    return SimpleNamespace(name=name, X=X, expected=expected, n_file=n_file, observed_hkl=ds.get_hkls())


@pytest.mark.realdata
def test_rows_are_the_files_rows_minus_absences_in_file_order(with_rs):
    X = with_rs.X
    np.testing.assert_array_equal(X[["Hobs", "Kobs", "Lobs"]].to_numpy(), with_rs.observed_hkl)
    if with_rs.name.startswith(("hypf", "thermolysin", "pyp")):
        # these files hold no systematic absences: nothing may be filtered
        assert len(X) == with_rs.n_file


@pytest.mark.realdata
def test_asu_hkl_matches_reciprocalspaceship(with_rs):
    X, expected = with_rs.X, with_rs.expected
    np.testing.assert_array_equal(X[["H", "K", "L"]].to_numpy(), expected.hkl)


@pytest.mark.realdata
def test_centric_flag_matches_reciprocalspaceship(with_rs):
    X, expected = with_rs.X, with_rs.expected
    np.testing.assert_array_equal(X["CENTRIC"].to_numpy(bool), expected.centric)


@pytest.mark.realdata
def test_epsilon_matches_reciprocalspaceship(with_rs):
    X, expected = with_rs.X, with_rs.expected
    np.testing.assert_array_equal(X["EPSILON"].to_numpy(int), expected.epsilon)


@pytest.mark.realdata
def test_dhkl_matches_reciprocalspaceship(with_rs):
    X, expected = with_rs.X, with_rs.expected
    np.testing.assert_allclose(X["dHKL"].to_numpy(float), expected.dHKL, rtol=1e-5)


@pytest.mark.realdata
def test_asu_index_is_dense_id_of_asu_hkl(with_rs):
    X = with_rs.X
    hkl = X[["H", "K", "L"]].to_numpy().astype(np.int64) + 512
    key = (hkl[:, 0] * 1024 + hkl[:, 1]) * 1024 + hkl[:, 2]  # one integer per (H, K, L)
    ids = X["asu_index"].to_numpy()
    assert_contiguous_from_zero(ids)
    # the same reflection always gets the same id, and different reflections different ids
    pairs = np.unique(ids.astype(np.int64) * 2**31 + key)
    assert len(pairs) == len(np.unique(ids)) == len(np.unique(key))


# --------------------------------------------------------------------------- columns and keys


@pytest.mark.realdata
def test_first_intensity_column_is_used_by_default(read, data_dir):
    # The DIALS export lists IPR/SIGIPR before I/SIGI.
    X = read(DIALS_MTZ)
    ds = rs_read_mtz(data_dir / DIALS_MTZ).remove_absences()
    np.testing.assert_array_equal(X["Iobs"].to_numpy(), ds["IPR"].to_numpy(np.float32))
    np.testing.assert_array_equal(X["SIGIobs"].to_numpy(), ds["SIGIPR"].to_numpy(np.float32))
    assert "IPR" not in X.columns and "SIGIPR" not in X.columns
    # the other intensity is kept as metadata
    np.testing.assert_array_equal(X["I"].to_numpy(), ds["I"].to_numpy())


@pytest.mark.realdata
def test_intensity_key_overrides_detection(read, data_dir):
    X = read(DIALS_MTZ, intensity_key="I")
    ds = rs_read_mtz(data_dir / DIALS_MTZ).remove_absences()
    np.testing.assert_array_equal(X["Iobs"].to_numpy(), ds["I"].to_numpy(np.float32))
    np.testing.assert_array_equal(X["SIGIobs"].to_numpy(), ds["SIGI"].to_numpy(np.float32))
    assert "IPR" in X.columns and "SIGIPR" in X.columns


@pytest.mark.realdata
def test_metadata_columns_keep_values_and_mtz_dtypes(read, data_dir):
    X = read(DIALS_MTZ)
    ds = rs_read_mtz(data_dir / DIALS_MTZ).remove_absences()
    for column in ("XDET", "YDET", "BATCH", "ROT", "LP", "FRACTIONCALC"):
        assert str(X[column].dtype) == str(ds[column].dtype), column
        np.testing.assert_array_equal(X[column].to_numpy(), ds[column].to_numpy(), err_msg=column)
    assert str(X["BATCH"].dtype) == "Batch"
    assert str(X["XDET"].dtype) == "MTZReal"


@pytest.mark.realdata
def test_table_columns_come_first_with_canonical_names_and_dtypes(read):
    X = read(HYPF)
    assert list(X.columns[: len(TABLE_COLUMNS)]) == list(TABLE_COLUMNS)
    assert str(X["Iobs"].dtype) == "Intensity"
    assert str(X["SIGIobs"].dtype) == "Stddev"
    assert str(X["image_id"].dtype) == "Batch"
    assert all(str(X[c].dtype) == "HKL" for c in ("H", "K", "L", "Hobs", "Kobs", "Lobs"))


@pytest.mark.realdata
def test_sigma_column_with_other_name_is_found(read, data_dir):
    # PYP and thermolysin name it SigI
    X = read(PYP[0])
    ds = rs_read_mtz(data_dir / PYP[0])
    np.testing.assert_array_equal(X["SIGIobs"].to_numpy(), ds["SigI"].to_numpy(np.float32))


def test_explicit_sigma_and_image_keys_are_used():
    ds = small_dataset([[1, 1, 1], [1, 2, 1], [2, 1, 1]], [1, 1, 2], SIGX=np.array([2.0, 3.0, 4.0]),
                       FRAME=np.array([7, 5, 5]))
    X = skmerge.read_unmerged(ds, sigma_key="SIGX", image_key="FRAME")
    np.testing.assert_array_equal(X["SIGIobs"].to_numpy(), [2.0, 3.0, 4.0])
    np.testing.assert_array_equal(X["image_id"].to_numpy(), [1, 0, 0])


# --------------------------------------------------------------------------- filters


@pytest.mark.realdata
def test_dmin_drops_exactly_the_rows_beyond_it(read):
    full, cut = read(HYPF), read(HYPF, dmin=3.0)
    d = full["dHKL"].to_numpy()
    assert 0 < (d < 3.0).sum() < len(full)
    assert len(cut) == (d >= 3.0).sum()
    assert cut["dHKL"].min() >= 3.0
    kept = full[d >= 3.0]
    np.testing.assert_array_equal(cut[["Hobs", "Kobs", "Lobs"]].to_numpy(), kept[["Hobs", "Kobs", "Lobs"]].to_numpy())
    np.testing.assert_array_equal(cut["Iobs"].to_numpy(), kept["Iobs"].to_numpy())


@pytest.mark.realdata
def test_isigi_cutoff_drops_weak_rows(read, data_dir):
    ds = rs_read_mtz(data_dir / HYPF)
    ratio = ds["I"].to_numpy(np.float64) / ds["SIGI"].to_numpy(np.float64)
    X = read(HYPF, isigi_cutoff=2.0)
    assert 0 < (ratio < 2.0).sum() < len(ds)
    assert len(X) == (ratio >= 2.0).sum()
    assert (X["Iobs"].to_numpy(np.float64) / X["SIGIobs"].to_numpy(np.float64) >= 2.0).all()


def test_isigi_cutoff_on_small_data():
    ds = small_dataset([[1, 1, 1], [1, 2, 1], [2, 1, 1], [2, 2, 1]], [1, 1, 1, 1],
                       intensity=np.array([10.0, 1.0, -5.0, 3.0]), sigma=np.array([1.0, 1.0, 1.0, 1.0]))
    X = skmerge.read_unmerged(ds, isigi_cutoff=3.0)
    np.testing.assert_array_equal(X["Iobs"].to_numpy(), [10.0, 3.0])


def test_dmin_on_small_data():
    # cell 40, 50, 60: d(2,0,0)=20, d(0,0,20)=3, d(20,0,0)=2
    ds = small_dataset([[2, 0, 0], [0, 0, 20], [20, 0, 0]], [1, 1, 1])
    X = skmerge.read_unmerged(ds, dmin=2.5)
    np.testing.assert_array_equal(X[["Hobs", "Kobs", "Lobs"]].to_numpy(), [[2, 0, 0], [0, 0, 20]])


def test_systematic_absences_are_removed():
    # P 21 21 21: 00l with l odd is absent
    ds = small_dataset([[0, 0, 1], [0, 0, 2], [1, 2, 3], [3, 0, 0]], [1, 1, 1, 1])
    X = skmerge.read_unmerged(ds)
    np.testing.assert_array_equal(X[["Hobs", "Kobs", "Lobs"]].to_numpy(), [[0, 0, 2], [1, 2, 3]])
    np.testing.assert_array_equal(X["Iobs"].to_numpy(), [20.0, 30.0])


# --------------------------------------------------------------------------- image_id


def test_image_ids_are_contiguous_and_ordered_by_file_then_image():
    a = small_dataset([[1, 1, 1], [1, 2, 1], [2, 1, 1], [2, 2, 1]], [9, 5, 2, 5])
    b = small_dataset([[1, 1, 1], [1, 2, 1], [2, 1, 1]], [2, 1, 2])
    X = skmerge.read_unmerged([a, b])
    # file 0: 2→0, 5→1, 9→2; file 1: 1→3, 2→4 (batch 2 of file 1 is not batch 2 of file 0)
    np.testing.assert_array_equal(X["image_id"].to_numpy(), [2, 1, 0, 1, 4, 3, 4])
    np.testing.assert_array_equal(X["file_id"].to_numpy(), [0, 0, 0, 0, 1, 1, 1])


def test_image_ids_stay_contiguous_after_filters_drop_an_image():
    # image 5 holds only an absent reflection: the ids of the others close the gap
    ds = small_dataset([[1, 1, 1], [0, 0, 1], [2, 1, 1]], [1, 5, 9])
    X = skmerge.read_unmerged(ds)
    np.testing.assert_array_equal(X["image_id"].to_numpy(), [0, 1])


def test_anomalous_negates_friedel_minus_acentrics_only():
    # P 21 21 21: (1,2,3) is acentric; (-1,-2,-3) is its Friedel mate; (1,2,0) is centric
    ds = small_dataset([[1, 2, 3], [-1, -2, -3], [1, 2, 0], [-1, -2, 0]], [1, 1, 1, 1])
    X = skmerge.read_unmerged(ds, anomalous=True)
    np.testing.assert_array_equal(X[["H", "K", "L"]].to_numpy(), [[1, 2, 3], [-1, -2, -3], [1, 2, 0], [1, 2, 0]])
    assert X["asu_index"].nunique() == 3
    Y = skmerge.read_unmerged(ds, anomalous=False)
    assert Y["asu_index"].nunique() == 2


# --------------------------------------------------------------------------- in-memory inputs


def test_an_observation_table_read_again_keeps_its_observed_indices():
    # Its H, K, L are the ASU's; its Hobs, Kobs, Lobs the Friedel signs the beam needs.
    from skmerge.geometry import recorded_as_stills

    X, _ = skmerge.datasets.make_unmerged(n_images=8, stills=True, random_state=0)
    again = skmerge.read_unmerged(X)
    np.testing.assert_array_equal(again[["Hobs", "Kobs", "Lobs"]].to_numpy(), X[["Hobs", "Kobs", "Lobs"]].to_numpy())
    np.testing.assert_array_equal(again[["H", "K", "L"]].to_numpy(), X[["H", "K", "L"]].to_numpy())
    assert recorded_as_stills(again)


def test_plain_dataframe_without_mtz_dtypes_is_read_by_column_names():
    frame = pd.DataFrame({"H": [1, 2, 3], "K": [1, 1, 1], "L": [1, 1, 1], "BATCH": [5, 5, 6],
                          "I": [1.0, 2.0, 3.0], "SIGI": [0.5, 0.5, 0.5], "XDET": [1.0, 2.0, 3.0]})
    X = skmerge.read_unmerged(frame, spacegroup="P 21 21 21", cell=(40, 50, 60, 90, 90, 90))
    np.testing.assert_array_equal(X["Iobs"].to_numpy(), [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(X["image_id"].to_numpy(), [0, 0, 1])
    np.testing.assert_array_equal(X["XDET"].to_numpy(), [1.0, 2.0, 3.0])


def test_observation_table_can_be_read_again():
    ds = small_dataset([[1, 2, 3], [-1, -2, 3], [2, 1, 1]], [3, 1, 2])
    X = skmerge.read_unmerged(ds)
    again = skmerge.read_unmerged(X)
    columns = ["H", "K", "L", "asu_index", "image_id", "Iobs", "SIGIobs"]
    assert again[columns].equals(X[columns])


def test_image_column_named_image_is_used():
    ds = small_dataset([[1, 1, 1], [2, 1, 1], [3, 1, 1]], [1, 1, 1]).rename(columns={"BATCH": "image"})
    X = skmerge.read_unmerged(ds.assign(image=np.array([5, 5, 6])))
    np.testing.assert_array_equal(X["image_id"].to_numpy(), [0, 0, 1])


def test_unmerged_mtz_without_repeated_reflections_reads(tmp_path):
    ds = small_dataset([[1, 1, 1], [-2, -1, -1], [3, 1, 1]], [1, 1, 2])
    path = tmp_path / "one_still.mtz"
    ds.write_mtz(str(path))
    assert "M/ISYM" in [c.label for c in gemmi.read_mtz_file(str(path)).columns]
    X = skmerge.read_unmerged(path)
    np.testing.assert_array_equal(X[["Hobs", "Kobs", "Lobs"]].to_numpy(), [[1, 1, 1], [-2, -1, -1], [3, 1, 1]])
