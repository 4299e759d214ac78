"""careless's example command lines, run with ``skmerge`` in place of ``careless`` on the
shared PYP and HypF files.

The command lines are those of the careless-examples repository (rs-station/careless-
examples): ``pyp/merge.sh`` (Laue, two time points merged separately) and
``TRANSFER_ANOM.md`` (scales learned without ``--anomalous``, frozen, and used for an
anomalous merge). Each runs as careless's is written, with one flag appended: a small
``--iterations`` (the last value of a flag wins), because skmerge has no setting that
shortens a run from outside the command line and careless's runs take hours. The
transfer example was written for a lysozyme file; on HypF its metadata keys are
HypF's own columns (the lysozyme file's BG, SIGBG and QE are not in it).
"""

import numpy as np
import pytest
import reciprocalspaceship as rs

import skmerge
from skmerge.cli import main

SHORT = ["--iterations=20"]

# careless-examples pyp/merge.sh, with out=merge and mtz_0/mtz_1 the two files.
PYP_MERGE = ["poly", "--separate-files", "--disable-image-scales", "--iterations=30_000", "--merge-half-datasets",
             "--wavelength-key=Wavelength", "X,Y,Wavelength,dHKL,Hobs,Kobs,Lobs"]

# careless-examples TRANSFER_ANOM.md, steps 1 and 2.
HYPF_KEYS = "BATCH,dHKL,Hobs,Kobs,Lobs,XDET,YDET,LP,FRACTIONCALC"
TRANSFER_STEP_1 = ["mono", "--studentt-likelihood-dof=16", "--mc-samples=20", "--mlp-layers=10", "--image-layers=2",
                   HYPF_KEYS]
TRANSFER_STEP_2 = ["mono", "--freeze-scale", "--scale-file=no_anom/hewl_scale", "--anomalous",
                   "--studentt-likelihood-dof=16", "--mc-samples=20", "--mlp-layers=10", "--image-layers=2", HYPF_KEYS]


@pytest.mark.realdata
def test_careless_pyp_example_runs(data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "merge").mkdir()
    files = [str(data_dir / "pyp_laue" / name) for name in ("off.mtz", "2ms.mtz")]
    assert main([*PYP_MERGE, *files, "merge/pyp", *SHORT]) == 0
    assert "ignored" not in capsys.readouterr().err
    for i in (0, 1):
        assert rs.read_mtz(f"merge/pyp_{i}.mtz").merged
        assert (tmp_path / "merge" / f"pyp_xval_{i}.mtz").is_file()
    merger = skmerge.load("merge/pyp.npz")
    assert merger.laue and merger.separate_files and not merger.image_scales
    assert merger.metadata == ["X", "Y", "Wavelength", "dHKL", "Hobs", "Kobs", "Lobs"]


@pytest.mark.realdata
def test_careless_scale_transfer_example_runs_on_hypf(data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    unmerged = str(data_dir / "hypf_hg_sad" / "hypf_unmerged.mtz")
    (tmp_path / "no_anom").mkdir()
    assert main([*TRANSFER_STEP_1, unmerged, "no_anom/hewl", *SHORT]) == 0
    (tmp_path / "anom").mkdir()
    assert main([*TRANSFER_STEP_2, unmerged, "anom/hewl", *SHORT]) == 0
    assert "ignored" not in capsys.readouterr().err
    first, second = skmerge.load("no_anom/hewl.npz"), skmerge.load("anom/hewl.npz")
    assert (first.image_layers, first.mlp_layers, first.mc_samples) == (2, 10, 20) and not first.anomalous
    assert second.anomalous and second.freeze == "scales" and second.image_layers == 2
    # The frozen scale model is the first run's, per-image layers included.
    for before, after in zip(first.scale_weights_, second.scale_weights_, strict=True):
        np.testing.assert_array_equal(before, after)
    assert {"F(+)", "F(-)", "DANO"} <= set(rs.read_mtz("anom/hewl_0.mtz").columns)
