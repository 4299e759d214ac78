"""Merging statistics: every number of the table against a direct computation."""

import json

import numpy as np
import pandas as pd
import pytest
import reciprocalspaceship as rs

import skmerge
from skmerge.datasets import make_unmerged
from skmerge.errors import InputError
from skmerge.merged import anomalous_table
from skmerge.stats import MergingStatistics, cc_anom, cc_half, merging_statistics, standardise_columns
from skmerge.symmetry import map_to_asu, unique_hkl


# ------------------------------------------------------------------------ fixtures
def _image_halves(X, truth, n_repeats=2, seed=0, anomalous=False):
    """Half-dataset merges without a model: the true scales divided out and the two
    halves of a random image split merged by inverse variance (no TensorFlow)."""
    rng = np.random.RandomState(seed)
    images = np.unique(X["image_id"])
    tables = []
    for repeat in range(n_repeats):
        first = rng.permutation(images)[: len(images) // 2]
        in_first = np.isin(X["image_id"].to_numpy(), first)
        for half, rows in enumerate((in_first, ~in_first)):
            part = X.iloc[np.flatnonzero(rows)]
            merged = skmerge.merge_inverse_variance(part, scale=truth.scale[rows], anomalous=anomalous)
            if anomalous:
                merged["F(+)"] = np.sqrt(np.maximum(merged["I(+)"].to_numpy(float), 0))
                merged["F(-)"] = np.sqrt(np.maximum(merged["I(-)"].to_numpy(float), 0))
            merged["repeat"] = repeat
            merged["half"] = half
            tables.append(merged)
    out = rs.concat(tables, check_isomorphous=False)
    out.cell, out.spacegroup, out.merged = X.cell, X.spacegroup, True
    return out


@pytest.fixture(scope="module")
def simulated():
    X, truth = make_unmerged(n_images=30, anomalous=True, random_state=1)
    merged = skmerge.merge_inverse_variance(X, scale=truth.scale, anomalous=True)
    halves = _image_halves(X, truth, anomalous=True)
    return X, truth, merged, halves


def _shells_by_numpy(merged, n):
    """Equal-count shell of each measured reflection, computed independently."""
    d = merged.compute_dHKL()["dHKL"].to_numpy(float)
    s = 1 / d**2
    order = np.argsort(s, kind="stable")
    edges = np.quantile(s, np.linspace(0, 1, n + 1))
    shell = np.digitize(s, edges[1:-1], right=False)
    return pd.Series(shell, index=merged.index), edges, order


# --------------------------------------------------------------------------- CC1/2
def test_cc_half_equals_numpy(simulated):
    X, truth, merged, halves = simulated
    n = 6
    stats = merging_statistics(merged, halves, shells=n)
    shell_of, _, _ = _shells_by_numpy(merged, n)
    expected = np.zeros((2, n + 1))
    for repeat in (0, 1):
        h = halves[halves["repeat"] == repeat]
        a = h[h["half"] == 0]["I"].astype(float)
        b = h[h["half"] == 1]["I"].astype(float)
        common = a.index.intersection(b.index)
        a, b = a.loc[common].to_numpy(), b.loc[common].to_numpy()
        shell = shell_of.loc[common].to_numpy()
        for i in range(n):
            expected[repeat, i] = np.corrcoef(a[shell == i], b[shell == i])[0, 1]
        expected[repeat, n] = np.corrcoef(a, b)[0, 1]
    got = stats.table["cc_half"].to_numpy()
    np.testing.assert_allclose(got, expected.mean(axis=0), rtol=1e-10, atol=1e-12)
    assert stats.n_repeats == 2
    # Perfectly scaled simulated data: CC1/2 is high at low resolution.
    assert got[0] > 0.9


@pytest.mark.parametrize("method", ["pearson", "spearman"])
def test_cc_half_and_the_table_give_the_same_shells_and_ccs(simulated, method):
    # Both bin the measured reflections: the merged table's (N > 0) and the half table's
    # (N > 0 in either half), which are the same reflections for the halves of one data set.
    X, truth, merged, halves = simulated
    n = 6
    table = merging_statistics(merged, halves, shells=n, method=method).table
    by_halves = cc_half(halves, n_bins=n, method=method)
    np.testing.assert_allclose(by_halves["CC1/2"].to_numpy(), table["cc_half"].to_numpy(), rtol=1e-12)
    np.testing.assert_allclose(by_halves[["d_max", "d_min"]].to_numpy(), table[["d_max", "d_min"]].to_numpy())
    anomalous = cc_anom(halves, n_bins=n, method=method)
    np.testing.assert_allclose(anomalous["CCanom"].to_numpy(), table["cc_anom"].to_numpy(), rtol=1e-12)
    # Pairs per shell: reflections of the shell measured in both halves, averaged over repeats.
    assert (by_halves["n"].to_numpy()[:-1] <= table["n_unique"].to_numpy()[:-1]).all()
    assert by_halves.loc["overall", "n"] == pytest.approx(by_halves["n"].to_numpy()[:-1].sum(), abs=n)


def test_cc_anom_equals_numpy_on_dano(simulated):
    X, truth, merged, halves = simulated
    stats = merging_statistics(merged, halves, shells=1)
    values = []
    for repeat in (0, 1):
        h = halves[halves["repeat"] == repeat]
        dano = {}
        for half in (0, 1):
            part = h[h["half"] == half]
            centric = part.label_centrics()["CENTRIC"].to_numpy()
            d = part["F(+)"].to_numpy(float) - part["F(-)"].to_numpy(float)
            dano[half] = pd.Series(np.where(centric, np.nan, d), index=part.index).dropna()
        common = dano[0].index.intersection(dano[1].index)
        values.append(np.corrcoef(dano[0].loc[common], dano[1].loc[common])[0, 1])
    assert stats.table.loc["overall", "cc_anom"] == pytest.approx(np.mean(values), abs=1e-10)
    assert stats.anomalous


def test_spearman_option(simulated):
    from scipy.stats import spearmanr

    X, truth, merged, halves = simulated
    stats = merging_statistics(merged, halves[halves["repeat"] == 0], shells=1, method="spearman")
    h = halves[halves["repeat"] == 0]
    a = h[h["half"] == 0]["I"].astype(float)
    b = h[h["half"] == 1]["I"].astype(float)
    common = a.index.intersection(b.index)
    assert stats.table.loc["overall", "cc_half"] == pytest.approx(spearmanr(a.loc[common], b.loc[common])[0])


def test_cc_pred_is_sigma_weighted_pearson_on_test_rows():
    X, truth = make_unmerged(n_images=20, random_state=3)
    merged = skmerge.merge_inverse_variance(X, scale=truth.scale)
    rng = np.random.RandomState(0)
    test = rng.rand(len(X)) < 0.2
    ipred = truth.Itrue * truth.scale * np.exp(rng.normal(0, 0.3, len(X)))
    predictions = pd.DataFrame({
        "Iobs": X["Iobs"].to_numpy(float), "SIGIobs": X["SIGIobs"].to_numpy(float), "Ipred": ipred,
        "test": test.astype(int), "dHKL": X["dHKL"].to_numpy(float),
    })
    stats = merging_statistics(merged, predictions=predictions, shells=1)
    x, y, w = predictions.Iobs[test], predictions.Ipred[test], predictions.SIGIobs[test] ** -2
    cov = np.cov(x, y, aweights=w)
    expected = cov[0, 1] / np.sqrt(cov[0, 0] * cov[1, 1])
    assert stats.table.loc["overall", "cc_pred"] == pytest.approx(expected, rel=1e-9)
    assert stats.n_test == test.sum()
    # Training rows do not count: flipping their predictions changes nothing.
    predictions.loc[~test, "Ipred"] = -predictions.loc[~test, "Ipred"]
    again = merging_statistics(merged, predictions=predictions, shells=1)
    assert again.table.loc["overall", "cc_pred"] == stats.table.loc["overall", "cc_pred"]
    # Without held-out rows there is no CCpred column.
    predictions["test"] = 0
    assert "cc_pred" not in merging_statistics(merged, predictions=predictions).table


# ------------------------------------------------- counts, multiplicity, completeness
def test_counts_multiplicity_and_i_over_sigma(simulated):
    X, truth, merged, halves = simulated
    n = 5
    stats = merging_statistics(merged, shells=n)
    shell_of, _, _ = _shells_by_numpy(merged, n)
    isigi = merged["I"].to_numpy(float) / merged["SIGI"].to_numpy(float)
    for i in range(n):
        rows = shell_of.to_numpy() == i
        row = stats.table.loc[i + 1]
        assert row["n_obs"] == merged["N"].to_numpy()[rows].sum()
        assert row["n_unique"] == rows.sum()
        assert row["multiplicity"] == pytest.approx(row["n_obs"] / row["n_unique"])
        assert row["mean_isigi"] == pytest.approx(isigi[rows].mean())
    overall = stats.table.loc["overall"]
    assert overall["n_obs"] == len(X)
    assert overall["n_unique"] == len(merged)
    # Equal-count shells: every shell holds the same number of reflections, ± 1.
    counts = stats.table["n_unique"].to_numpy()[:-1]
    assert counts.max() - counts.min() <= 1


def test_completeness_against_the_full_asu():
    X, truth = make_unmerged(n_images=15, random_state=2)
    merged = skmerge.merge_inverse_variance(X)
    d = merged.compute_dHKL()["dHKL"].to_numpy(float)
    full = rs.utils.generate_reciprocal_asu(X.cell, X.spacegroup, d.min() - 1e-6)
    d_full = X.cell.calculate_d_array(full)
    possible = ((d_full >= d.min() - 1e-9) & (d_full <= d.max() + 1e-9)).sum()
    stats = merging_statistics(merged, shells=4)
    assert stats.table.loc["overall", "completeness"] == pytest.approx(len(merged) / possible)
    assert 0.2 < stats.table.loc["overall", "completeness"] < 1.0
    # Removing a third of the reflections lowers it by a third.
    fewer = merged.iloc[::3]
    thinner = merging_statistics(fewer, shells=1).table.loc["overall", "completeness"]
    dd = d[::3]
    possible = ((d_full >= dd.min() - 1e-9) & (d_full <= dd.max() + 1e-9)).sum()
    assert thinner == pytest.approx(len(fewer) / possible)


def test_anomalous_completeness_counts_pairs(simulated):
    X, truth, merged, halves = simulated
    stats = merging_statistics(merged, shells=1)
    centric = merged.label_centrics()["CENTRIC"].to_numpy()
    both = (merged["N(+)"].to_numpy() > 0) & (merged["N(-)"].to_numpy() > 0) & ~centric
    d = merged.compute_dHKL()["dHKL"].to_numpy(float)
    full = rs.utils.generate_reciprocal_asu(X.cell, X.spacegroup, d.min() - 1e-6)
    d_full = X.cell.calculate_d_array(full)
    full = full[(d_full >= d.min() - 1e-9) & (d_full <= d.max() + 1e-9)]
    acentric = (~X.spacegroup.operations().centric_flag_array(full)).sum()
    assert stats.table.loc["overall", "anom_completeness"] == pytest.approx(both.sum() / acentric)


def test_equal_volume_shells_hold_equal_shares_of_the_asu(simulated):
    X, truth, merged, halves = simulated
    stats = merging_statistics(merged, shells=5, binning="equal-volume")
    table = stats.table.drop(index="overall")
    possible = table["n_unique"] / table["completeness"]
    assert possible.max() - possible.min() <= 0.005 * possible.mean()
    assert stats.binning == "equal-volume"
    assert "equal numbers of possible reflections" in stats.header()


def test_explicit_shell_limits_leave_out_reflections_outside(simulated):
    X, truth, merged, halves = simulated
    stats = merging_statistics(merged, shells=[10.0, 4.0, 3.0])
    d = merged.compute_dHKL()["dHKL"].to_numpy(float)
    assert list(stats.table.index) == [1, 2, "overall"]
    # A shell holds d_max ≥ d > d_min (the last one includes its d_min).
    assert stats.table.loc[1, "n_unique"] == ((d <= 10.0) & (d > 4.0)).sum()
    assert stats.table.loc["overall", "n_unique"] == ((d <= 10.0) & (d >= 3.0)).sum()


@pytest.mark.realdata
def test_completeness_equals_reciprocalspaceship(data_dir):
    path = data_dir / "hypf_hg_sad" / "hypf_unmerged.mtz"
    X = skmerge.read_unmerged(path, anomalous=True)
    merged = skmerge.merge_inverse_variance(X, anomalous=True)
    raw = rs.read_mtz(str(path))
    expected = rs.stats.compute_completeness(raw, bins=10)[("completeness", "non-anomalous")]
    # reciprocalspaceship's shells: equal numbers of observations. The two differ only for
    # a reflection on a shell boundary (reciprocalspaceship also drops the one lowest-
    # resolution reflection from both counts), hence the small tolerance.
    _, _, edges = raw.hkl_to_asu().assign_resolution_bins(bins=10, return_labels=True, return_edges=True)
    stats = merging_statistics(merged, shells=list(edges))
    assert stats.table.loc["overall", "completeness"] == pytest.approx(expected["overall"], abs=2e-4)
    np.testing.assert_allclose(stats.table["completeness"].to_numpy()[:-1], expected.to_numpy()[:-1], atol=2e-4)
    assert stats.table.loc["overall", "completeness"] < 1


# ----------------------------------------------------------------- table and I/O
def test_table_text_and_round_trip(simulated):
    X, truth, merged, halves = simulated
    stats = merging_statistics(merged, halves, shells=4)
    text = str(stats)
    lines = text.splitlines()
    assert "CC1/2" in lines[1] and "CCanom" in lines[1] and "Cmpl%" in lines[1]
    rows = [l for l in lines if l[:1] == " " and l.split()[0][0].isdigit()]
    assert len(rows) == 5 and rows[-1].endswith("overall")
    widths = {len(l) for l in rows[:-1]}
    assert len(widths) == 1, "columns are aligned"
    back = MergingStatistics.from_dict(json.loads(json.dumps(stats.to_dict())))
    pd.testing.assert_frame_equal(back.table, stats.table, check_names=False, check_dtype=False)
    assert str(back) == text


def test_careless_column_names_are_read(simulated):
    X, truth, merged, halves = simulated
    expected = merging_statistics(merged, halves, shells=3).table
    careless = merged.rename(columns={"SIGI": "SigI", "SIGI(+)": "SigI(+)", "SIGI(-)": "SigI(-)"})
    careless_halves = halves.drop(columns=["N"]).rename(columns={"SIGI": "SigI"})
    careless.cell, careless.spacegroup = merged.cell, merged.spacegroup
    careless_halves.cell, careless_halves.spacegroup = halves.cell, halves.spacegroup
    got = merging_statistics(careless, careless_halves, shells=3).table
    pd.testing.assert_frame_equal(got, expected)
    renamed, _ = standardise_columns(careless)
    assert "SIGI" in renamed and "SigI" not in renamed


def test_standardise_derives_anomalous_means():
    X, truth = make_unmerged(n_images=10, anomalous=True, random_state=4)
    merged = skmerge.merge_inverse_variance(X, anomalous=True)
    only_friedel = merged.drop(columns=["I", "SIGI", "N"])
    out, notes = standardise_columns(only_friedel, "merged")
    assert notes and {"I", "SIGI", "N"} <= set(out.columns)
    np.testing.assert_array_equal(out["N"].to_numpy(), merged["N"].to_numpy())


# ------------------------------------------------------------ Friedel combination
@pytest.fixture(scope="module")
def friedel_table():
    """A merged anomalous table from per-half values, with centrics and missing halves."""
    X, _ = make_unmerged(n_images=8, anomalous=True, random_state=5)
    hkl, _ = map_to_asu(X[["Hobs", "Kobs", "Lobs"]].to_numpy(np.int32), X.spacegroup, anomalous=True)
    hkl, _ = unique_hkl(hkl)
    rng = np.random.default_rng(0)
    f = rng.uniform(5, 50, len(hkl))
    columns = {"F": f, "SIGF": rng.uniform(0.5, 2, len(hkl)), "I": f**2 + 1, "SIGI": rng.uniform(5, 20, len(hkl)),
               "N": rng.integers(1, 6, len(hkl)).astype(np.int32)}
    table = anomalous_table(hkl, columns, X.spacegroup, X.cell)
    centric = table.label_centrics()["CENTRIC"].to_numpy()
    assert centric.any() and (~centric).any()
    assert table["F(-)"].isna().any(), "some acentric reflections lack a Friedel half"
    return table, centric


MEANS = ["F", "SIGF", "I", "SIGI", "N", "DANO", "SIGDANO"]


def _assert_same_columns(got, expected):
    # The table stores MTZ's float32: the two paths agree to its precision.
    for name in MEANS:
        np.testing.assert_allclose(got[name].to_numpy(np.float64, na_value=np.nan),
                                   expected[name].to_numpy(np.float64, na_value=np.nan), rtol=1e-6, atol=1e-5,
                                   err_msg=name)


def test_standardise_combines_friedel_halves_as_the_merged_table_does(friedel_table):
    table, centric = friedel_table
    assert list(table.columns) == ["F", "SIGF", "I", "SIGI", "N", "F(+)", "SIGF(+)", "F(-)", "SIGF(-)", "I(+)",
                                   "SIGI(+)", "I(-)", "SIGI(-)", "N(+)", "N(-)", "DANO", "SIGDANO"]
    friedel_only = table.drop(columns=MEANS)
    out, notes = standardise_columns(friedel_only, "merged")
    _assert_same_columns(out, table)
    assert notes == ["merged: F, SIGF, I, SIGI, N derived from the Friedel columns."]
    # A centric reflection is one reflection: its mean and σ are its one value's.
    np.testing.assert_allclose(table["SIGI"].to_numpy()[centric], table["SIGI(+)"].to_numpy()[centric])
    assert table["DANO"].isna().to_numpy()[centric].all()


def test_standardise_reads_careless_friedel_layout(friedel_table):
    # careless's spelling (SigF), a centric's value in its (+) columns only, and a Friedel
    # half never observed holding a value with N(±) = 0: the same combined columns.
    table, centric = friedel_table
    careless = table.drop(columns=MEANS)
    for name in ("F", "SIGF", "I", "SIGI"):
        careless.loc[centric, name + "(-)"] = np.nan
    missing_minus = careless["F(-)"].isna().to_numpy() & ~centric
    careless.loc[missing_minus, ["F(-)", "SIGF(-)", "I(-)", "SIGI(-)"]] = 1.0
    careless = careless.rename(columns={c: "Sig" + c[3:] for c in careless.columns if c.startswith("SIG")})
    careless.cell, careless.spacegroup = table.cell, table.spacegroup
    out, _ = standardise_columns(careless, "half-dataset")
    _assert_same_columns(out, table)


def test_friedel_combination_needs_the_space_group(friedel_table):
    table, _ = friedel_table
    friedel_only = table.drop(columns=MEANS)
    friedel_only.spacegroup = None
    with pytest.raises(InputError, match="space group"):
        standardise_columns(friedel_only)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"binning": "log"}, "binning"), ({"method": "kendall"}, "method"), ({"shells": 0}, "shells"),
     ({"shells": [2.0, 3.0]}, "decreasing")],
)
def test_bad_arguments_raise_input_error(simulated, kwargs, message):
    X, truth, merged, halves = simulated
    with pytest.raises(InputError, match=message):
        merging_statistics(merged, **kwargs)


def test_merging_statistics_is_public():
    assert skmerge.merging_statistics is merging_statistics
    assert "merging_statistics" in skmerge.__all__


# --------------------------------------------------------------- the benchmark's CCs
def _bench_careless():
    import importlib
    import sys
    from pathlib import Path

    bench = str(Path(__file__).resolve().parents[1] / "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    return importlib.import_module("_careless")


def test_benchmark_ccs_count_friedel_halves_apart_in_both_layouts(simulated, tmp_path):
    X, truth, merged, halves = simulated
    skmerge_file = tmp_path / "skmerge_xval_0.mtz"
    halves.infer_mtz_dtypes().write_mtz(str(skmerge_file))
    careless = halves.drop(columns=["I", "SIGI", "N"]).rename(columns={"SIGI(+)": "SigI(+)", "SIGI(-)": "SigI(-)"})
    careless_file = tmp_path / "careless_xval_0.mtz"
    careless.infer_mtz_dtypes().write_mtz(str(careless_file))

    bench = _bench_careless()
    got = bench.half_dataset_cc(skmerge_file, anomalous=True)
    assert bench.half_dataset_cc(careless_file, anomalous=True) == got

    # Independently: every measured Friedel half of a reflection is a reflection of its own.
    halves = rs.read_mtz(str(skmerge_file))
    centric = halves.label_centrics()["CENTRIC"].to_numpy()
    expected_half, expected_anom = [], []
    for repeat in (0, 1):
        values = {}
        for half in (0, 1):
            rows = (halves["repeat"].to_numpy() == repeat) & (halves["half"].to_numpy() == half)
            part = halves[rows]
            hkl = [tuple(i) for i in part.reset_index()[["H", "K", "L"]].to_numpy()]
            plus = {(k, "+"): v for k, v, n in zip(hkl, part["I(+)"].to_numpy(float), part["N(+)"].to_numpy()) if n > 0}
            minus = {(k, "-"): v for k, v, n, c in zip(hkl, part["I(-)"].to_numpy(float), part["N(-)"].to_numpy(),
                                                       centric[rows]) if n > 0 and not c}
            dano = part["F(+)"].to_numpy(float) - part["F(-)"].to_numpy(float)
            values[half] = ({**plus, **minus}, {k: d for k, d, c in zip(hkl, dano, centric[rows])
                                                if np.isfinite(d) and not c})
        for which, out in ((0, expected_half), (1, expected_anom)):
            common = sorted(set(values[0][which]) & set(values[1][which]))
            out.append(np.corrcoef([values[0][which][k] for k in common], [values[1][which][k] for k in common])[0, 1])
    np.testing.assert_allclose(got["cc_half_per_repeat"], expected_half, rtol=1e-9)
    np.testing.assert_allclose(got["cc_anom_per_repeat"], expected_anom, rtol=1e-9)
    assert got["quantity"] == "I" and got["cc_half"] == pytest.approx(np.mean(expected_half))
