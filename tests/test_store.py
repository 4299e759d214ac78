"""Tests of observation stores (:mod:`skmerge.store`), parallel reading and ``skmerge convert``."""

import shutil
import warnings

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

import skmerge
from skmerge.cli import main
from skmerge.errors import DamagedFileError, DataWarning, InputError
from skmerge.store import StoreWriter, read_manifest, write_store

FORMATS = {"formats/XDS_ASCII.HKL": {}, "formats/INTEGRATE.HKL": {}, "formats/crystfel.stream":
           {"spacegroup": "P 43 21 2"}, "formats/integrated.refl": {}, "formats/dials_export_small.mtz": {}}


def raw_files(n_files=2, n_images=8, seed=0):
    """Unmerged data sets as a reader returns them: observed H, K, L, BATCH, I, SIGI and
    metadata, with the rows of the second file shuffled (not in image order)."""
    X, _ = skmerge.datasets.make_unmerged(n_images=n_images * n_files, cell=(30, 35, 40, 90, 90, 90), dmin=3.0,
                                          random_state=seed)
    raws = []
    for i in range(n_files):
        rows = X[(X["BATCH"] > i * n_images) & (X["BATCH"] <= (i + 1) * n_images)]
        raw = rows[["Hobs", "Kobs", "Lobs", "BATCH", "Iobs", "SIGIobs", "XDET", "YDET"]].rename(
            columns={"Hobs": "H", "Kobs": "K", "Lobs": "L", "Iobs": "I", "SIGIobs": "SIGI"})
        if i % 2:
            raw = raw.sample(frac=1.0, random_state=seed)
        raw = raw.reset_index(drop=True)
        raw.spacegroup, raw.cell = X.spacegroup, X.cell
        raws.append(raw)
    return raws


@pytest.fixture(scope="module")
def raws():
    return raw_files()


@pytest.fixture(scope="module")
def mtz_files(raws, tmp_path_factory):
    folder = tmp_path_factory.mktemp("mtz")
    paths = []
    for i, raw in enumerate(raws):
        path = folder / f"file{i}.mtz"
        raw.infer_mtz_dtypes().write_mtz(str(path))
        paths.append(str(path))
    return paths


@pytest.mark.parametrize("anomalous", [False, True])
def test_store_reads_back_the_table_of_its_files(raws, tmp_path, anomalous):
    store = write_store(raws, tmp_path / "s.parquet", anomalous=anomalous, dmin=3.5, row_group_size=500)
    expected = skmerge.read_unmerged(raws, anomalous=anomalous, dmin=3.5)
    pd.testing.assert_frame_equal(skmerge.read_unmerged(store, anomalous=anomalous), expected, check_exact=True)
    again = skmerge.read_unmerged(store, anomalous=not anomalous)
    pd.testing.assert_frame_equal(again, skmerge.read_unmerged(raws, anomalous=not anomalous, dmin=3.5),
                                  check_exact=True)
    manifest = read_manifest(store)
    assert manifest["spacegroup"] == expected.spacegroup.xhm()
    assert manifest["observations"] == len(expected)
    assert manifest["images"] == expected["image_id"].nunique()
    assert manifest["reflections"] == expected["asu_index"].nunique() if anomalous else True
    assert [f["observations"] for f in manifest["files"]] == np.bincount(expected["file_id"]).tolist()


def test_row_groups_hold_whole_images_in_image_order(raws, tmp_path):
    store = write_store(raws, tmp_path / "s.parquet", row_group_size=50)
    for entry in read_manifest(store)["files"]:
        parquet = pq.ParquetFile(store / entry["part"])
        assert parquet.num_row_groups > 2
        groups = [parquet.read_row_group(i, columns=["image_id"]).column(0).to_numpy()
                  for i in range(parquet.num_row_groups)]
        assert all((np.diff(g) >= 0).all() for g in groups)
        assert all(a[-1] < b[0] for a, b in zip(groups, groups[1:]))
        assert all(len(g) >= 50 for g in groups[:-1])


def test_read_unmerged_with_store_writes_it_and_returns_the_table(raws, tmp_path):
    X = skmerge.read_unmerged(raws, store=tmp_path / "s.parquet")
    pd.testing.assert_frame_equal(X, skmerge.read_unmerged(raws), check_exact=True)
    assert read_manifest(tmp_path / "s.parquet")["observations"] == len(X)


def test_parallel_reading_equals_serial_reading(mtz_files, tmp_path):
    serial = skmerge.read_unmerged(mtz_files)
    pd.testing.assert_frame_equal(skmerge.read_unmerged(mtz_files, n_jobs=2), serial, check_exact=True)
    store = write_store(mtz_files, tmp_path / "s.parquet", n_jobs=2)
    pd.testing.assert_frame_equal(skmerge.read_unmerged(store), serial, check_exact=True)


@pytest.mark.parametrize("n_jobs", [0, 1.5, "2"])
def test_bad_n_jobs_is_an_input_error(raws, n_jobs):
    with pytest.raises(InputError, match="n_jobs"):
        skmerge.read_unmerged(raws, n_jobs=n_jobs)


def test_repeated_rows_are_reported_from_the_worker(raws):
    doubled = pd.concat([raws[0], raws[0].iloc[:5]], ignore_index=True)
    doubled.spacegroup, doubled.cell = raws[0].spacegroup, raws[0].cell
    with pytest.warns(DataWarning, match="5 of"):
        X = skmerge.read_unmerged([doubled])
    assert len(X) == len(skmerge.read_unmerged([raws[0]]))


def test_failed_conversion_leaves_nothing_and_keeps_the_old_store(raws, tmp_path):
    store = write_store(raws[:1], tmp_path / "s.parquet")
    before = skmerge.read_unmerged(store)
    bad = raws[1].copy()
    bad.cell = None
    with pytest.raises(InputError, match="no unit cell"):
        write_store([raws[0], bad], store)
    pd.testing.assert_frame_equal(skmerge.read_unmerged(store), before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.parquet"]
    write_store(raws, store)  # a store is replaced by a complete new one
    assert read_manifest(store)["observations"] > len(before)


def test_damaged_and_foreign_stores_are_named(raws, tmp_path):
    store = write_store(raws, tmp_path / "s.parquet")
    (store / read_manifest(store)["files"][1]["part"]).unlink()
    with pytest.raises(DamagedFileError, match="observations-00001.parquet"):
        skmerge.read_unmerged(store)
    (store / "reflections.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DamagedFileError, match="reflections.parquet"):
        skmerge.read_unmerged(store)
    foreign = tmp_path / "foreign.parquet"
    foreign.mkdir()
    with pytest.raises(InputError, match="not an skmerge observation store"):
        skmerge.read_unmerged(foreign)
    shutil.rmtree(foreign)
    pd.DataFrame({"H": [1]}).to_parquet(foreign)
    with pytest.raises(InputError, match="not an skmerge observation store"):
        skmerge.read_unmerged(foreign)
    with pytest.raises(InputError, match="no such observation store"):
        skmerge.read_unmerged(tmp_path / "missing.parquet")
    with pytest.raises(InputError, match="exists and is not an observation store"):
        write_store(raws, foreign)


def test_a_store_is_read_alone_and_without_read_options(raws, tmp_path):
    store = write_store(raws, tmp_path / "s.parquet")
    with pytest.raises(InputError, match="read on its own"):
        skmerge.read_unmerged([store, raws[0]])
    with pytest.raises(InputError, match="dmin were applied"):
        skmerge.read_unmerged(store, dmin=3.0)


def test_writer_keeps_images_of_chunks_apart_and_in_order(raws, tmp_path):
    X = skmerge.read_unmerged(raws[:1])
    from skmerge.table import ReadOptions, parse_part

    part = parse_part(0, raws[0], ReadOptions())
    batches = np.array_split(np.unique(part.table["image_id"]), 3)
    with StoreWriter(tmp_path / "c.parquet", anomalous=False, row_group_size=30) as writer:
        with writer.file(0, "chunks", "table", part.cell, part.spacegroup) as file:
            for images in batches:
                file.write(part.table[part.table["image_id"].isin(images)].reset_index(drop=True))
        writer.commit(part.spacegroup, part.cell, ReadOptions())
    pd.testing.assert_frame_equal(skmerge.read_unmerged(tmp_path / "c.parquet"), X, check_exact=True)


def test_convert_command_writes_a_store(mtz_files, tmp_path, capsys):
    assert main(["convert", "--quiet", "--dmin", "3.5", *mtz_files, str(tmp_path / "c.parquet")]) == 0
    pd.testing.assert_frame_equal(skmerge.read_unmerged(tmp_path / "c.parquet"),
                                  skmerge.read_unmerged(mtz_files, dmin=3.5), check_exact=True)
    assert main(["convert", mtz_files[0], str(tmp_path / "missing" / "c.parquet")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.realdata
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_every_format_converts_to_the_same_table(data_dir, tmp_path, name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        expected = skmerge.read_unmerged(data_dir / name, **FORMATS[name])
        store = write_store(data_dir / name, tmp_path / "s.parquet", **FORMATS[name])
    pd.testing.assert_frame_equal(skmerge.read_unmerged(store), expected, check_exact=True)


@pytest.mark.parametrize("laue", [False, True])
def test_simulator_writes_the_table_it_returns(tmp_path, laue):
    options = dict(n_images=12, cell=(30, 35, 40, 90, 90, 90), dmin=3.0, laue=laue, time_points=2, random_state=4)
    X, truth = skmerge.datasets.make_unmerged(**options)
    store, stored_truth = skmerge.datasets.make_unmerged(**options, store=tmp_path / "one.parquet", chunk_images=12)
    pd.testing.assert_frame_equal(skmerge.read_unmerged(store), X, check_exact=True)
    pd.testing.assert_frame_equal(stored_truth.merged, truth.merged, check_exact=True)
    # In chunks of images: the same crystal and the first pass's observations, other noise.
    store, chunked_truth = skmerge.datasets.make_unmerged(**options, store=tmp_path / "chunks.parquet",
                                                          chunk_images=5)
    chunked = skmerge.read_unmerged(store)
    chunked, X = chunked[chunked["file_id"] == 0], X[X["file_id"] == 0]
    for column in ("Hobs", "Kobs", "Lobs", "image_id", "file_id", "dHKL", "XDET"):
        np.testing.assert_array_equal(chunked[column].to_numpy(), X[column].to_numpy())
    assert not np.array_equal(chunked["Iobs"].to_numpy(), X["Iobs"].to_numpy())
    assert np.corrcoef(chunked["Iobs"].to_numpy(float), X["Iobs"].to_numpy(float))[0, 1] > 0.9
    first = truth.merged[truth.merged["file_id"] == 0]
    pd.testing.assert_frame_equal(chunked_truth.merged[chunked_truth.merged["file_id"] == 0], first, check_exact=True)
    assert pq.ParquetFile(store / "observations-00000.parquet").num_row_groups == 1


def test_image_batches_cover_the_table_once_in_random_whole_images(raws, tmp_path):
    from skmerge.store import iter_image_batches

    store = write_store(raws, tmp_path / "s.parquet", row_group_size=40)
    X = skmerge.read_unmerged(store)
    batches = list(iter_image_batches(store, 3, buffer_images=5, random_state=0))
    assert all(b["image_id"].nunique() <= 3 for b in batches)
    assert sum(b["image_id"].nunique() for b in batches) == X["image_id"].nunique() == len(batches) * 3 - 2
    first_images = [int(b["image_id"].min()) for b in batches]
    assert first_images != sorted(first_images)
    together = pd.concat(batches, ignore_index=True)
    together = together.iloc[np.argsort(together["image_id"].to_numpy(), kind="stable")].reset_index(drop=True)
    expected = X.iloc[np.argsort(X["image_id"].to_numpy(), kind="stable")].reset_index(drop=True)
    pd.testing.assert_frame_equal(together, expected, check_exact=True)


def test_the_workflow_names_the_files_of_a_store(mtz_files, tmp_path):
    from skmerge.workflow import _observations

    store = write_store(mtz_files, tmp_path / "s.parquet")
    X, names = _observations(str(store), False, {})
    assert names == ["file0.mtz", "file1.mtz"]
    assert X["file_id"].nunique() == 2
