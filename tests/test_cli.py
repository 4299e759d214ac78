"""The command line: flags, outputs, statistics, errors.

Most runs call ``skmerge.cli.main`` in-process (TensorFlow is imported once per worker);
one version check and one real-data run go through the installed console script.
"""

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys

import gemmi
import joblib
import numpy as np
import pandas as pd
import pytest
import reciprocalspaceship as rs

import skmerge

from skmerge.cli import ESTIMATOR_DESTS, LAUE_DESTS, build_parser, main, merger_parameters
from skmerge.cli_flags import ESTIMATOR_DESTS as CARELESS_DESTS
from skmerge.datasets import make_unmerged

TINY = ["--iterations", "100", "--mlp-layers", "2", "--mlp-width", "8"]
MERGED_TYPES = {"F": "F", "SIGF": "Q", "I": "J", "SIGI": "Q", "N": "I"}
ANOMALOUS_TYPES = {
    **MERGED_TYPES,
    "F(+)": "G", "SIGF(+)": "L", "F(-)": "G", "SIGF(-)": "L", "I(+)": "K", "SIGI(+)": "M", "I(-)": "K",
    "SIGI(-)": "M", "N(+)": "I", "N(-)": "I", "DANO": "D", "SIGDANO": "Q",
}
PREDICTION_TYPES = {
    "M/ISYM": "Y", "Iobs": "J", "SigIobs": "Q", "Ipred": "J", "SigIpred": "Q", "Z": "R", "Weight": "W",
    "Scale": "R", "SIGScale": "Q", "image_id": "B", "file_id": "I", "test": "I", "shadowed": "I",
}


def _write_unmerged(X, path, rename=None):
    """Write an observation table as an unmerged MTZ file (observed indices + M/ISYM)."""
    columns = {"H": X["Hobs"], "K": X["Kobs"], "L": X["Lobs"], "BATCH": X["BATCH"], "I": X["Iobs"],
               "SIGI": X["SIGIobs"], "XDET": X["XDET"], "YDET": X["YDET"], "ROT": X["ROT"]}
    data = rs.DataSet({k: np.asarray(v) for k, v in columns.items()}, cell=X.cell, spacegroup=X.spacegroup,
                      merged=False)
    data = data.astype({"H": "HKL", "K": "HKL", "L": "HKL", "BATCH": "Batch", "I": "Intensity", "SIGI": "Stddev",
                        "XDET": "MTZReal", "YDET": "MTZReal", "ROT": "MTZReal"})
    if rename:
        data = data.rename(columns=rename)
    data.set_index(["H", "K", "L"]).hkl_to_asu().write_mtz(str(path))
    return path


@pytest.fixture(scope="session")
def sim_mtz(tmp_path_factory):
    X, _ = make_unmerged(n_images=30, anomalous=True, random_state=0)
    return _write_unmerged(X, tmp_path_factory.mktemp("input") / "sim.mtz")


def _mtz_types(path):
    return {c.label: c.type for c in gemmi.read_mtz_file(str(path)).columns}


def _listing(directory):
    return sorted(p.name for p in directory.iterdir())


def _tables(text):
    """Printed statistics without their title lines (which name the files)."""
    return "\n".join(l for l in text.strip().splitlines() if not l.startswith("Merging statistics of"))


# ------------------------------------------------------------------- the parser
def test_version_through_the_console_script():
    exe = shutil.which("skmerge")
    assert exe is not None, "the skmerge console script is installed"
    done = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert done.stdout.strip() == f"skmerge {skmerge.__version__}"


def test_help_and_version_do_not_import_tensorflow():
    code = (
        "import sys, contextlib, io\n"
        "from skmerge.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    codes = [main(['--help']), main(['mono', '--help']), main(['stats', '--help']), main(['--version'])]\n"
        "print(codes, 'tensorflow' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "[0, 0, 0, 0] False", done.stderr


def test_mono_help_is_grouped_and_lists_careless_flags(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")  # the help wraps to the terminal's width
    assert main(["mono", "--help"]) == 0
    text = capsys.readouterr().out
    for group in ("data:", "model:", "optimisation:", "validation:", "output:", "transfer from an earlier run:",
                  "careless model options:", "careless optimiser options:", "TensorFlow:", "inspection:"):
        assert f"\n{group}" in text
    for flag in ("--anomalous", "--dmin", "-d DMIN", "--isigi-cutoff", "-c ISIGI", "--spacegroups", "--intensity-key",
                 "--uncertainty-key", "--image-key", "--separate-files", "--studentt-likelihood-dof", "--iterations",
                 "--learning-rate", "--mlp-layers", "--mlp-width", "--mc-samples", "--disable-image-scales",
                 "--test-fraction", "--merge-half-datasets", "--half-dataset-repeats", "--seed",
                 "--disable-progress-bar", "--reference-mtz", "--reference-prior", "--likelihood", "--early-stopping",
                 "--error-model", "--quiet"):
        assert flag in text, flag
    assert "dHKL, Hobs, Kobs, Lobs, image_id, file_id" in text


def test_parser_defaults_are_the_estimators():
    from skmerge import VariationalMerger

    params = VariationalMerger().get_params()
    mono = build_parser().parse_args(["mono", "dHKL", "in.mtz", "out/x"])
    poly = build_parser().parse_args(["poly", "dHKL", "in.mtz", "out/x"])
    # --seed defaults to 0 so that runs repeat; --likelihood to None, so that a conflict with
    # --studentt-likelihood-dof shows (its help quotes the estimator's default).
    # careless's flags of values that are off unless given (--clipnorm, --validation-frequency, ...)
    # default to None.
    own = {"random_state", "likelihood"} | {k for k in CARELESS_DESTS if getattr(mono, k) is None}
    dests = ESTIMATOR_DESTS + CARELESS_DESTS
    assert {k: getattr(mono, k) for k in dests if k not in own} == {k: params[k] for k in dests if k not in own}
    assert {k: getattr(poly, k) for k in LAUE_DESTS} == {k: params[k] for k in LAUE_DESTS}
    # A flag left out passes the estimator's default on.
    passed = merger_parameters(mono, ["dHKL"])
    assert {k: v for k, v in passed.items() if k not in own | {"metadata", "verbose"}} == {
        k: params[k] for k in (*dests, "standardize_metadata") if k not in own and params[k] is not None}
    assert "likelihood" not in passed


def test_help_shows_the_estimators_defaults(capsys):
    from skmerge import VariationalMerger

    params = VariationalMerger().get_params()
    assert main(["mono", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for name in ("likelihood", "max_iter", "learning_rate", "mlp_layers", "mlp_width", "mc_samples",
                 "positional_encoding"):
        assert f"(default: {params[name]}" in text, name


def _parse(*argv):
    return build_parser().parse_args(["mono", *argv, "dHKL", "in.mtz", "out/x"])


def test_flags_map_to_estimator_parameters():
    args = _parse("--anomalous", "--studentt-likelihood-dof", "8", "--iterations", "30_000", "--learning-rate",
                  "0.01", "--mlp-layers", "3", "--mlp-width", "7", "--mc-samples", "4", "--disable-image-scales",
                  "--early-stopping", "--seed", "5", "--disable-progress-bar", "--separate-files", "-L", "2",
                  "--batch-size", "16", "--no-error-model", "--no-double-wilson", "--image-model", "encoder",
                  "--marginals", "grid")
    params = merger_parameters(args, ["dHKL", "BATCH"])
    likelihood, error_model, prior = params.pop("likelihood"), params.pop("error_model"), params.pop("prior")
    assert params == {
        "metadata": ["dHKL", "BATCH"], "anomalous": True, "image_scales": False, "early_stopping": True,
        "random_state": 5, "verbose": 0, "separate_files": True,
        "max_iter": 30000, "learning_rate": 0.01, "mlp_layers": 3, "mlp_width": 7, "mc_samples": 4,
        "positional_encoding": 2, "batch_size": 16, "image_model": "encoder", "marginals": "grid",
        # careless's flags not given: the estimator's defaults
        "kl_weight": 1.0, "beta_1": 0.9, "beta_2": 0.99, "epsilon": 1e-4, "scale_bijector": "softplus",
        "jit_compile": False, "standardize_metadata": True, "image_layers": "auto", "image_heads": "auto",
    }
    assert type(likelihood).__name__ == "StudentTLikelihood" and likelihood.dof == 8.0 and not likelihood.learn_dof
    assert error_model is None and prior == "wilson"
    # Without flags the progress bar is on and --seed is 0.
    params = merger_parameters(_parse(), ["dHKL"])
    assert (params["verbose"], params["random_state"], params["metadata"]) == (1, 0, ["dHKL"])
    assert "error_model" not in params and "prior" not in params  # the estimator's defaults
    assert "error_model" not in merger_parameters(_parse("--error-model"), ["dHKL"])
    assert merger_parameters(_parse("--quiet"), ["dHKL"])["verbose"] == 0
    assert merger_parameters(_parse("--likelihood", "laplace"), ["dHKL"])["likelihood"] == "laplace"


def test_reference_flags_make_a_reference_prior():
    from skmerge import ReferencePrior

    params = merger_parameters(_parse("--reference-mtz", "ref.mtz", "--reference-prior", "laplace"), ["dHKL"])
    assert isinstance(params["prior"], ReferencePrior)
    assert (params["prior"].reference, params["prior"].kind) == ("ref.mtz", "laplace")
    assert merger_parameters(_parse("--reference-mtz", "ref.mtz"), ["dHKL"])["prior"].kind == "normal"


# ------------------------------------------------------------ bad command lines
BAD_COMMAND_LINES = {
    "unknown metadata key": (["dHKL,NOPE,XDET", "{sim}", "{out}/x"], "unknown metadata key 'NOPE'"),
    "missing file": (["dHKL", "{out}/missing.mtz", "{out}/x"], "no such file"),
    "output directory missing": (["dHKL", "{sim}", "{out}/nowhere/x"], "does not exist"),
    "output is a directory": (["dHKL", "{sim}", "{out}"], "is a directory"),
    "reference prior without reference": (["--reference-prior", "laplace", "dHKL", "{sim}", "{out}/x"],
                                          "--reference-prior needs --reference-mtz"),
    "reference file missing": (["--reference-mtz", "{out}/ref.mtz", "dHKL", "{sim}", "{out}/x"], "no such file"),
    "dof with a normal likelihood": (["--likelihood", "normal", "--studentt-likelihood-dof", "4", "dHKL", "{sim}",
                                      "{out}/x"], "conflicts with --likelihood normal"),
    "repeats without half datasets": (["--half-dataset-repeats", "3", "dHKL", "{sim}", "{out}/x"],
                                      "needs --merge-half-datasets"),
    "two space groups": (["--spacegroups", "P 21 21 21,P 1", "dHKL", "{sim}", "{sim}", "{out}/x"],
                         "one space group"),
    "bad space group": (["--spacegroups", "P 7", "dHKL", "{sim}", "{out}/x"], "space group"),
    "zero iterations": (["--iterations", "0", "dHKL", "{sim}", "{out}/x"], "--iterations 0: The 'max_iter'"),
    "negative learning rate": (["--learning-rate", "-1", "dHKL", "{sim}", "{out}/x"],
                               "--learning-rate -1.0: The 'learning_rate'"),
    "zero mlp width": (["--mlp-width", "0", "dHKL", "{sim}", "{out}/x"], "--mlp-width 0: "),
    "negative batch size": (["--batch-size", "-3", "dHKL", "{sim}", "{out}/x"], "--batch-size -3: "),
    "test fraction of one": (["--test-fraction", "1", "dHKL", "{sim}", "{out}/x"], "--test-fraction 1.0: "),
    "zero shells": (["--shells", "0", "dHKL", "{sim}", "{out}/x"], "--shells 0: "),
    "zero half-dataset repeats": (["--merge-half-datasets", "--half-dataset-repeats", "0", "dHKL", "{sim}",
                                   "{out}/x"], "--half-dataset-repeats 0"),
    "iterations not a number": (["--iterations", "many", "dHKL", "{sim}", "{out}/x"], "--iterations"),
    "unknown flag": (["--frobnicate", "dHKL", "{sim}", "{out}/x"], "unrecognized arguments"),
    "empty metadata key": (["dHKL,,XDET", "{sim}", "{out}/x"], "comma-separated"),
    "unknown intensity column": (["--intensity-key", "IMEAN", "dHKL", "{sim}", "{out}/x"], "IMEAN"),
    "not a reflection file": (["dHKL", "{text}", "{out}/x"], "unknown file format"),
}


@pytest.mark.parametrize("case", sorted(BAD_COMMAND_LINES))
def test_bad_command_lines_exit_2_with_one_line_and_no_files(case, sim_mtz, tmp_path, capsys):
    argv, message = BAD_COMMAND_LINES[case]
    out = tmp_path / "out"
    out.mkdir()
    text = tmp_path / "notes.txt"
    text.write_text("not diffraction data\n")
    argv = [a.format(sim=sim_mtz, out=out, text=text) for a in argv]
    assert main(["mono", *argv]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("skmerge: error: ")
    assert message in lines[0]
    assert captured.out == ""
    assert _listing(out) == []


def test_bad_likelihood_values_name_their_flag(tmp_path, capsys):
    """The likelihood object validates its own parameters; the error names
    --studentt-likelihood-dof."""
    assert main(["mono", "--studentt-likelihood-dof", "-2", "dHKL", "in.mtz", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("skmerge: error: --studentt-likelihood-dof -2.0: The 'dof' parameter") and err.count("\n") == 1


def test_unknown_metadata_key_lists_the_available_ones(sim_mtz, tmp_path, capsys):
    assert main(["mono", "dHKL,XOBS", str(sim_mtz), str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    for key in ("dHKL", "Hobs", "Kobs", "Lobs", "image_id", "file_id", "BATCH", "XDET", "YDET", "ROT"):
        assert key in err
    assert _listing(tmp_path) == []


def test_missing_command_and_stats_errors(tmp_path, capsys):
    assert main([]) == 2
    assert main(["stats", str(tmp_path / "nothing")]) == 2
    assert main(["stats", str(tmp_path / "missing" / "x")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and all(l.startswith("skmerge: error: ") for l in lines)


# ------------------------------------------------------------------- full runs
def _shared(tmp_path_factory, name):
    """A directory every pytest-xdist worker of this session sees, and a lock on it."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    directory = root / name
    directory.mkdir(exist_ok=True)
    return directory


@contextlib.contextmanager
def _lock(directory):
    try:
        import fcntl
    except ImportError:  # not POSIX: each worker runs its own
        yield
        return
    with open(directory / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def anomalous_run(sim_mtz, tmp_path_factory):
    """One run with every output (anomalous, two half-dataset repeats, a test set, the
    error model), made once per test session and shared by the xdist workers."""
    directory = _shared(tmp_path_factory, "anomalous_run")
    out = directory / "run" / "sim"
    with _lock(directory):
        if not (directory / "code").exists():
            out.parent.mkdir()
            stdout, stderr = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                code = main(["mono", "--anomalous", "--merge-half-datasets", "--half-dataset-repeats", "2",
                             "--test-fraction", "0.1", "--error-model", *TINY, "--shells", "5",
                             "dHKL,Hobs,Kobs,Lobs,XDET,YDET,BATCH", str(sim_mtz), str(out)])
            (directory / "out").write_text(stdout.getvalue())
            (directory / "err").write_text(stderr.getvalue())
            (directory / "code").write_text(str(code))
    capture = {k: (directory / k).read_text() for k in ("out", "err")}
    capture["code"] = int((directory / "code").read_text())
    return out, capture


def test_run_writes_every_output(anomalous_run):
    out, capture = anomalous_run
    assert capture["code"] == 0, capture["err"]
    assert _listing(out.parent) == sorted(
        f"sim{suffix}" for suffix in ("_0.mtz", "_predictions_0.mtz", "_xval_0.mtz", "_history.csv", ".joblib",
                                      ".npz", "_stats.csv", "_stats.json", "_cchalf.png", "_history.png",
                                      "_calibration.png", "_report.html")
    ), "every output, and no temporary file left behind"
    for png in ("_cchalf.png", "_history.png", "_calibration.png"):
        assert (out.parent / f"sim{png}").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_merged_mtz_columns_types_and_readers(anomalous_run, sim_mtz):
    out, _ = anomalous_run
    path = f"{out}_0.mtz"
    types = _mtz_types(path)
    assert types == {"H": "H", "K": "H", "L": "H", **ANOMALOUS_TYPES}
    mtz = gemmi.read_mtz_file(path)
    source = gemmi.read_mtz_file(str(sim_mtz))
    assert mtz.spacegroup.hm == source.spacegroup.hm
    assert mtz.cell.parameters == pytest.approx(source.cell.parameters, rel=1e-5)
    merged = rs.read_mtz(path)
    assert merged.merged and len(merged) == mtz.nreflections
    assert (merged["F"].to_numpy(float) > 0).all()


def test_predictions_round_trip(anomalous_run, sim_mtz):
    out, _ = anomalous_run
    path = f"{out}_predictions_0.mtz"
    assert _mtz_types(path) == {"H": "H", "K": "H", "L": "H", **PREDICTION_TYPES}
    predictions = rs.read_mtz(path)
    source = rs.read_mtz(str(sim_mtz))
    assert not predictions.merged
    # reciprocalspaceship reads back the observed indices, row for row.
    np.testing.assert_array_equal(predictions.get_hkls(), source.get_hkls())
    np.testing.assert_allclose(predictions["Iobs"].to_numpy(float), source["I"].to_numpy(float), rtol=1e-6)
    test = predictions["test"].to_numpy()
    assert set(np.unique(test)) == {0, 1}
    assert 0.05 < test.mean() < 0.15
    # gemmi sees ASU indices with the symmetry operator.
    mtz = gemmi.read_mtz_file(path)
    hkl = np.array(mtz.make_miller_array())
    asu = gemmi.ReciprocalAsu(mtz.spacegroup)
    assert all(asu.is_in(list(h)) for h in hkl[:200])


def test_error_model_is_fitted_reported_and_saved(anomalous_run):
    out, capture = anomalous_run
    merger = joblib.load(f"{out}.joblib")
    assert merger.error_model
    assert f"SdFac {merger.sdfac_:.3g}, SdAdd {merger.sdadd_:.3g}" in capture["err"]
    assert "scatter about the fitted model" not in capture["err"]  # no advice to add what is there
    document = json.loads(open(f"{out}_stats.json").read())
    assert document["error_model"] == {"sdfac": merger.sdfac_, "sdadd": merger.sdadd_}


def test_the_decay_frame_is_reported_and_saved(anomalous_run):
    out, capture = anomalous_run
    merger = joblib.load(f"{out}.joblib")
    assert merger.reference_b_ != 0.0  # a rotation series
    logged = f"least-decayed images record them, whose scales fall off with B {merger.reference_b_:+.3g}"
    assert logged in capture["err"]
    assert json.loads(open(f"{out}_stats.json").read())["reference_b"] == merger.reference_b_


def test_fitted_merger_is_saved(anomalous_run):
    out, _ = anomalous_run
    merger = joblib.load(f"{out}.joblib")
    assert merger.anomalous and merger.metadata == ["dHKL", "Hobs", "Kobs", "Lobs", "XDET", "YDET", "BATCH"]
    assert (merger.max_iter, merger.mlp_layers, merger.mlp_width) == (100, 2, 8)
    history = pd.read_csv(f"{out}_history.csv")
    assert list(history.columns) == ["step", "loss", "nll", "kl"]
    assert len(history) == merger.n_iter_
    np.testing.assert_allclose(history[["loss", "nll", "kl"]].to_numpy(), merger.loss_curve_, rtol=1e-6)


def test_half_dataset_file(anomalous_run):
    out, _ = anomalous_run
    path = f"{out}_xval_0.mtz"
    # careless's layout: its σ names, and no Friedel means that would collide when stacked
    friedel = {name.replace("SIG", "Sig") if "(" in name else name: kind for name, kind in ANOMALOUS_TYPES.items()
               if name not in MERGED_TYPES}
    assert _mtz_types(path) == {"H": "H", "K": "H", "L": "H", **friedel, "repeat": "I", "half": "I"}
    halves = rs.read_mtz(path)
    counts = halves.groupby(["repeat", "half"]).size()
    assert list(counts.index) == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_statistics_files_and_table(anomalous_run):
    out, capture = anomalous_run
    document = json.loads(open(f"{out}_stats.json").read())
    shells = document["datasets"][0]["shells"]
    assert len(shells) == 6 and shells[-1]["shell"] == "overall"
    assert {"cc_half", "cc_anom", "cc_pred", "completeness", "anom_completeness", "mean_isigi"} <= set(shells[0])
    table = pd.read_csv(f"{out}_stats.csv")
    assert table["cc_half"].iloc[-1] == pytest.approx(shells[-1]["cc_half"])
    assert document["datasets"][0]["n_repeats"] == 2
    printed = capture["out"].splitlines()
    heading, rows = _statistics_rows(printed)
    assert "CCanom" in heading and "CCpred" in heading
    assert len(rows) == 6
    cc = heading.split().index("CC1/2")
    assert all(-1 <= float(r[cc]) <= 1 for r in rows)


def _statistics_rows(lines):
    """The heading and the split rows (shells, then overall) of the printed statistics
    table (other tables, e.g. the calibration's, follow it)."""
    start = next(i for i, line in enumerate(lines) if "CC1/2" in line and "d_max" in line)
    end = next(i for i in range(start, len(lines)) if lines[i].rstrip().endswith("overall"))
    return lines[start], [line.split() for line in lines[start + 1:end + 1]
                          if line.split() and line.split()[0].replace(".", "").isdigit()]


def test_progress_bars_and_messages_on_stderr(anomalous_run):
    _, capture = anomalous_run
    err = capture["err"]
    assert "fit:" in err and "loss=" in err and "step" in err
    assert "half-dataset merges" in err
    assert "skmerge: wrote sim_0.mtz" in err
    assert "skmerge: error" not in err


def test_stats_command_recomputes_the_table(anomalous_run, tmp_path, capsys):
    out, capture = anomalous_run
    assert main(["stats", str(out), "--shells", "5"]) == 0
    printed = capsys.readouterr().out
    assert _tables(printed) == _tables(capture["out"])
    plot = tmp_path / "again.png"
    assert main(["stats", str(out), "--shells", "3", "--binning", "equal-volume", "--plot", str(plot)]) == 0
    assert "3 resolution shells of equal numbers of possible reflections" in capsys.readouterr().out
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_stats_command_reads_careless_names(anomalous_run, tmp_path, capsys):
    out, capture = anomalous_run
    for suffix in ("_0", "_xval_0", "_predictions_0"):
        data = rs.read_mtz(f"{out}{suffix}.mtz")
        renamed = data.rename(columns={c: "Sig" + c[3:] for c in data.columns if c.startswith("SIG")})
        renamed.write_mtz(str(tmp_path / f"careless{suffix}.mtz"))
    assert main(["stats", str(tmp_path / "careless"), "--shells", "5"]) == 0
    assert _tables(capsys.readouterr().out) == _tables(capture["out"])


def test_stats_command_falls_back_to_json(anomalous_run, tmp_path, capsys):
    out, _ = anomalous_run
    shutil.copy(f"{out}_stats.json", tmp_path / "sim_stats.json")
    assert main(["stats", str(tmp_path / "sim")]) == 0
    printed = capsys.readouterr().out
    assert "CC1/2" in printed and "overall" in printed


def test_separate_files_share_the_scale_model_quietly(tmp_path, capsys):
    X, _ = make_unmerged(n_images=16, random_state=5)
    first = X[X["BATCH"].to_numpy() <= 8]
    second = X[X["BATCH"].to_numpy() > 8]
    paths = [_write_unmerged(first, tmp_path / "a.mtz"), _write_unmerged(second, tmp_path / "b.mtz")]
    code = main(["mono", "--separate-files", "--quiet", "--merge-half-datasets", *TINY,
                 "dHKL,BATCH", *map(str, paths), str(tmp_path / "two")])
    captured = capsys.readouterr()
    assert code == 0
    assert captured.out == "", "--quiet prints no table"
    assert all(line.startswith("skmerge: warning: ") for line in captured.err.splitlines()), "only warnings"
    for i, part in enumerate((first, second)):
        assert _mtz_types(tmp_path / f"two_{i}.mtz") == {"H": "H", "K": "H", "L": "H", **MERGED_TYPES}
        merged = rs.read_mtz(str(tmp_path / f"two_{i}.mtz"))
        assert merged["N"].to_numpy().sum() == len(part)
        predictions = rs.read_mtz(str(tmp_path / f"two_predictions_{i}.mtz"))
        assert len(predictions) == len(part) and set(predictions["file_id"]) == {i}
        assert set(rs.read_mtz(str(tmp_path / f"two_xval_{i}.mtz"))["half"]) == {0, 1}
    merger = joblib.load(tmp_path / "two.joblib")
    assert merger.separate_files and merger.verbose == 0
    assert len(merger.image_ids_) == 16, "one scale model with offsets for the images of both files"
    document = json.loads((tmp_path / "two_stats.json").read_text())
    assert [d["name"] for d in document["datasets"]] == ["a.mtz", "b.mtz"]
    assert main(["stats", str(tmp_path / "two")]) == 0
    printed = capsys.readouterr().out
    assert "data set 0 (a.mtz)" in printed and "data set 1 (b.mtz)" in printed


def test_input_error_while_fitting_is_one_line(sim_mtz, tmp_path, capsys, monkeypatch):
    from skmerge.errors import InputError
    from skmerge.merger import VariationalMerger

    def fail(self, X, y=None, X_held_out=None):
        raise InputError("something about\nthe data")

    monkeypatch.setattr(VariationalMerger, "fit", fail)
    assert main(["mono", "--quiet", *TINY, "dHKL", str(sim_mtz), str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err == "skmerge: error: something about the data\n"
    assert _listing(tmp_path) == []


def test_writes_are_atomic(tmp_path):
    from skmerge.io.writers import write_csv, write_mtz

    target = tmp_path / "table.csv"
    write_csv(pd.DataFrame({"a": [1]}), target)
    before = target.read_text()
    broken = rs.DataSet({"H": [1], "K": [0], "L": [0], "F": [1.0]}).set_index(["H", "K", "L"])
    with pytest.raises(Exception):
        write_mtz(broken, tmp_path / "broken.mtz")  # no cell: reciprocalspaceship refuses

    class Exploding(pd.DataFrame):
        def to_csv(self, path, **kwargs):
            with open(path, "w") as handle:
                handle.write("partial")
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_csv(Exploding({"a": [2]}), target)
    assert target.read_text() == before, "the old file is intact"
    assert _listing(tmp_path) == ["table.csv"], "no partial or temporary file"
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask, "ordinary permissions, not a private temp file's"


# ------------------------------------------------------------- careless examples
@pytest.fixture(scope="module")
def dials_small(data_dir, tmp_path_factory):
    path = data_dir / "formats" / "dials_export_small.mtz"
    if not path.exists():
        pytest.skip(f"{path} is missing")
    return path


# careless-examples hewl_ssad/merge.sh and HEWLSSAD.md (run on the small DIALS export,
# which has the same columns), then XFEL.md's thermolysin command; with --iterations
# lowered and, for speed, a small network.
CARELESS_HEWL = {
    "normal": ["--anomalous", "--beta-1=0.9", "--beta-2=0.9", "--disable-image-scales", "--iterations=30_000"],
    "studentt": ["--studentt-likelihood-dof=16", "--anomalous", "--disable-image-scales", "--merge-half-datasets",
                 "--iterations=30_000"],
}


@pytest.mark.realdata
@pytest.mark.parametrize("example", sorted(CARELESS_HEWL))
def test_careless_hewl_examples_run(dials_small, tmp_path, example, capsys):
    (tmp_path / "merge" / example).mkdir(parents=True)
    out = tmp_path / "merge" / example / "hewl"
    argv = ["mono", *CARELESS_HEWL[example], "BATCH,dHKL,Hobs,Kobs,Lobs,XDET,YDET,BG,SIGBG,LP,QE,FRACTIONCALC",
            str(dials_small), str(out), *TINY]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "ignored" not in captured.err
    assert os.path.exists(f"{out}_0.mtz")
    assert os.path.exists(f"{out}_xval_0.mtz") == (example == "studentt")
    # The CC plot needs half-dataset merges or a test set.
    assert os.path.exists(f"{out}_cchalf.png") == (example == "studentt")
    merger = joblib.load(f"{out}.joblib")
    assert merger.image_scales is False and merger.anomalous
    assert (merger.beta_1, merger.beta_2) == ((0.9, 0.9) if example == "normal" else (0.9, 0.99))
    if example == "normal":  # careless's command without a likelihood flag gets skmerge's default
        assert merger.likelihood == type(merger)().likelihood
    else:
        assert merger.likelihood.dof == 16 and not merger.likelihood.learn_dof


@pytest.mark.realdata
def test_careless_thermolysin_example_runs(data_dir, tmp_path, capsys):
    data = rs.read_mtz(str(data_dir / "thermolysin_xfel" / "unmerged_n395.mtz"))
    data[data["BATCH"].to_numpy() < 10].copy().write_mtz(str(tmp_path / "unmerged.mtz"))
    (tmp_path / "merge_eo").mkdir()
    argv = ["mono", "--anomalous", "--mlp-layers=10", "--image-layers=2", "--dmin=1.8", "--iterations=30_000",
            "dHKL,xobs,yobs,ewald_offset", str(tmp_path / "unmerged.mtz"), str(tmp_path / "merge_eo" / "thermolysin"),
            "--iterations=100"]
    assert main(argv) == 0
    assert "ignored" not in capsys.readouterr().err
    assert joblib.load(tmp_path / "merge_eo" / "thermolysin.joblib").image_layers == 2
    merged = rs.read_mtz(str(tmp_path / "merge_eo" / "thermolysin_0.mtz"))
    assert merged.compute_dHKL()["dHKL"].min() >= 1.8 - 1e-6
    assert "DANO" in merged.columns


# -------------------------------------------------------------------- real data
@pytest.mark.realdata
def test_hypf_acceptance_through_the_console_script(data_dir, tmp_path):
    (tmp_path / "out").mkdir()
    argv = ["skmerge", "mono", "--anomalous", "--merge-half-datasets", *TINY, "--disable-progress-bar",
            "dHKL,Hobs,Kobs,Lobs,XDET,YDET,BATCH", str(data_dir / "hypf_hg_sad" / "hypf_unmerged.mtz"),
            str(tmp_path / "out" / "hypf")]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    names = _listing(tmp_path / "out")
    assert names == sorted(["hypf_0.mtz", "hypf_predictions_0.mtz", "hypf_xval_0.mtz", "hypf_history.csv",
                            "hypf.joblib", "hypf.npz", "hypf_stats.csv", "hypf_stats.json", "hypf_cchalf.png",
                            "hypf_history.png", "hypf_calibration.png", "hypf_report.html"])
    merged = gemmi.read_mtz_file(str(tmp_path / "out" / "hypf_0.mtz"))
    assert merged.spacegroup.hm == "R 3"
    assert {c.label: c.type for c in merged.columns} == {"H": "H", "K": "H", "L": "H", **ANOMALOUS_TYPES}
    assert rs.read_mtz(str(tmp_path / "out" / "hypf_0.mtz")).merged
    assert _mtz_types(tmp_path / "out" / "hypf_predictions_0.mtz") == {"H": "H", "K": "H", "L": "H",
                                                                        **PREDICTION_TYPES}
    heading, rows = _statistics_rows(done.stdout.splitlines())
    cc = heading.split().index("CC1/2")
    assert len(rows) == 11  # ten shells and the overall line
    assert all(-1 <= float(r[cc]) <= 1 for r in rows)
    assert "Traceback" not in done.stderr and "tensorflow" not in done.stderr.lower()
    assert "flagged partial" in done.stderr and "add FRACTIONCALC" in done.stderr


@pytest.mark.realdata
def test_pyp_separate_files(data_dir, tmp_path, capsys):
    files = [str(data_dir / "pyp_laue" / name) for name in ("off.mtz", "2ms.mtz")]
    assert main(["mono", "--separate-files", "--disable-progress-bar", "--dmin", "2.5", *TINY,
                 "dHKL,X,Y,Wavelength", *files, str(tmp_path / "pyp")]) == 0
    merger = joblib.load(tmp_path / "pyp.joblib")
    assert merger.separate_files and len(merger.image_ids_) == 40
    f = []
    for i, name in enumerate(files):
        merged = rs.read_mtz(str(tmp_path / f"pyp_{i}.mtz"))
        assert list(merged.columns) == ["F", "SIGF", "I", "SIGI", "N"]
        f.append(merged["F"])
        predictions = rs.read_mtz(str(tmp_path / f"pyp_predictions_{i}.mtz"))
        assert set(predictions["file_id"]) == {i}
        # Every spot is predicted; those behind the beam-stop arm's shadow are not merged.
        assert merged["N"].to_numpy().sum() == (predictions["shadowed"].to_numpy() == 0).sum() < len(predictions)
    common = f[0].index.intersection(f[1].index)
    assert len(common) > 1000
    assert not np.allclose(f[0].loc[common], f[1].loc[common]), "each file merged separately"
    assert np.corrcoef(f[0].loc[common], f[1].loc[common])[0, 1] > 0.8
    printed = capsys.readouterr().out
    assert "data set 0 (off.mtz)" in printed and "data set 1 (2ms.mtz)" in printed


@pytest.mark.realdata
def test_pyp_poly_acceptance(data_dir, tmp_path, capsys):
    files = [str(data_dir / "pyp_laue" / name) for name in ("off.mtz", "2ms.mtz")]
    assert main(["poly", "--separate-files", "--merge-half-datasets", "--wavelength-key", "Wavelength",
                 "--disable-progress-bar", *TINY, "X,Y,Wavelength,dHKL,Hobs,Kobs,Lobs", *files,
                 str(tmp_path / "pyp")]) == 0
    for i in (0, 1):
        assert (tmp_path / f"pyp_{i}.mtz").is_file() and (tmp_path / f"pyp_xval_{i}.mtz").is_file()
        predictions = rs.read_mtz(str(tmp_path / f"pyp_predictions_{i}.mtz"))
        assert len(predictions) == (48069, 48055)[i]  # one prediction per spot
    merger = joblib.load(tmp_path / "pyp.joblib")
    assert merger.laue and merger.separate_files
    assert set(merger.wavelength_bands_) == {0, 1}
    printed = capsys.readouterr().out
    assert "data set 0 (off.mtz)" in printed and "data set 1 (2ms.mtz)" in printed
    assert _tables(printed).count("CC1/2") == 4  # the legend line and the heading of each table
    # The amplitudes follow the data: against √I of the plain unscaled merge of the dark
    # file, a sound merge correlates 0.85–0.87; a start that lost the amplitudes (robust
    # weights discarding spots by wavelength) gave 0.40.
    merged = rs.read_mtz(str(tmp_path / "pyp_0.mtz"))[["F"]]
    plain = skmerge.merge_inverse_variance(skmerge.read_unmerged(files[0], intensity_key="I", sigma_key="SigI"))
    both = merged.join(plain[["I"]], how="inner")
    both = both[both["I"] > 0]
    assert np.corrcoef(both["F"].to_numpy(float), np.sqrt(both["I"].to_numpy(float)))[0, 1] > 0.75


def test_poly_flags_and_errors(sim_mtz, tmp_path, capsys):
    args = build_parser().parse_args(["poly", "-w", "LAMBDA", "-l", "0.9", "1.2", "dHKL", "a.mtz", "out/x"])
    params = merger_parameters(args, ["dHKL"])
    assert params["laue"] and params["wavelength_key"] == "LAMBDA" and params["wavelength_range"] == (0.9, 1.2)
    assert "laue" not in merger_parameters(build_parser().parse_args(["mono", "dHKL", "a.mtz", "out/x"]), ["dHKL"])
    status = main(["poly", "--quiet", "dHKL", str(sim_mtz), str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert status == 2 and "'Wavelength' is not one of" in err and len(err.splitlines()) == 1
    assert os.listdir(tmp_path) == []
    status = main(["poly", "-l", "1.2", "0.9", "dHKL", str(sim_mtz), str(tmp_path / "x")])
    assert status == 2 and "give the smaller wavelength first" in capsys.readouterr().err


def test_demo_merges_a_simulated_data_set_and_prints_the_table(capsys):
    code = main(["demo", "--images", "12", "--shells", "4", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    assert "simulated" in out and "fitted in" in out and "CC1/2" in out
    # The closing line compares the merged amplitudes with the simulated truth.
    cc_line = next(line for line in out.splitlines() if line.startswith("CC(F, truth)"))
    overall = float(cc_line.rsplit("overall", 1)[1])
    assert overall > 0.9
