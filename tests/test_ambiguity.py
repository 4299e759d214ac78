"""Indexing ambiguity: candidate operators, the assignment before the fit, the fitted
settings and their use by transform, predict, score, half datasets and the command line."""

import copy
import warnings

import gemmi
import numpy as np
import pytest

from skmerge import VariationalMerger
from skmerge.ambiguity import (REINDEX_COLUMN, Operators, assign_operators, candidate_operators, parse_operator,
                               reindex, transform_hkl)
from skmerge.datasets import make_unmerged
from skmerge.errors import InputError, ParameterError
from skmerge.symmetry import map_to_asu, pack_hkl

HEXAGONAL = (60.0, 60.0, 90.0, 90.0, 90.0, 120.0)
STILLS = dict(stills=True, mosaicity=0.0004, dmin=2.5, reindexed_fraction=0.5)
FAST = dict(metadata=["dHKL", "XDET", "YDET", "EWALD_OFFSET"], mlp_layers=2, max_iter=150, random_state=0)


def _composite(operators, applied_names, assigned):
    """Per image, the operator applied by the simulator followed by the one assigned:
    one value for all images when the assignment is right up to a global operator."""
    applied = np.array([operators.names.index(name) for name in applied_names])
    return operators.product[applied, assigned]


@pytest.mark.parametrize("spacegroup, cell, n_settings", [
    ("P 63", HEXAGONAL, 2), ("P 43", (55, 55, 80, 90, 90, 90), 2), ("R 3", (58.4, 58.4, 156.2, 90, 90, 120), 2),
    ("P 3", HEXAGONAL, 4), ("P 61 2 2", HEXAGONAL, 1), ("P 21 21 21", (40, 50, 60, 90, 90, 90), 1),
])
def test_candidate_operators_are_the_lattice_twin_laws(spacegroup, cell, n_settings):
    operators = candidate_operators("auto", gemmi.SpaceGroup(spacegroup), gemmi.UnitCell(*cell))
    if n_settings == 1:
        assert operators is None
        return
    assert len(operators) == n_settings and operators.names[0] == "h,k,l"
    # A group: every product is one of them, the identity is neutral, each has an inverse.
    assert (operators.product[0] == np.arange(n_settings)).all()
    assert all(sorted(row) == list(range(n_settings)) for row in operators.product)
    assert (operators.product[np.arange(n_settings), operators.inverse] == 0).all()


def test_explicit_operators_are_checked():
    sg, cell = gemmi.SpaceGroup("P 63"), gemmi.UnitCell(*HEXAGONAL)
    assert candidate_operators(["k,h,-l"], sg, cell).names == ["h,k,l", "k,h,-l"]
    assert candidate_operators("none", sg, cell) is None
    with pytest.raises(ParameterError, match="'k,h'"):
        candidate_operators(["k,h"], sg, cell)
    with pytest.raises(ParameterError, match="does not map the lattice"):
        candidate_operators(["k,h,-l"], sg, gemmi.UnitCell(60, 70, 90, 90, 90, 90))
    with pytest.raises(ParameterError, match="equivalent"):
        candidate_operators(["k,h,-l", "-k,-h,-l"], sg, cell)


def test_transform_hkl_matches_gemmi():
    op = gemmi.Op("-x,-x+y,-z")
    hkl = np.array([[1, 2, 3], [4, -1, 2], [-3, 0, 7]])
    assert transform_hkl(hkl, op).tolist() == [op.apply_to_hkl(list(map(int, h))) for h in hkl]


def test_simulator_reindexes_images_and_reports_the_operators():
    kw = dict(n_images=20, spacegroup="P 63", cell=HEXAGONAL, stills=True, mosaicity=0.0004, dmin=3.0,
              random_state=3)
    X0, _ = make_unmerged(**kw)
    X, truth = make_unmerged(reindexed_fraction=0.5, **kw)
    assert len(truth.image_operator) == 20 and 0 < (truth.image_operator != "h,k,l").sum() < 20
    # Undoing each image's operator restores the unscrambled indices.
    operators = candidate_operators("auto", X.spacegroup, X.cell)
    applied = np.array([operators.names.index(name) for name in truth.image_operator])
    restored = reindex(X, operators, operators.inverse[applied], np.arange(20), False)
    assert (restored[["H", "K", "L"]].to_numpy() == X0[["H", "K", "L"]].to_numpy()).all()
    assert not (X[["H", "K", "L"]].to_numpy() == X0[["H", "K", "L"]].to_numpy()).all()
    with pytest.raises(InputError, match="twin laws"):
        make_unmerged(n_images=2, reindexed_fraction=0.5)


@pytest.mark.parametrize("spacegroup, cell", [
    ("P 63", HEXAGONAL), ("P 43", (55, 55, 80, 90, 90, 90)), ("R 3", (58.4, 58.4, 156.2, 90, 90, 120)),
    ("P 3", HEXAGONAL),
])
def test_assignment_finds_every_image_setting(spacegroup, cell):
    X, truth = make_unmerged(n_images=60, spacegroup=spacegroup, cell=cell, random_state=1, **STILLS)
    operators = candidate_operators("auto", X.spacegroup, X.cell)
    image_ids, assigned = assign_operators(X, operators, random_state=0)
    composite = _composite(operators, truth.image_operator, assigned)
    assert len(np.unique(composite)) == 1
    # The setting of most images wins.
    majority = np.bincount([operators.names.index(n) for n in truth.image_operator]).argmax()
    assert composite[0] == operators.inverse[majority]


def test_reference_chooses_the_global_setting():
    X, truth = make_unmerged(n_images=40, spacegroup="P 43", cell=(55, 55, 80, 90, 90, 90), random_state=2,
                             **{**STILLS, "reindexed_fraction": 0.8})
    operators = candidate_operators("auto", X.spacegroup, X.cell)
    _, assigned = assign_operators(X, operators, reference=truth.merged.assign(SIGF=1.0), random_state=0)
    # Most images are in the twin setting, yet the reference's (the truth's) wins.
    assert (_composite(operators, truth.image_operator, assigned) == 0).all()


def test_rotation_partials_do_not_split_a_consistent_data_set():
    # A spot's partials on adjacent images anti-correlate; they must not favour the twin setting.
    X, _ = make_unmerged(n_images=40, spacegroup="P 63", cell=HEXAGONAL, oscillation=0.5, dmin=3.0, random_state=0)
    operators = candidate_operators("auto", X.spacegroup, X.cell)
    assert (assign_operators(X, operators, random_state=0)[1] == 0).all()


def _first_images(X, n):
    return X[X["image_id"] < n]


@pytest.fixture(scope="module")
def scrambled_fit():
    # 40 images to fit and 6 more of the same crystal that the fit does not see.
    kw = dict(n_images=46, spacegroup="P 63", cell=HEXAGONAL, random_state=4)
    X_all, truth = make_unmerged(**kw, **STILLS)
    X0, _ = make_unmerged(**kw, **{**STILLS, "reindexed_fraction": 0.0})
    X, X0 = _first_images(X_all, 40), _first_images(X0, 40)
    truth.unseen = X_all[X_all["image_id"] >= 40]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merger = VariationalMerger(reindexing_reference=truth.merged.assign(SIGF=1.0), **FAST).fit(X)
        plain = VariationalMerger(reindexing="none", **FAST).fit(X0)
    return X, truth, X0, merger, plain


def test_fit_assigns_every_image_with_its_probability(scrambled_fit):
    X, truth, _, merger, _ = scrambled_fit
    operators = Operators([parse_operator(n) for n in merger.reindexing_operators_], X.spacegroup)
    assert (_composite(operators, truth.image_operator[:40], merger.image_operators_) == 0).all()
    table = merger.image_reindexing()
    assert list(table.index) == list(merger.image_ids_)
    assert table["probability"].min() > 0.99
    assert np.allclose(merger.image_operator_probabilities_.sum(axis=1), 1.0)


def test_scrambled_merge_equals_the_unscrambled_one(scrambled_fit):
    X, truth, X0, merger, plain = scrambled_fit
    merged = merger.transform(X).join(plain.transform(X0)[["F"]], rsuffix="_plain", how="inner")
    assert len(merged) > 0.95 * len(plain.transform(X0))
    assert np.corrcoef(merged["F"], merged["F_plain"])[0, 1] > 0.995
    assert np.corrcoef(merger.predict(X), plain.predict(X0))[0, 1] > 0.99


def test_reindex_is_idempotent_and_serves_unseen_images(scrambled_fit):
    X, truth, X0, merger, _ = scrambled_fit
    consistent = merger.reindex(X)
    assert REINDEX_COLUMN in consistent.columns and merger.reindex(consistent) is consistent
    assert (consistent[["H", "K", "L"]].to_numpy() == X0[["H", "K", "L"]].to_numpy()).all()
    # Images the fit never saw, indexed at random: assigned by the fitted model.
    new = truth.unseen
    moved = merger.reindex(new)
    operators = Operators([parse_operator(n) for n in merger.reindexing_operators_], X.spacegroup)
    ops = moved.groupby("image_id")[REINDEX_COLUMN].first().to_numpy()
    assert (_composite(operators, truth.image_operator[40:], ops) == 0).all()
    # score() uses those settings: every image flipped scores worse.
    flipped = reindex(moved.drop(columns=[REINDEX_COLUMN]), operators, np.ones(6, int), np.arange(40, 46), False)
    assert merger.score(new) > merger.score(flipped) + 0.1


def test_half_datasets_keep_the_fitted_settings(scrambled_fit):
    from skmerge.half_datasets import half_dataset_merges
    
    X, _, X0, merger, plain = scrambled_fit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        halves = half_dataset_merges(merger, X, random_state=0)
    # Each half is merged in the full merge's setting (a half merged as indexed, or in
    # the other setting, would not agree with it).
    full = plain.transform(X0)[["F"]].reset_index()
    twin = full.copy()
    twin[["H", "K", "L"]] = map_to_asu(transform_hkl(full[["H", "K", "L"]].to_numpy(), parse_operator("k,h,-l")),
                                       X.spacegroup)[0]
    for _, half in halves.groupby("half"):
        same, other = (half[["F"]].join(table.set_index(["H", "K", "L"]), rsuffix="_full", how="inner")
                       for table in (full, twin))
        assert np.corrcoef(same["F"], same["F_full"])[0, 1] > 0.8
        assert np.corrcoef(other["F"], other["F_full"])[0, 1] < 0.6


def test_saved_merger_keeps_the_settings(scrambled_fit, tmp_path):
    from skmerge.errors import NotSerializableError

    X, *_ = scrambled_fit
    merger = copy.deepcopy(scrambled_fit[3])
    with pytest.raises(NotSerializableError):  # a reference held in memory: joblib only
        merger.save(tmp_path / "m.npz")
    merger.set_params(reindexing_reference=None)
    loaded = VariationalMerger.load(merger.save(tmp_path / "m.npz"))
    assert loaded.reindexing_operators_ == merger.reindexing_operators_
    assert (loaded.image_operators_ == merger.image_operators_).all()
    assert np.allclose(loaded.predict(X), merger.predict(X))


@pytest.mark.parametrize("spacegroup, cell", [("P 21 21 21", (40, 50, 60, 90, 90, 90)), ("P 63", HEXAGONAL)])
def test_consistent_data_merge_as_without_reindexing(spacegroup, cell):
    # No twin law (P 21 21 21), or every image already in one setting (P 63): no cost.
    X, _ = make_unmerged(n_images=8, spacegroup=spacegroup, cell=cell, dmin=3.0, random_state=0)
    params = dict(mlp_layers=2, max_iter=50, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        auto = VariationalMerger(**params).fit(X)
        none = VariationalMerger(reindexing="none", **params).fit(X)
    assert auto.reindexing_operators_ == ["h,k,l"] and (auto.image_operators_ == 0).all()
    assert auto.reindex(X) is X
    assert np.array_equal(auto.predict(X), none.predict(X))


def test_symmetric_intensities_are_merged_as_indexed():
    from skmerge.errors import DataWarning

    # P 63 intensities made symmetric under the twin law (as a crystal of higher symmetry, or a perfect twin).
    X, truth = make_unmerged(n_images=60, spacegroup="P 63", cell=HEXAGONAL, random_state=1, **STILLS)
    operators = candidate_operators("auto", X.spacegroup, X.cell)
    twin = reindex(X.drop(columns=["Iobs"]).assign(Iobs=0.0), operators, np.ones(60, int), np.arange(60), False)
    both = np.concatenate([X[["H", "K", "L"]].to_numpy(), twin[["H", "K", "L"]].to_numpy()])
    _, where = np.unique(pack_hkl(both), return_inverse=True)
    mean = np.bincount(where, np.tile(X["Iobs"].to_numpy(np.float64), 2)) / np.bincount(where)
    symmetric = X.assign(Iobs=mean[where[: len(X)]].astype(np.float32))
    with pytest.warns(DataWarning, match="nearly symmetric under -h-k,k,-l"):
        _, assigned = assign_operators(symmetric, operators, random_state=0)
    assert not assigned.any()


def test_fit_moves_images_the_model_finds_in_another_setting(monkeypatch):
    import skmerge.merger as merger_module

    # Rotation data measure each reflection several times, so the fitted model can tell
    # an image in the wrong setting (stills need many more images for that).
    X, _ = make_unmerged(n_images=40, spacegroup="P 63", cell=HEXAGONAL, dmin=3.0, random_state=5)
    wrong = np.zeros(40, np.int64)
    wrong[[3, 11, 30]] = 1
    monkeypatch.setattr(merger_module, "assign_operators", lambda X, *a: (np.unique(X["image_id"]), wrong))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merger = VariationalMerger(**{**FAST, "metadata": ["dHKL", "XDET", "YDET", "ROT"], "max_iter": 100}).fit(X)
    assert (merger.image_operators_ == 0).all()
    assert merger.image_operator_probabilities_[[3, 11, 30], 0].min() > 0.99


def _hypf(data_dir):
    import skmerge

    return skmerge.read_unmerged(data_dir / "hypf_hg_sad" / "hypf_unmerged.mtz", anomalous=True)


@pytest.mark.realdata
def test_hypf_intensities_are_symmetric_under_the_twin_law(data_dir):
    from skmerge.errors import DataWarning

    # hypf (R3) merges with CC 0.98 between h and its twin-related reflection: its settings
    # cannot be told apart, and a scrambled half changes nothing measurable.
    X = _hypf(data_dir)
    operators = candidate_operators("auto", X.spacegroup, X.cell)
    with pytest.warns(DataWarning, match="nearly symmetric"):
        _, assigned = assign_operators(X, operators, random_state=0)
    assert not assigned.any()


@pytest.mark.realdata
def test_hypf_geometry_with_scrambled_images_merges_as_the_original(data_dir):
    from skmerge.datasets import simulate_intensities

    # hypf's geometry (84 rotation images, partials) with intensities of a known R3 structure,
    # 40 images reindexed by the lattice's twin law x-y,-y,-z.
    X, truth = simulate_intensities(_hypf(data_dir), partiality_key="FRACTIONCALC", random_state=0)
    images = np.unique(X["image_id"])
    scrambled = np.isin(images, np.random.default_rng(0).choice(images, 40, replace=False))
    operators = Operators([gemmi.Op("x,y,z"), gemmi.Op("x-y,-y,-z")], X.spacegroup)
    X_scrambled = reindex(X, operators, scrambled.astype(int), images, True).drop(columns=[REINDEX_COLUMN])
    auto = candidate_operators("auto", X.spacegroup, X.cell)
    _, assigned = assign_operators(X_scrambled, auto, random_state=0)
    assert np.mean(assigned == scrambled) >= 0.99
    params = dict(anomalous=True, metadata=["dHKL", "Hobs", "Kobs", "Lobs", "XDET", "YDET", "BATCH", "FRACTIONCALC"],
                  max_iter=200, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = VariationalMerger(**params).fit(X_scrambled).transform(X_scrambled)
        original = VariationalMerger(**params).fit(X).transform(X)
    both = merged[["F"]].join(original[["F"]], rsuffix="_original", how="inner")
    assert len(both) == len(original)
    assert np.corrcoef(both["F"], both["F_original"])[0, 1] >= 0.995
