"""The HTML report (skmerge.report): written by every run, and by ``skmerge report OUT``
from skmerge's or careless's files; self-contained, with every section."""

import base64
import contextlib
import io
import json
import re
import shutil

import html5lib
import numpy as np
import pandas as pd
import pytest
import reciprocalspaceship as rs

from skmerge.cli import main
from skmerge.datasets import make_unmerged
from skmerge.errors import InputError
from skmerge.report import RunOutputs, image_table, report_html

SECTIONS = ("run", "statistics", "correlations", "signal", "wilson", "images", "history", "calibration", "anomalous")
FIGURES = SECTIONS[2:]
MAX_BYTES = 5 * 2**20
PNG = b"\x89PNG\r\n\x1a\n"


def _write_unmerged(X, path):
    columns = {"H": X["Hobs"], "K": X["Kobs"], "L": X["Lobs"], "BATCH": X["BATCH"], "I": X["Iobs"],
               "SIGI": X["SIGIobs"], "XDET": X["XDET"], "YDET": X["YDET"]}
    data = rs.DataSet({k: np.asarray(v) for k, v in columns.items()}, cell=X.cell, spacegroup=X.spacegroup,
                      merged=False)
    data = data.astype({"H": "HKL", "K": "HKL", "L": "HKL", "BATCH": "Batch", "I": "Intensity", "SIGI": "Stddev",
                        "XDET": "MTZReal", "YDET": "MTZReal"})
    data.set_index(["H", "K", "L"]).hkl_to_asu().write_mtz(str(path))
    return path


def _run(argv):
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()) as err:
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """An anomalous two-file run (separate files: CCdiff) with half-dataset merges and a
    test set, through ``skmerge mono``."""
    X, _ = make_unmerged(n_images=16, anomalous=True, time_points=2, random_state=2)
    directory = tmp_path_factory.mktemp("report_run")
    files = [str(_write_unmerged(X[X["file_id"].to_numpy() == i], directory / f"t{i}.mtz")) for i in (0, 1)]
    argv = ["mono", "--anomalous", "--separate-files", "--merge-half-datasets", "--test-fraction", "0.1",
            "--iterations", "10", "--mlp-layers", "1", "--mlp-width", "4", "--shells", "4", "--quiet",
            "dHKL,XDET,YDET,BATCH", *files, str(directory / "sim")]
    code, _, err = _run(argv)
    assert code == 0, err
    return directory / "sim"


def check_self_contained(path):
    """Parse the report strictly and check that nothing is fetched from outside it; its
    html5lib tree."""
    raw = path.read_bytes()
    assert len(raw) < MAX_BYTES
    document = html5lib.HTMLParser(strict=True, namespaceHTMLElements=False).parse(raw.decode("utf-8"))
    images = document.findall(".//img")
    assert images, "the report has figures"
    for image in images:
        source = image.get("src")
        assert source.startswith("data:image/png;base64,"), source[:60]
        assert base64.b64decode(source.split(",", 1)[1])[:8] == PNG
    for element in document.iter():
        for attribute in ("src", "href", "action", "data", "poster"):
            value = element.get(attribute) or ""
            assert not re.match(r"\s*([a-z]+:)?//", value, re.I), f"<{element.tag} {attribute}={value[:60]}>"
            if attribute == "href":
                assert value == "" or value.startswith("#"), value
    assert not [s for s in document.iter("script") if s.get("src")]
    assert not document.findall(".//link")
    assert not re.search(r"https?://|url\(|@import", raw.decode("utf-8"))
    return document


def _sections(document):
    return {s.get("id"): s for s in document.iter("section")}


def _text(element):
    return "".join(element.itertext())


def test_every_run_writes_a_self_contained_report(run):
    path = run.with_name("sim_report.html")
    document = check_self_contained(path)
    sections = _sections(document)
    assert tuple(sections) == SECTIONS
    for key in FIGURES:
        assert sections[key].findall(".//img"), f"section {key} has its figure"
    run_text = _text(sections["run"])
    assert "skmerge mono --anomalous --separate-files" in run_text and str(run) in run_text
    for package in ("skmerge", "Python", "TensorFlow", "TensorFlow Probability", "reciprocalspaceship", "gemmi"):
        assert re.search(rf"{package}\s*\d", run_text), package
    tables = sections["statistics"].findall(".//table")
    assert len(tables) == 2, "one table per data set"
    headings = [_text(th) for th in tables[1].iter("th")]
    assert {"CC1/2", "CCanom", "CCpred", "CCdiff"} <= set(headings)
    overall = [_text(td) for td in tables[1].findall(".//tr")[-1]]
    assert overall[0] == "overall" and -1 <= float(overall[headings.index("CCdiff")]) <= 1, "CCdiff of file 1"
    assert "#held out" in _text(sections["calibration"])
    assert len(sections["calibration"].findall(".//img")) == 2, "z histogram and interval coverage"


def test_report_command_remakes_the_report_of_a_run(run, tmp_path):
    for path in run.parent.glob("sim*"):
        shutil.copy(path, tmp_path)
    (tmp_path / "sim_report.html").unlink()
    saved = json.loads((tmp_path / "sim_stats.json").read_text())
    saved["run"]["versions"]["gemmi"] = "0.0.1-of-the-run"
    (tmp_path / "sim_stats.json").write_text(json.dumps(saved))
    code, out, err = _run(["report", str(tmp_path / "sim")])
    assert code == 0, err
    assert out.strip() == str(tmp_path / "sim_report.html")
    document = check_self_contained(tmp_path / "sim_report.html")
    sections = _sections(document)
    assert tuple(sections) == SECTIONS and not document.findall(".//p[@class='note']")
    assert "skmerge mono --anomalous" in _text(sections["run"]), "the command saved in OUT_stats.json"
    assert "gemmi0.0.1-of-the-run" in _text(sections["run"]), "the versions of the run, not of the report"
    assert saved["run"]["warnings"], "10 steps are too few: the run warns"
    assert [_text(p) for p in sections["run"].findall(".//p[@class='warning']")] == [
        f"warning: {w}" for w in saved["run"]["warnings"]], "the run's warnings"
    code, _, err = _run(["report", str(tmp_path / "sim"), "-o", str(tmp_path / "elsewhere.html")])
    assert code == 0 and (tmp_path / "elsewhere.html").stat().st_size > 0, err


def _careless_layout(run, directory):
    """skmerge's outputs under careless's names and columns: no OUT_stats.json, no Z,
    Weight or Scale, SigF/SigI names, careless's history columns."""
    def careless_names(table):
        return table.rename(columns={c: "Sig" + c[3:] for c in table.columns if c.startswith("SIG")})

    for i in (0, 1):
        careless_names(rs.read_mtz(f"{run}_{i}.mtz")).drop(columns=["F", "SigF", "I", "SigI", "N", "DANO", "SigDANO"]
                                                           ).write_mtz(str(directory / f"c_{i}.mtz"))
        careless_names(rs.read_mtz(f"{run}_xval_{i}.mtz")).write_mtz(str(directory / f"c_xval_{i}.mtz"))
        predictions = rs.read_mtz(f"{run}_predictions_{i}.mtz").drop(columns=["Z", "Weight", "Scale", "SIGScale"])
        careless_names(predictions).write_mtz(str(directory / f"c_predictions_{i}.mtz"))
    history = pd.read_csv(f"{run}_history.csv").rename(columns={"nll": "NLL", "kl": "F KLDiv"})
    history.assign(loss_val=history["loss"] * 1.01).to_csv(directory / "c_history.csv", index=False)
    return directory / "c"


def test_report_of_careless_outputs(run, tmp_path):
    out = _careless_layout(run, tmp_path)
    code, _, err = _run(["report", str(out)])
    assert code == 0, err
    document = check_self_contained(tmp_path / "c_report.html")
    sections = _sections(document)
    assert tuple(sections) == SECTIONS
    for key in ("correlations", "signal", "wilson", "images", "history", "anomalous"):
        assert sections[key].findall(".//img"), f"section {key} has its figure from careless's files"
    assert "CCanom" in _text(sections["statistics"]) and "CCdiff" in _text(sections["statistics"])
    assert "did not record its command line (careless outputs)" in _text(sections["run"])
    assert "no scale, outlier counts" in _text(sections["images"])
    assert not sections["calibration"].findall(".//img") and "no calibration" in _text(sections["calibration"])


def test_report_skips_the_sections_of_missing_files(run, tmp_path):
    shutil.copy(f"{run}_history.csv", tmp_path / "h_history.csv")
    page = report_html(tmp_path / "h")
    document = html5lib.HTMLParser(strict=True, namespaceHTMLElements=False).parse(page)
    sections = _sections(document)
    assert sections["history"].findall(".//img")
    for key in ("statistics", "correlations", "signal", "wilson", "images", "calibration", "anomalous"):
        assert not sections[key].findall(".//img") and sections[key].find(".//p[@class='note']") is not None, key


def test_report_of_no_run_is_an_error(tmp_path):
    with pytest.raises(InputError, match="no outputs of a run under"):
        RunOutputs.from_files(tmp_path / "nothing")
    code, _, err = _run(["report", str(tmp_path / "nothing")])
    assert code == 2 and "skmerge: error: no outputs of a run" in err and "OUT prefix" in err
    assert not list(tmp_path.iterdir()), "no report written"
    (tmp_path / "bad_stats.json").write_text("{}")
    with pytest.raises(InputError, match="not a skmerge statistics file"):
        RunOutputs.from_files(tmp_path / "bad")


def test_image_table_and_wilson_b(run):
    predictions = rs.read_mtz(f"{run}_predictions_0.mtz")
    table = image_table(predictions)
    assert table.index.tolist() == sorted(set(predictions["image_id"]))
    assert table["n_obs"].sum() == len(predictions) and (table["cc_pred"] > 0.5).all()
    assert np.allclose(table["scale"], pd.Series(predictions["Scale"].to_numpy(float)).groupby(
        predictions["image_id"].to_numpy()).median())
    from skmerge.analysis import wilson_b

    fit = wilson_b(rs.read_mtz(f"{run}_0.mtz"))
    assert fit.shells["n"].sum() > 0 and 0 < fit.b < 60, "the simulated B is 15 Å²"


@pytest.mark.realdata
def test_hypf_report_is_small_and_self_contained(data_dir, tmp_path):
    out = tmp_path / "hypf"
    code, _, err = _run(["mono", "--anomalous", "--merge-half-datasets", "--test-fraction", "0.05", "--iterations",
                         "200", "--quiet", "dHKL,Hobs,Kobs,Lobs,XDET,YDET,BATCH",
                         str(data_dir / "hypf_hg_sad" / "hypf_unmerged.mtz"), str(out)])
    assert code == 0, err
    document = check_self_contained(tmp_path / "hypf_report.html")
    sections = _sections(document)
    for key in FIGURES:
        assert sections[key].findall(".//img"), key
    flagged = json.loads((tmp_path / "hypf_stats.json").read_text())["datasets"][0]["calibration"]["flagged_images"]
    listed = [_text(row.find("td")) for row in sections["images"].findall(".//tbody/tr")]
    assert listed == [str(i) for i in flagged]


def test_python_run_report_and_a_report_that_fails(tmp_path, monkeypatch):
    import skmerge
    import skmerge.report

    X, _ = make_unmerged(n_images=4, random_state=0)
    result = skmerge.run_merge(X, tmp_path / "py", metadata=["dHKL"], max_iter=5, mlp_layers=1, mlp_width=4,
                               log=lambda *line: None)
    sections = _sections(check_self_contained(tmp_path / "py_report.html"))
    assert "Run from Python" in _text(sections["run"]) and "max_iter=5" in _text(sections["run"])
    assert "no calibration" in _text(sections["calibration"]) and "Not an anomalous run" in _text(
        sections["anomalous"])

    def broken(*args, **kwargs):
        raise ValueError("no figure")

    monkeypatch.setattr(skmerge.report, "report_html", broken)
    with pytest.warns(UserWarning, match=r"report could not be made \(ValueError: no figure\); again_report.html"):
        paths = result.write(tmp_path / "again")
    assert {"again_0.mtz", "again_stats.json"} <= {p.name for p in paths}
    assert not (tmp_path / "again_report.html").exists()


def test_report_of_a_run_with_an_indexing_ambiguity(run, tmp_path):
    # The run's files plus the reindexing table an ambiguous run writes.
    import shutil

    for path in run.parent.glob(run.name + "*"):
        shutil.copy(path, tmp_path / path.name)
    pd.DataFrame({"image_id": [0, 1, 2], "operator": ["h,k,l", "-h-k,k,-l", "h,k,l"],
                  "probability": [1.0, 0.93, 1.0]}).to_csv(tmp_path / f"{run.name}_reindexing.csv", index=False)
    code, _, err = _run(["report", str(tmp_path / run.name)])
    assert code == 0, err
    sections = _sections(check_self_contained(tmp_path / f"{run.name}_report.html"))
    assert tuple(sections) == SECTIONS + ("reindexing",)
    text = _text(sections["reindexing"])
    assert "-h-k,k,-l" in text and "0.930" in text, "the operators and the uncertain image are shown"
