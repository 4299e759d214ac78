"""Tests of the XDS, CrystFEL and DIALS readers.

Tests marked ``realdata`` read the real files in ``../shared/data/formats`` (beside the
repository) and are skipped when that folder is missing; the others build small files of
their own.
"""

import json
from pathlib import Path

import gemmi
import msgpack
import numpy as np
import pandas as pd
import pytest

from skmerge.errors import InputError
from skmerge.io.crystfel import read_crystfel
from skmerge.io.dials import read_dials
from skmerge.io.xds import read_xds
from skmerge.shadows import detector_columns
from _xds import XSCALE_HEADER

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "formats"
LYSOZYME_CELL = (79.336, 79.336, 37.797, 90.0, 90.0, 90.0)


@pytest.fixture
def formats():
    """The folder of real test files; skips the test when it is missing."""
    if not DATA.is_dir():
        pytest.skip(f"real test data not found at {DATA}")
    return DATA


def assert_contract(ds, intensity="I", sigma="SIGI"):
    """What every reader promises, checked on one returned data set."""
    assert list(ds.index.names) == ["H", "K", "L"]
    assert all(str(dtype) == "HKL" for dtype in ds.index.dtypes)
    assert str(ds["BATCH"].dtype) == "Batch"
    assert str(ds[intensity].dtype) == "Intensity"
    assert str(ds[sigma].dtype) == "Stddev"
    assert ds.merged is False
    assert isinstance(ds.cell, gemmi.UnitCell)
    assert isinstance(ds.spacegroup, gemmi.SpaceGroup)
    assert not ds.isna().to_numpy().any()
    for name in ds.columns[ds.dtypes.astype(str) == "Stddev"]:
        assert (ds[name].to_numpy() > 0).all(), name
    others = ds.columns.drop(["BATCH", intensity, sigma, "I", "SIGI"], errors="ignore")
    assert all(str(ds[name].dtype) == "MTZReal" for name in others), ds.dtypes
    assert len(ds) > 0


# --------------------------------------------------------------------------- XDS


def xds_data_lines(path):
    """The reflection lines of an XDS file, split into numbers, by a plain text parse."""
    lines = Path(path).read_text().splitlines()
    rows = [line.split() for line in lines if not line.startswith("!")]
    return np.array(rows, dtype=float)


@pytest.mark.realdata
def test_xds_ascii_contract_counts_and_header(formats):
    ds = read_xds(formats / "XDS_ASCII.HKL")
    assert_contract(ds)
    rows = xds_data_lines(formats / "XDS_ASCII.HKL")
    assert len(ds) == (rows[:, 4] > 0).sum()  # negative sigma marks rejected rows
    assert len(ds) < len(rows)
    assert ds.cell.parameters == pytest.approx(LYSOZYME_CELL)
    assert ds.spacegroup.number == 96
    assert list(ds.columns) == ["BATCH", "I", "SIGI", "XD", "YD", "ZD", "RLP", "PEAK",
                                "CORR", "PSI"]
    kept = rows[rows[:, 4] > 0]
    np.testing.assert_allclose(ds["PSI"].to_numpy(), kept[:, 11], atol=1e-4)


@pytest.mark.realdata
@pytest.mark.parametrize("name", ["XDS_ASCII.HKL", "INTEGRATE.HKL"])
def test_xds_batch_is_the_image_gemmi_assigns(formats, name):
    ds = read_xds(formats / name)
    mtz = gemmi.read_xds_ascii(str(formats / name)).to_mtz()
    table = pd.DataFrame(mtz.array, columns=mtz.column_labels())
    expected = table.loc[table["FLAG"] == 0, "BATCH"].astype(int)  # FLAG 64: sigma < 0
    assert sorted(ds["BATCH"].to_numpy()) == sorted(expected)
    z = ds["ZD" if name == "XDS_ASCII.HKL" else "ZCAL"].to_numpy()
    np.testing.assert_array_equal(ds["BATCH"].to_numpy(), np.floor(z).astype(int) + 1)


@pytest.mark.realdata
@pytest.mark.parametrize("name, positions", [("XDS_ASCII.HKL", ("XD", "YD")), ("INTEGRATE.HKL", ("XOBS", "YOBS"))])
def test_xds_spots_have_detector_positions_for_the_shadow_search(formats, name, positions):
    assert detector_columns(read_xds(formats / name)) == positions


@pytest.mark.realdata
def test_integrate_hkl_keeps_every_column(formats):
    ds = read_xds(formats / "INTEGRATE.HKL")
    assert_contract(ds)
    rows = xds_data_lines(formats / "INTEGRATE.HKL")
    assert len(ds) == (rows[:, 4] > 0).sum()
    assert list(ds.columns[3:]) == ["XCAL", "YCAL", "ZCAL", "RLP", "PEAK", "CORR", "MAXC",
                                    "XOBS", "YOBS", "ZOBS", "ALF0", "BET0", "ALF1", "BET1",
                                    "PSI", "ISEG"]
    assert ds.cell.parameters == pytest.approx((79.395, 79.395, 37.84, 90, 90, 90))
    assert ds.spacegroup.number == 96




def write_xscale(path, rows, end=True):
    """An XSCALE-like unmerged XDS_ASCII file with the given (h, k, l, I, sig, zd, iset)."""
    body = "".join(
        f" {h} {k} {l} {i:.3E} {s:.3E} 100.0 200.0 {zd:.1f} 0.5 100 80 1.0 {iset}\n"
        for h, k, l, i, s, zd, iset in rows
    )
    path.write_text(XSCALE_HEADER + body + ("!END_OF_DATA\n" if end else ""))
    return path


def test_xds_data_sets_of_xscale_do_not_share_images(tmp_path):
    rows = [(1, 2, 3, 10.0, 1.0, 0.5, 1), (1, 2, 4, 20.0, 2.0, 9.9, 1),
            (1, 2, 5, 30.0, 3.0, 0.5, 2), (1, 2, 6, 40.0, -4.0, 3.5, 2)]
    ds = read_xds(write_xscale(tmp_path / "XSCALE.HKL", rows))
    assert_contract(ds)
    assert len(ds) == 3  # the negative sigma is a rejection
    assert ds["BATCH"].tolist() == [1, 10, 10001]
    assert ds["ISET"].tolist() == [1, 1, 2]


def test_xds_truncated_file_is_an_input_error(tmp_path):
    rows = [(1, 2, 3, 10.0, 1.0, 0.5, 1)]
    path = write_xscale(tmp_path / "XDS_ASCII.HKL", rows, end=False)
    with pytest.raises(InputError, match="XDS_ASCII.HKL"):
        read_xds(path)


def test_xds_merged_file_is_an_input_error(tmp_path):
    path = tmp_path / "merged.HKL"
    path.write_text(XSCALE_HEADER.replace("MERGE=FALSE", "MERGE=TRUE") + "!END_OF_DATA\n")
    with pytest.raises(InputError, match="merged"):
        read_xds(path)


# ---------------------------------------------------------------------- CrystFEL


def stream_crystals(path):
    """Per crystal, the sigmas of its reflection lines, by a plain text parse."""
    crystals, inside = [], False
    for line in Path(path).read_text().splitlines():
        if line.startswith("Reflections measured after indexing"):
            crystals.append([])
            inside = True
        elif line.startswith("End of reflections"):
            inside = False
        elif inside and not line.lstrip().startswith("h "):
            crystals[-1].append(float(line.split()[4]))
    return crystals


@pytest.mark.realdata
def test_crystfel_contract_counts_and_images(formats):
    path = formats / "crystfel.stream"
    ds = read_crystfel(path, spacegroup="P 43 21 2")
    assert_contract(ds)
    crystals = stream_crystals(path)
    assert len(crystals) == path.read_text().count("--- Begin crystal") == 3
    per_crystal = [sum(s > 0 for s in sigmas) for sigmas in crystals]
    assert len(ds) == sum(per_crystal)
    counts = ds["BATCH"].value_counts().sort_index()
    assert counts.index.tolist() == list(range(1, len(crystals) + 1))
    assert counts.tolist() == per_crystal
    assert ds.cell.parameters == pytest.approx((79.2, 79.2, 38.0, 90, 90, 90))
    assert ds.spacegroup.xhm() == "P 43 21 2"
    for name in ("XDET", "YDET", "EWALD_OFFSET", "S1X"):
        assert name in ds


@pytest.mark.realdata
def test_crystfel_requires_a_known_spacegroup(formats):
    with pytest.raises(InputError, match=r"crystfel\.stream.*spacegroup="):
        read_crystfel(formats / "crystfel.stream")
    with pytest.raises(InputError, match="crystfel.stream"):
        read_crystfel(formats / "crystfel.stream", spacegroup="P 7 7 7")
    assert read_crystfel(formats / "crystfel.stream", spacegroup=96).spacegroup.number == 96


@pytest.mark.realdata
def test_crystfel_without_target_cell_takes_the_symmetrized_mean(formats, tmp_path):
    text = (formats / "crystfel.stream").read_text()
    start, end = text.index("----- Begin unit cell"), text.index("----- End unit cell")
    path = tmp_path / "nocell.stream"
    path.write_text(text[:start] + text[end:].split("\n", 1)[1])
    ds = read_crystfel(path, spacegroup="P 43 21 2")
    a, b, c, alpha, beta, gamma = ds.cell.parameters
    # The three crystals' a and b (nm x 10), averaged over both axes: tetragonal a = b.
    axes = [79.385, 80.4039, 80.254, 80.6002, 79.5703, 80.62]
    assert a == b == pytest.approx(np.mean(axes))
    assert c == pytest.approx((38.5562 + 39.0409 + 38.6812) / 3)
    assert (alpha, beta, gamma) == (90, 90, 90)


def without_reflections_of_crystal(text, number):
    """Stream text with the reflection lines of crystal ``number`` (from 0) removed."""
    lines, crystal, skipping = [], -1, False
    for line in text.splitlines():
        skipping = skipping and not line.startswith("End of reflections")
        if not skipping:
            lines.append(line)
        if line.startswith("Reflections measured after indexing"):
            crystal += 1
        elif line.lstrip().startswith("h ") and crystal == number:
            skipping = True
    return "\n".join(lines) + "\n"


@pytest.mark.realdata
def test_crystfel_crystal_without_reflections_keeps_images_contiguous(formats, tmp_path):
    path = tmp_path / "empty_crystal.stream"
    text = (formats / "crystfel.stream").read_text()
    path.write_text(without_reflections_of_crystal(text, 1))
    ds = read_crystfel(path, spacegroup=96)
    assert len(stream_crystals(path)[1]) == 0
    assert sorted(ds["BATCH"].unique()) == [1, 2]


@pytest.mark.realdata
def test_crystfel_truncated_or_crystal_free_streams_are_input_errors(formats, tmp_path):
    text = (formats / "crystfel.stream").read_text()
    truncated = tmp_path / "truncated.stream"
    truncated.write_text(text[: len(text) // 2])
    with pytest.raises(InputError, match="truncated.stream.*truncated"):
        read_crystfel(truncated, spacegroup=96)
    no_crystals = tmp_path / "hits.stream"
    first_chunk_without_crystal = text[: text.index("--- Begin crystal")]
    no_crystals.write_text(first_chunk_without_crystal + "----- End chunk -----\n")
    with pytest.raises(InputError, match="hits.stream: no indexed crystals"):
        read_crystfel(no_crystals, spacegroup=96)


# ------------------------------------------------------------------------- DIALS

# DIALS reflection flags (dials/array_family/reflection_table.h).
INTEGRATED_SUM = 1 << 8
INTEGRATED_PRF = 1 << 9
OVERLOADED = 1 << 10
EXCLUDED_FOR_SCALING = 1 << 24


def decode_refl(path):
    """The flags, ids, variances, lp, qe and raw sums of a .refl, by their own decoding."""
    data = msgpack.unpackb(Path(path).read_bytes(), strict_map_key=False)[2]["data"]

    def column(name, dtype):
        return np.frombuffer(data[name][1][1], dtype=dtype)

    return {
        "flags": column("flags", "<u8"),
        "id": column("id", "<i4"),
        "value": column("intensity.sum.value", "<f8"),
        "variance": column("intensity.sum.variance", "<f8"),
        "lp": column("lp", "<f8"),
        "qe": column("qe", "<f8"),
    }


@pytest.mark.realdata
def test_dials_contract_counts_and_images(formats):
    ds = read_dials(formats / "integrated.refl")
    assert_contract(ds)
    refl = decode_refl(formats / "integrated.refl")
    bad = OVERLOADED | (1 << 14) | (7 << 22)
    mask = ((refl["flags"] & INTEGRATED_SUM) > 0) & ((refl["flags"] & bad) == 0)
    mask &= refl["variance"] > 0
    assert len(ds) == mask.sum() == 4482
    counts = ds["BATCH"].value_counts().sort_index()
    assert counts.index.tolist() == [1, 2, 3, 4, 5]  # five stills, BATCH = id + 1
    assert counts.tolist() == [(mask & (refl["id"] == i)).sum() for i in range(5)]
    corrected = refl["value"] * refl["lp"] / refl["qe"]
    np.testing.assert_allclose(ds["I"].to_numpy(), corrected[mask], rtol=1e-6, atol=1e-4)
    assert "IPR" not in ds  # stills have no profile-fitted intensities
    for name in ("XDET", "YDET", "ZDET", "BG", "LP", "QE", "PARTIALITY"):
        assert str(ds[name].dtype) == "MTZReal"


@pytest.mark.realdata
def test_dials_cell_and_spacegroup_come_from_the_experiments(formats):
    ds = read_dials(formats / "integrated.refl", formats / "integrated.expt")
    crystals = json.loads((formats / "integrated.expt").read_text())["crystal"]
    lengths = [np.linalg.norm(c["real_space_a"]) for c in crystals]
    assert ds.cell.a == pytest.approx(np.mean(lengths), rel=1e-6)
    assert ds.spacegroup.xhm() == "P 21 3"


@pytest.mark.realdata
def test_dials_needs_the_matching_experiment_list(formats, tmp_path):
    refl = tmp_path / "integrated.refl"
    refl.write_bytes((formats / "integrated.refl").read_bytes())
    with pytest.raises(InputError, match="integrated.expt.*expt_path="):
        read_dials(refl)
    with pytest.raises(InputError, match="crystfel.stream"):
        read_dials(refl, formats / "crystfel.stream")
    expt = json.loads((formats / "integrated.expt").read_text())
    for entry in expt["experiment"]:
        entry["identifier"] = "someone-else"
    (tmp_path / "integrated.expt").write_text(json.dumps(expt))
    with pytest.raises(InputError, match="not in the experiment list"):
        read_dials(refl)


@pytest.mark.realdata
def test_dials_truncated_table_is_an_input_error(formats, tmp_path):
    raw = (formats / "integrated.refl").read_bytes()
    path = tmp_path / "cut.refl"
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError, match="cut.refl: truncated"):
        read_dials(path, formats / "integrated.expt")


def write_refl(path, columns, identifiers):
    """A msgpack reflection table of ``{name: (DIALS type, array)}``."""
    nrows = len(next(iter(columns.values()))[1])
    data = {
        name: [kind, [nrows, np.ascontiguousarray(values).tobytes()]]
        for name, (kind, values) in columns.items()
    }
    content = {"identifiers": identifiers, "nrows": nrows, "data": data}
    path.write_bytes(msgpack.packb(["dials::af::reflection_table", 1, content]))
    return path


def write_scans_expt(path, image_ranges):
    """An experiment list of rotation scans of one cubic crystal (P 21 3, a = 96 Å)."""
    crystal = {"real_space_a": [96.0, 0, 0], "real_space_b": [0, 96.0, 0],
               "real_space_c": [0, 0, 96.0], "space_group_hall_symbol": " P 2ac 2ab 3"}
    document = {
        "experiment": [{"identifier": f"x{i}", "crystal": 0, "scan": i}
                       for i in range(len(image_ranges))],
        "crystal": [crystal],
        "scan": [{"image_range": list(r)} for r in image_ranges],
    }
    path.write_text(json.dumps(document))
    return path


def test_dials_rotation_scans_profile_first_and_flags(tmp_path):
    good = INTEGRATED_SUM | INTEGRATED_PRF
    flags = np.array([good, good, good, good | OVERLOADED, INTEGRATED_SUM,
                      good | EXCLUDED_FOR_SCALING, good], dtype="<u8")
    n = len(flags)
    z = np.array([0.2, 9.7, 0.5, 3.0, 3.0, 3.0, 4.5])
    ids = np.array([0, 0, 1, 0, 0, 0, -1], dtype="<i4")
    hkl = np.array([[1, 2, 3], [2, 3, 4], [3, 4, 5], [1, 1, 1], [2, 2, 2], [3, 3, 3],
                    [4, 4, 4]], dtype="<i4")
    columns = {
        "miller_index": ("cctbx::miller::index<>", hkl),
        "id": ("int", ids),
        "flags": ("std::size_t", flags),
        "xyzcal.px": ("vec3<double>", np.column_stack([np.full((n, 2), 5.0), z])),
        "intensity.sum.value": ("double", np.arange(n) + 10.0),
        "intensity.sum.variance": ("double", np.full(n, 4.0)),
        "intensity.prf.value": ("double", np.arange(n) + 20.0),
        "intensity.prf.variance": ("double", np.full(n, 9.0)),
        "lp": ("double", np.full(n, 0.5)),
        "entering": ("bool", np.zeros(n, dtype=bool)),
    }
    refl = write_refl(tmp_path / "integrated.refl", columns, {0: "x0", 1: "x1"})
    write_scans_expt(tmp_path / "integrated.expt", [(1, 10), (1, 10)])
    ds = read_dials(refl)
    assert_contract(ds, "IPR", "SIGIPR")
    assert list(ds.columns[:5]) == ["BATCH", "IPR", "SIGIPR", "I", "SIGI"]
    assert str(ds["I"].dtype) == "Intensity" and str(ds["SIGI"].dtype) == "Stddev"
    # Overloaded, summation-only, excluded and experiment-less rows are gone.
    assert ds.index.tolist() == [(1, 2, 3), (2, 3, 4), (3, 4, 5)]
    assert ds["BATCH"].tolist() == [1, 10, 11]  # the second scan starts after the first
    assert ds["IPR"].tolist() == [10.0, 10.5, 11.0]  # lp applied
    assert ds["SIGIPR"].tolist() == [1.5, 1.5, 1.5]
    assert ds["ZDET"].tolist() == pytest.approx([0.2, 9.7, 0.5])


def test_dials_scans_that_follow_each_other_keep_their_numbers(tmp_path):
    n = 2
    columns = {
        "miller_index": ("miller_index", np.array([[1, 2, 3], [1, 2, 4]], dtype="<i4")),
        "id": ("int", np.array([0, 1], dtype="<i4")),
        "flags": ("std::size_t", np.full(n, INTEGRATED_SUM, dtype="<u8")),
        "xyzcal.px": ("vec3<double>", np.array([[0, 0, 4.5], [0, 0, 14.5]])),
        "intensity.sum.value": ("double", np.ones(n)),
        "intensity.sum.variance": ("double", np.ones(n)),
    }
    refl = write_refl(tmp_path / "a.refl", columns, {})
    expt = write_scans_expt(tmp_path / "b.expt", [(1, 10), (11, 20)])
    assert read_dials(refl, expt)["BATCH"].tolist() == [5, 15]


def test_dials_different_space_groups_are_an_input_error(tmp_path):
    columns = {
        "miller_index": ("miller_index", np.array([[1, 2, 3]], dtype="<i4")),
        "id": ("int", np.array([0], dtype="<i4")),
        "flags": ("std::size_t", np.array([INTEGRATED_SUM], dtype="<u8")),
        "xyzcal.px": ("vec3<double>", np.zeros((1, 3))),
        "intensity.sum.value": ("double", np.ones(1)),
        "intensity.sum.variance": ("double", np.ones(1)),
    }
    refl = write_refl(tmp_path / "two.refl", columns, {})
    expt = write_scans_expt(tmp_path / "two.expt", [(1, 10), (1, 10)])
    document = json.loads(expt.read_text())
    document["crystal"].append(dict(document["crystal"][0], space_group_hall_symbol=" P 1"))
    document["experiment"][1]["crystal"] = 1
    expt.write_text(json.dumps(document))
    with pytest.raises(InputError, match="different space groups"):
        read_dials(refl, expt)


# ------------------------------------------------------------- shared failures

READERS = {
    "xds": read_xds,
    "crystfel": lambda path: read_crystfel(path, spacegroup="P 43 21 2"),
    "dials": read_dials,
}


@pytest.mark.parametrize("reader", READERS.values(), ids=READERS.keys())
def test_missing_empty_and_random_files_are_input_errors(reader, tmp_path):
    with pytest.raises(InputError, match="nothere.stream"):
        reader(tmp_path / "nothere.stream")
    empty = tmp_path / "empty.stream"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="empty.stream.*empty"):
        reader(empty)
    noise = tmp_path / "noise.stream"
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(InputError, match="noise.stream"):
        reader(noise)


@pytest.mark.realdata
@pytest.mark.parametrize(
    ("reader", "wrong"),
    [
        ("xds", "crystfel.stream"),
        ("xds", "integrated.refl"),
        ("crystfel", "XDS_ASCII.HKL"),
        ("crystfel", "integrated.expt"),
        ("dials", "integrated.expt"),
        ("dials", "INTEGRATE.HKL"),
        ("dials", "dials_export_small.mtz"),
    ],
)
def test_files_of_another_format_are_input_errors(formats, reader, wrong):
    with pytest.raises(InputError, match=wrong.replace(".", r"\.")):
        READERS[reader](formats / wrong)
