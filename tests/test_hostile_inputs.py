"""Inputs a hostile-but-fair user gives: each gets one clear error (or a reported,
harmless change) naming the culprit, and nothing is left behind.

The catalogue of issue 19 (with test_hostile_cli.py, test_hostile_api.py and
test_safe_format.py); generated inputs only (tests/_hostile.py writes them).
"""

import warnings

import numpy as np
import pytest

import skmerge
from skmerge import DataWarning, InputError, VariationalMerger
from skmerge.cli import main
from skmerge.datasets import make_unmerged

from _hostile import (FAST, XDS_HEADER, assert_damage_refused_or_harmless, craft_mtz, listing, write_unmerged_mtz,
                      write_xds)


# ------------------------------------------------------------ silent garbage
@pytest.mark.parametrize("record, remedy, flag", [
    ("!UNIT_CELL_CONSTANTS", "cell=", "--cell"),
    ("!SPACE_GROUP_NUMBER", "spacegroup=", "--spacegroups"),
])
def test_xds_file_without_cell_or_space_group_is_an_error(tmp_path, capsys, record, remedy, flag):
    header = "".join(line + "\n" for line in XDS_HEADER.splitlines() if not line.startswith(record))
    path = write_xds(tmp_path / "XDS_ASCII.HKL", header)
    with pytest.raises(InputError, match=rf"XDS_ASCII.HKL.*{record}.*{remedy}.*{flag}"):
        skmerge.read_unmerged(path)
    out = tmp_path / "out"
    out.mkdir()
    assert main(["mono", "dHKL", str(path), str(out / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and record in err and flag in err
    assert listing(out) == []


def test_xds_file_without_cell_reads_with_the_cell_given(tmp_path):
    header = "".join(line + "\n" for line in XDS_HEADER.splitlines() if "UNIT_CELL" not in line)
    X = skmerge.read_unmerged(write_xds(tmp_path / "XDS_ASCII.HKL", header), cell=(40, 50, 60, 90, 90, 90))
    assert X.cell.parameters == pytest.approx((40, 50, 60, 90, 90, 90))
    assert X["dHKL"].min() > 1.9  # the simulator's 2 Å limit, not a 1 Å cell's 0.05 Å


def test_cli_cell_flag_reaches_the_reader():
    from skmerge.cli import build_parser, workflow_options

    args = build_parser().parse_args(["mono", "--cell", "40", "50", "60", "90", "90", "90", "dHKL", "a.hkl", "x"])
    assert workflow_options(args)["cell"] == [40.0, 50.0, 60.0, 90.0, 90.0, 90.0]


# ------------------------------------------------------------ duplicates
def test_every_row_twice_is_reported_and_dropped(tmp_path):
    once = skmerge.read_unmerged(write_xds(tmp_path / "once.HKL"))
    with pytest.warns(DataWarning, match=r"twice.HKL: .* rows repeat an earlier row exactly"):
        twice = skmerge.read_unmerged(write_xds(tmp_path / "twice.HKL", repeat=2))
    assert len(twice) == len(once)
    np.testing.assert_array_equal(twice["Iobs"].to_numpy(), once["Iobs"].to_numpy())


def test_repeated_rows_reach_the_run_log(tmp_path):
    messages = []
    skmerge.run_merge(write_xds(tmp_path / "twice.HKL", repeat=2), metadata=["dHKL"], **FAST,
                      log=lambda level, message: messages.append((level, message)))
    assert any(level == "warning" and "repeat an earlier row" in message for level, message in messages)


def test_distinct_rows_give_no_warning(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        skmerge.read_unmerged(write_xds(tmp_path / "once.HKL"))


def test_the_same_file_twice_is_an_error(tmp_path, capsys):
    path = write_xds(tmp_path / "XDS_ASCII.HKL")
    with pytest.raises(InputError, match="XDS_ASCII.HKL: given more than once"):
        skmerge.read_unmerged([path, tmp_path / "." / "XDS_ASCII.HKL"])
    out = tmp_path / "out"
    out.mkdir()
    assert main(["mono", "dHKL", str(path), str(path), str(out / "x")]) == 2
    assert "given more than once" in capsys.readouterr().err
    assert listing(out) == []


# ------------------------------------------------------------ data of another kind at use
@pytest.fixture(scope="module")
def fitted():
    X, _ = make_unmerged(n_images=8, random_state=4)
    return X, VariationalMerger(**FAST).fit(X)


def test_another_space_group_is_refused_at_use(fitted):
    X, merger = fitted
    other = X.copy()
    other.spacegroup = "P 1 21 1"
    for method in (merger.transform, merger.predict, merger.score):
        with pytest.raises(InputError, match="space group P 1 21 1.*fitted in P 21 21 21"):
            method(other)


def test_a_non_isomorphous_cell_is_refused_at_use_and_at_warm_start(fitted):
    X, merger = fitted
    other = X.copy()
    other.cell = (44.0, 50.0, 60.0, 90.0, 90.0, 90.0)
    with pytest.raises(InputError, match="not isomorphous"):
        merger.predict(other)
    warm = skmerge.VariationalMerger(**FAST, warm_start=True)
    warm.__dict__.update({k: v for k, v in vars(merger).items() if k.endswith("_")})
    with pytest.raises(InputError, match="not isomorphous"):
        warm.fit(other)
    close = X.copy()
    close.cell = (40.4, 50.0, 60.0, 90.0, 90.0, 90.0)  # within 2 %
    assert np.isfinite(merger.predict(close)).all()


# ------------------------------------------------------------ messages and early checks
def test_an_unknown_intensity_key_is_named_with_its_flag(tmp_path, capsys):
    path = write_xds(tmp_path / "XDS_ASCII.HKL")
    with pytest.raises(InputError, match=r"intensity_key='NOPE' \(--intensity-key\) is not a column"):
        skmerge.read_unmerged(path, intensity_key="NOPE")
    assert main(["mono", "--intensity-key", "NOPE", "dHKL", str(path), str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "--intensity-key" in err and "σ" not in err


def test_half_datasets_of_one_image_fail_before_the_fit(tmp_path, monkeypatch):
    X, _ = make_unmerged(n_images=4, random_state=0)
    one = X[X["image_id"] == 0]

    def never(*args, **kwargs):
        raise AssertionError("fitted before the check")

    monkeypatch.setattr(VariationalMerger, "fit", never)
    with pytest.raises(InputError, match="at least two images"):
        skmerge.run_merge(one, half_datasets=1, **FAST)


# ------------------------------------------------------------ outputs as a set
@pytest.fixture()
def earlier_run(tmp_path):
    """A separate-files run with half datasets under out/x, and its files' bytes."""
    X, _ = make_unmerged(n_images=6, random_state=3)
    X = X.copy()
    X["file_id"] = (X["image_id"].to_numpy() % 2).astype("int32")
    out = tmp_path / "out"
    out.mkdir()
    skmerge.run_merge(X, out / "x", separate_files=True, half_datasets=1, log=lambda *a: None, **FAST)
    return X, out, {p.name: p.read_bytes() for p in out.iterdir()}


def test_a_later_run_removes_what_it_does_not_write(earlier_run, capsys):
    X, out, before = earlier_run
    assert {"x_1.mtz", "x_xval_0.mtz", "x_xval_1.mtz", "x_predictions_1.mtz", "x_cchalf.png"} <= set(before)
    result = skmerge.run_merge(X, out / "x", log=lambda *a: None, **FAST)
    assert listing(out) == sorted(p.name for p in result.paths)
    assert "x_1.mtz" not in listing(out) and not any("xval" in name for name in listing(out))
    assert main(["stats", str(out / "x")]) == 0
    assert "data set 1" not in capsys.readouterr().out


@pytest.mark.parametrize("failure", ["disk full", "SIGTERM", "SIGINT"])
def test_a_run_stopped_while_writing_leaves_the_earlier_outputs(earlier_run, failure, monkeypatch, capsys,
                                                                interruptible):
    import os
    import signal

    from skmerge.io import writers

    X, out, before = earlier_run
    path = write_xds(out.parent / "XDS_ASCII.HKL")
    write_figure = writers.write_figure

    def fail(figure, target, **kwargs):
        write_figure(figure, target, **kwargs)  # some files of the new set exist by now
        if failure == "disk full":
            raise OSError(28, "No space left on device")
        os.kill(os.getpid(), getattr(signal, failure))

    monkeypatch.setattr(writers, "write_figure", fail)
    status = main(["mono", "--iterations", "30", "--mlp-layers", "2", "dHKL", str(path), str(out / "x")])
    err = capsys.readouterr().err
    assert status == (1 if failure == "disk full" else 130)
    assert "Traceback" not in err and ("No space left" in err if failure == "disk full" else "interrupted" in err)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # and no debris


def test_a_named_pipe_is_refused_not_waited_on(tmp_path, capsys):
    import os

    pipe = tmp_path / "reflections.mtz"
    os.mkfifo(pipe)
    with pytest.raises(InputError, match="reflections.mtz: is not a regular file"):
        skmerge.read_unmerged(pipe)
    out = tmp_path / "out"
    out.mkdir()
    assert main(["mono", "dHKL", str(pipe), str(out / "x")]) == 2
    assert "not a regular file" in capsys.readouterr().err and listing(out) == []


# ------------------------------------------------------------ bounded reading
@pytest.mark.parametrize("field, message", [
    ("position", "its header is said to start at byte 7,999,999,996"),
    ("NCOL", "its header declares 1,000,000,000 reflections"),
])
def test_a_crafted_mtz_header_fails_before_allocating(tmp_path, field, message):
    path = craft_mtz(tmp_path / "crafted.mtz", field)
    with pytest.raises(InputError, match=f"crafted.mtz: damaged MTZ file: {message}"):
        skmerge.read_unmerged(path)


# ------------------------------------------------------------ unmerged where merged data belong
@pytest.fixture(scope="module")
def unmerged_mtz(tmp_path_factory):
    return write_unmerged_mtz(tmp_path_factory.mktemp("unmerged") / "unmerged.mtz")


def test_an_unmerged_reference_is_refused(unmerged_mtz):
    X, path = unmerged_mtz
    with pytest.raises(InputError, match="reference holds unmerged observations"):
        VariationalMerger(prior=skmerge.ReferencePrior(path), **FAST).fit(X)


def test_stats_on_an_unmerged_file_is_refused(unmerged_mtz, tmp_path, capsys):
    import shutil

    _, path = unmerged_mtz
    shutil.copy(path, tmp_path / "run_0.mtz")
    assert main(["stats", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "run_0.mtz: holds unmerged observations" in err and err.count("\n") == 1


def test_invalid_observations_name_the_flag_that_drops_them(tmp_path, capsys):
    X, _ = make_unmerged(n_images=4, random_state=0)
    intensity = X["Iobs"].to_numpy().copy()
    intensity[3] = np.nan
    _, path = write_unmerged_mtz(tmp_path / "nan.mtz", intensity)
    out = tmp_path / "out"
    out.mkdir()
    argv = ["mono", "--iterations", "20", "--mlp-layers", "2", "dHKL", str(path), str(out / "x")]
    assert main(argv) == 2
    assert "--drop-invalid" in capsys.readouterr().err and listing(out) == []
    assert main(["mono", "--drop-invalid", *argv[1:]]) == 0
    assert "x_0.mtz" in listing(out)


# ------------------------------------------------------------ safe loading
def test_a_damaged_saved_merger_never_loads_as_another(fitted, tmp_path):
    import joblib

    X, merger = fitted
    path = tmp_path / "merger.joblib"
    joblib.dump(merger, path)
    assert_damage_refused_or_harmless(path, X, merger.predict(X))


def test_random_bytes_are_not_a_saved_merger(tmp_path):
    from skmerge import DamagedFileError

    path = tmp_path / "noise.joblib"
    path.write_bytes(np.random.default_rng(1).bytes(4096))
    with pytest.raises(DamagedFileError, match="noise.joblib: cannot load a saved merger"):
        skmerge.load(path)
