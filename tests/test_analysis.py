"""The analysis commands (skmerge ccpred, isigi, rsplit, completeness, bfactor,
apply-bfactor, filter-images, plot-history, xds2mtz, stream2mtz) on the outputs of one
short merge of simulated data with a scrambled image, in skmerge's layout and renamed to
careless's; the converters on small generated files (and the real ones when present)."""

import dataclasses
import io
import gemmi
import numpy as np
import pandas as pd
import pytest
import reciprocalspaceship as rs

import skmerge
from skmerge import analysis
from skmerge.cli import main
from skmerge.datasets import make_unmerged

from _hostile import write_stream, write_xds

SCRAMBLED_IMAGE = 5  # its intensities are shuffled: unrelated to the model
# A wide rotation per image, so that reflections are measured several times and a fit
# cannot follow the scrambled image's intensities.
SIMULATION = dict(n_images=12, anomalous=True, dmin=3.5, spacegroup="P 41 21 2", cell=(40, 40, 60, 90, 90, 90),
                  oscillation=6.0, random_state=0)
FAST = dict(metadata=["dHKL", "XDET", "YDET"], mlp_layers=2, mlp_width=4, max_iter=50, random_state=0,
            anomalous=True, half_datasets=1, test_fraction=0.1, log=lambda level, message: None)
FRIEDEL_MEANS = ("F", "SIGF", "I", "SIGI", "N", "DANO", "SIGDANO")
CARELESS_NAMES = {"SIGScale": "SigScale", "SIGIobs": "SigIobs", "SIGIpred": "SigIpred", "SIGF": "SigF", "SIGI": "SigI",
                  "SIGF(+)": "SigF(+)", "SIGF(-)": "SigF(-)", "SIGI(+)": "SigI(+)", "SIGI(-)": "SigI(-)"}


def _unmerged_file(X, path):
    table = rs.DataSet({"H": X["Hobs"], "K": X["Kobs"], "L": X["Lobs"], "BATCH": X["BATCH"] + 101,
                        "I": X["Iobs"], "SIGI": X["SIGIobs"], "XDET": X["XDET"], "YDET": X["YDET"]},
                       cell=X.cell, spacegroup=X.spacegroup, merged=False)
    table = table.astype({"H": "HKL", "K": "HKL", "L": "HKL", "BATCH": "Batch", "I": "Intensity",
                          "SIGI": "Stddev", "XDET": "MTZReal", "YDET": "MTZReal"})
    table.set_index(["H", "K", "L"]).hkl_to_asu().write_mtz(str(path))
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A merge of 12 simulated images (one scrambled) written under run/sim, the
    unmerged file it read, and the scrambled image's number in that file."""
    folder = tmp_path_factory.mktemp("analysis")
    X, _ = make_unmerged(**SIMULATION)
    X = X.copy()
    scrambled = (X["image_id"] == SCRAMBLED_IMAGE).to_numpy()
    X.loc[scrambled, "Iobs"] = np.random.default_rng(0).permutation(X.loc[scrambled, "Iobs"].to_numpy())
    unmerged = _unmerged_file(X, folder / "unmerged.mtz")
    (folder / "run").mkdir()
    skmerge.run_merge(str(unmerged), str(folder / "run" / "sim"), **FAST)
    return folder / "run" / "sim", unmerged, int(X.loc[scrambled, "BATCH"].iloc[0]) + 101


@pytest.fixture(scope="module")
def careless_run(run, tmp_path_factory):
    """The same outputs in careless 0.5.4's layout: its Sig names; anomalous merges with
    the Friedel columns only; predictions without M/ISYM (written as if merged) and
    without Z and Weight; its history columns."""
    out, _, _ = run
    prefix = tmp_path_factory.mktemp("careless") / "merge"
    for suffix in ("_0.mtz", "_xval_0.mtz"):
        table = rs.read_mtz(f"{out}{suffix}")
        table.drop(columns=[c for c in FRIEDEL_MEANS if c in table.columns]).rename(columns=CARELESS_NAMES).write_mtz(
            f"{prefix}{suffix}")
    predictions = rs.read_mtz(f"{out}_predictions_0.mtz").drop(columns=["Z", "Weight", "PARTIAL"])
    predictions.merged = True
    predictions.rename(columns=CARELESS_NAMES).write_mtz(f"{prefix}_predictions_0.mtz")
    history = pd.read_csv(f"{out}_history.csv").rename(columns={"nll": "NLL", "kl": "F KLDiv"})
    history.insert(1, "Grad Norm", 1.0)
    history["NLL_val"] = history["NLL"]
    history.to_csv(f"{prefix}_history.csv", index=False)
    return prefix


def _command(capsys, *argv):
    status = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_ccpred_names_the_scrambled_image_and_writes_its_tables(run, tmp_path, capsys):
    out, _, _ = run
    status, text, _ = _command(capsys, "ccpred", out, "--csv", tmp_path / "shells.csv", "--image-csv",
                               tmp_path / "images.csv", "--plot", tmp_path / "ccpred.png")
    assert status == 0
    last = text.strip().splitlines()[-1]
    assert last.startswith("1 bad image(s) (CCpred more than ") and last.endswith(f"): {SCRAMBLED_IMAGE}")
    shells = pd.read_csv(tmp_path / "shells.csv")
    images = pd.read_csv(tmp_path / "images.csv").set_index("image_id")
    assert list(shells.columns) == ["data_set", "shell", "d_max", "d_min", "n_train", "cc_train", "n_test", "cc_test"]
    assert shells["shell"].tolist()[-1] == "overall" and len(shells) == 11
    assert images.loc[SCRAMBLED_IMAGE, "ccpred"] < 0.3 < images.drop(index=SCRAMBLED_IMAGE)["ccpred"].min()
    assert images["n_obs"].sum() == shells["n_train"].iloc[-1] + shells["n_test"].iloc[-1]
    assert (tmp_path / "ccpred.png").read_bytes()[:4] == b"\x89PNG"


def test_ccpred_names_an_unrelated_image_not_a_weak_one():
    """Weak images (stills with few strong spots) have a low CCpred because their noise is
    large, not because they are wrong: the rule compares each image with the CCpred its
    noise allows, which for honest noise is its CCpred."""
    rng = np.random.default_rng(0)
    per_image, n_images, weak, unrelated = 300, 40, [3, 17, 29], 11
    image = np.repeat(np.arange(n_images), per_image)
    ipred = rng.exponential(100.0, len(image))
    sigma = np.where(np.isin(image, weak), 60.0, 10.0)
    iobs = ipred + sigma * rng.normal(size=len(image))
    rows = image == unrelated
    iobs[rows] = rng.exponential(100.0, rows.sum()) + 10.0 * rng.normal(size=rows.sum())
    predictions = rs.DataSet({"H": rng.integers(1, 30, len(image)), "K": rng.integers(0, 30, len(image)), "L": 1,
                              "Iobs": iobs, "SIGIobs": sigma, "Ipred": ipred, "image_id": image},
                             cell=gemmi.UnitCell(60, 60, 60, 90, 90, 90)).set_index(["H", "K", "L"])
    report = analysis.ccpred_report(predictions)
    images = report.images
    # The weak images' CCpred are far below the others' (the old rule, 4 robust SDs and 0.1
    # below the median image, named them) and at their ceiling.
    assert images.loc[weak, "ccpred"].max() < images["ccpred"].median() - analysis.BAD_IMAGE_MARGIN
    np.testing.assert_allclose(images.drop(index=unrelated)["ccpred"], images.drop(index=unrelated)["ceiling"],
                               atol=0.03)
    assert report.bad_images == [unrelated]
    assert report.to_string().splitlines()[-1].startswith("1 bad image(s) (CCpred more than ")
    assert set(analysis.ccpred_report(predictions, below=0.9).bad_images) == {unrelated, *weak}


def test_ccpred_overall_test_value_is_the_stats_tables(run):
    out, _, _ = run
    predictions = analysis.read_run_table(f"{out}_predictions_0.mtz", "predictions")
    report = analysis.ccpred_report(predictions)
    statistics, _ = skmerge.workflow.statistics_from_outputs(out)
    assert report.shells.loc["overall", "cc_test"] == pytest.approx(
        statistics[0].table.loc["overall", "cc_pred"], abs=1e-6)


def test_careless_layout_gives_the_same_tables(run, careless_run, capsys):
    out, _, _ = run
    for command in ("ccpred", "isigi", "rsplit", "completeness", "bfactor"):
        status, ours, _ = _command(capsys, command, out)
        assert status == 0, command
        status, theirs, err = _command(capsys, command, careless_run)
        assert status == 0, (command, err)
        if command == "isigi":
            continue
        # Same numbers; only the file names in the titles differ. careless's anomalous
        # merges lack the Friedel-mean columns, which are derived from F(±).
        assert ours.replace("sim", "merge") == theirs, command
    # The Friedel means and SIGDANO derived from F(±) of careless's layout cannot know the
    # halves' correlation (the double-Wilson tie, and the sandwich's extra variance, which
    # the halves share), so they take the halves as independent: the same counts, the
    # derived means more confident than skmerge's own, the derived DANO less.
    ours, theirs = (analysis.isigi_table(analysis.read_run_table(f"{prefix}_0.mtz")) for prefix in (out, careless_run))
    assert list(ours.index) == list(theirs.index)
    np.testing.assert_array_equal(ours[["n", "n_anom"]].to_numpy(), theirs[["n", "n_anom"]].to_numpy())
    assert (ours["mean_isigi"] <= theirs["mean_isigi"] * 1.001).all()
    assert (ours["mean_danosig"] >= theirs["mean_danosig"] * 0.999).all()


def test_isigi_rsplit_completeness_and_bfactor_tables(run, capsys):
    out, _, _ = run
    isigi = analysis.isigi_table(analysis.read_run_table(f"{out}_0.mtz"))
    assert isigi["mean_isigi"].iloc[0] > isigi["mean_isigi"].iloc[-2] > 0  # falls with resolution
    assert "mean_danosig" in isigi.columns and (isigi["n_anom"] <= isigi["n"]).all()
    rsplit = analysis.rsplit_table(analysis.read_run_table(f"{out}_xval_0.mtz", "xval"))
    from skmerge.stats import standardise_columns

    # The half-dataset file is in careless's anomalous layout (Friedel columns only).
    halves, _ = standardise_columns(rs.read_mtz(f"{out}_xval_0.mtz"))
    halves = halves[(halves["N"] > 0) & halves["I"].notna()]
    pairs = halves[halves["half"] == 0][["I"]].join(halves[halves["half"] == 1][["I"]], rsuffix="2", how="inner")
    a, b = pairs["I"].to_numpy(float), pairs["I2"].to_numpy(float)
    assert rsplit.loc["overall", "n"] == len(pairs)
    assert rsplit.loc["overall", "rsplit"] == pytest.approx(np.abs(a - b).sum() / (a + b).sum() * 2 / np.sqrt(2))
    amplitudes = analysis.rsplit_table(analysis.read_run_table(f"{out}_xval_0.mtz", "xval"), column="F")
    assert amplitudes.loc["overall", "rsplit"] < rsplit.loc["overall", "rsplit"]
    completeness = analysis.completeness_table(analysis.read_run_table(f"{out}_0.mtz"))
    assert {"completeness", "anom_completeness"} <= set(completeness.columns)
    assert completeness[["completeness", "anom_completeness"]].stack().between(0.05, 1).all()
    status, text, _ = _command(capsys, "completeness", f"{out}_0.mtz", "--shells", "4")
    assert status == 0 and text.count("\n") == 7 and "anom_completeness" in text


def _wilson_table(b, seed=0):
    cell, sg = gemmi.UnitCell(50, 50, 50, 90, 90, 90), gemmi.SpaceGroup("P 21 21 21")
    hkl = rs.utils.generate_reciprocal_asu(cell, sg, 1.8)
    d = cell.calculate_d_array(hkl)
    _, epsilon = skmerge.symmetry.reflection_flags(hkl, sg)
    intensity = epsilon * np.exp(-b / (2 * d**2)) * np.random.default_rng(seed).exponential(1000, len(d))
    table = rs.DataSet({"H": hkl[:, 0], "K": hkl[:, 1], "L": hkl[:, 2], "I": intensity, "SIGI": 1.0,
                        "F": np.sqrt(intensity), "SIGF": 0.1, "N": 2}, cell=cell, spacegroup=sg, merged=True)
    return table.set_index(["H", "K", "L"]).infer_mtz_dtypes()


def test_wilson_plot_of_data_reaching_low_resolution_is_drawn():
    from skmerge.plotting import plot_wilson

    # The shells of a few serial stills (thermolysin): a first shell from 34 to 8 Å, at
    # 1/d² = 0.007, where the autoscale margin alone puts 1/d² < 0 on the axis.
    fit = analysis.wilson_b(_wilson_table(30.0))
    shells = fit.shells.copy()
    shells["inv_d2"] = np.linspace(0.3, 0.007, len(shells))[::-1]
    figure = plot_wilson({"x": dataclasses.replace(fit, shells=shells)})
    left, _ = figure.axes[0].get_xlim()
    assert 0 < left < 0.007
    figure.savefig(io.BytesIO(), format="png")


def test_bfactor_recovers_b_and_apply_bfactor_adds_it(tmp_path, capsys):
    merged = _wilson_table(30.0)
    assert analysis.wilson_b(merged).b == pytest.approx(30.0, abs=1.5)
    merged.write_mtz(str(tmp_path / "w.mtz"))
    status, text, _ = _command(capsys, "apply-bfactor", tmp_path / "w.mtz", tmp_path / "sharp.mtz", "--b", "-20")
    assert status == 0 and "applied to I, F, SIGI, SIGF of" in text
    status, text, _ = _command(capsys, "bfactor", tmp_path / "sharp.mtz", "--csv", tmp_path / "wilson.csv")
    assert status == 0
    b = float(text.split("Wilson B = ")[1].split()[0])
    assert b == pytest.approx(analysis.wilson_b(merged).b - 20, abs=0.05)
    sharp = rs.read_mtz(str(tmp_path / "sharp.mtz"))
    np.testing.assert_allclose(sharp["I"].to_numpy(), sharp["F"].to_numpy() ** 2, rtol=1e-4)
    assert set(pd.read_csv(tmp_path / "wilson.csv").columns) >= {"log_intensity", "fitted", "used"}


def test_filter_images_by_ccpred_and_by_number(run, tmp_path, capsys):
    out, unmerged, batch_of_scrambled = run
    source = rs.read_mtz(str(unmerged))
    status, text, _ = _command(capsys, "filter-images", unmerged, tmp_path / "good.mtz", "--ccpred-below", "0.5",
                               "--predictions", f"{out}_predictions_0.mtz")
    assert status == 0 and f"observations of 1 image(s) ({batch_of_scrambled})" in text
    good = rs.read_mtz(str(tmp_path / "good.mtz"))
    assert set(good["BATCH"]) == set(source["BATCH"]) - {batch_of_scrambled}
    assert len(good) == (source["BATCH"] != batch_of_scrambled).sum()
    assert list(good.columns) == list(source.columns)
    assert len(skmerge.read_unmerged(tmp_path / "good.mtz")) == len(good)
    first_two = sorted(set(source["BATCH"]))[:2]
    status, _, _ = _command(capsys, "filter-images", unmerged, tmp_path / "two.mtz", "--images", *first_two)
    assert status == 0 and set(rs.read_mtz(str(tmp_path / "two.mtz"))["BATCH"]) == set(source["BATCH"]) - set(first_two)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.mtz", "two.mtz"]  # no temporary left


@pytest.mark.parametrize("argv, culprit", [
    (["filter-images", "{unmerged}", "{tmp}/x.mtz", "--images", "7"], "unmerged.mtz: image(s) 7 are not in the "
     "file's BATCH column"),
    (["filter-images", "{unmerged}", "{tmp}/x.mtz", "--ccpred-below", "0.5"], "--predictions"),
    (["filter-images", "{unmerged}", "{tmp}/x.mtz", "--ccpred-below", "0.5", "--predictions", "{tmp}/noipred.mtz"],
     "noipred.mtz: the predictions table has no column Ipred"),
    (["ccpred", "{tmp}/noipred.mtz"], "noipred.mtz: the predictions table has no column Ipred"),
    (["ccpred", "{tmp}/nothing"], "no predictions file {tmp}/nothing_predictions_0.mtz"),
    (["isigi", "{out}_predictions_0.mtz"], "holds unmerged observations"),
    (["rsplit", "{out}_0.mtz"], "has no column 'repeat'"),
    (["apply-bfactor", "{out}_0.mtz", "{tmp}/nodir/x.mtz", "--b", "5"], "nodir"),
    (["stream2mtz", "{unmerged}", "{tmp}/x.mtz", "--spacegroup", "P 1"], "is a mtz file, not crystfel"),
])
def test_errors_exit_with_one_line_naming_the_culprit(run, tmp_path, capsys, argv, culprit):
    out, unmerged, _ = run
    predictions = rs.read_mtz(f"{out}_predictions_0.mtz")
    predictions.drop(columns="Ipred").write_mtz(str(tmp_path / "noipred.mtz"))
    names = dict(out=out, unmerged=unmerged, tmp=tmp_path)
    status, _, err = _command(capsys, *[a.format(**names) for a in argv])
    assert status == 2
    assert err.startswith("skmerge: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert culprit.format(**names) in err


def test_stats_and_analyses_find_the_run_from_a_trailing_slash_or_its_directory(run, capsys, monkeypatch):
    out, _, _ = run
    status, expected, _ = _command(capsys, "stats", out)
    assert status == 0
    monkeypatch.chdir(out.parent)
    for given in ("sim/", "./", f"{out.parent}/", str(out.parent)):
        status, text, err = _command(capsys, "stats", given)
        assert (status, err) == (0, ""), given
        assert text == expected
        assert _command(capsys, "isigi", given)[0] == 0
    (out.parent / "empty").mkdir()
    status, _, err = _command(capsys, "stats", "empty/")
    assert status == 2 and "empty/: a directory without the outputs of a run" in err


def test_plot_history_of_skmerge_and_careless_files(run, careless_run, tmp_path, capsys):
    out, _, _ = run
    status, text, _ = _command(capsys, "plot-history", out, "-o", tmp_path / "ours.png", "--csv", tmp_path / "h.csv")
    assert status == 0 and (tmp_path / "ours.png").read_bytes()[:4] == b"\x89PNG"
    steps = len(pd.read_csv(f"{out}_history.csv"))
    assert f"{steps} steps" in text and len(pd.read_csv(tmp_path / "h.csv")) == steps
    history = analysis.read_history(f"{careless_run}_history.csv")
    assert list(history.columns) == ["step", "Grad Norm", "loss", "nll", "kl", "NLL_val"]
    assert _command(capsys, "plot-history", careless_run)[0] == 0
    assert careless_run.with_name("merge_history.png").is_file()


def _assert_same_observations(converted, direct):
    assert len(converted) == len(direct) > 0
    for column in direct.columns:
        expected, found = direct[column].to_numpy(), converted[column].to_numpy()
        if expected.dtype.kind == "f" or found.dtype.kind == "f":
            np.testing.assert_allclose(found.astype(float), expected.astype(float), rtol=1e-6, err_msg=column)
        else:
            np.testing.assert_array_equal(found, expected, err_msg=column)


@pytest.mark.parametrize("name, write, command, options", [
    ("XDS_ASCII.HKL", write_xds, "xds2mtz", {}),
    ("crystals.stream", write_stream, "stream2mtz", {"spacegroup": "P 21 21 21"}),
])
def test_converters_round_trip(tmp_path, capsys, name, write, command, options):
    source = write(tmp_path / name)
    flags = ["--spacegroup", options["spacegroup"]] if options else []
    status, text, _ = _command(capsys, command, source, tmp_path / "out.mtz", *flags)
    assert status == 0 and "wrote" in text
    _assert_same_observations(skmerge.read_unmerged(tmp_path / "out.mtz"), skmerge.read_unmerged(source, **options))
    mtz = gemmi.read_mtz_file(str(tmp_path / "out.mtz"))
    assert {"M/ISYM": "Y", "BATCH": "B", "I": "J", "SIGI": "Q"}.items() <= {c.label: c.type for c in mtz.columns}.items()


def test_converter_without_cell_asks_for_one(tmp_path, capsys):
    source = write_xds(tmp_path / "XDS_ASCII.HKL")
    source.write_text("".join(line for line in source.read_text().splitlines(True)
                              if not line.startswith("!UNIT_CELL")))
    status, _, err = _command(capsys, "xds2mtz", source, tmp_path / "out.mtz")
    assert status == 2 and "XDS_ASCII.HKL: the reflections have no unit cell" in err
    assert _command(capsys, "xds2mtz", source, tmp_path / "out.mtz", "--cell", 40, 50, 60, 90, 90, 90)[0] == 0


@pytest.mark.realdata
@pytest.mark.parametrize("name, command, options", [
    ("XDS_ASCII.HKL", "xds2mtz", {}), ("INTEGRATE.HKL", "xds2mtz", {}),
    ("crystfel.stream", "stream2mtz", {"spacegroup": "P 43 21 2"}),
])
def test_converters_round_trip_real_files(data_dir, tmp_path, capsys, name, command, options):
    source = data_dir / "formats" / name
    flags = ["--spacegroup", options["spacegroup"]] if options else []
    assert _command(capsys, command, source, tmp_path / "out.mtz", *flags)[0] == 0
    _assert_same_observations(skmerge.read_unmerged(tmp_path / "out.mtz"), skmerge.read_unmerged(source, **options))
