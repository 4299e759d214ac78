"""VariationalMerger.partial_fit: merging images chunk by chunk (assumed density filtering)."""

import copy

import gemmi
import joblib
import numpy as np
import pytest

from skmerge import InputError, VariationalMerger
from skmerge._tf import tf, tfd
from skmerge.datasets import make_unmerged
from skmerge.errors import ParameterError
from skmerge.model.data import encode
from skmerge.model.posterior import PositiveTruncatedNormal

# Weak intensities, so that each half of the images alone merges visibly worse than both.
FAST = dict(mlp_layers=2, mlp_width=8, max_iter=300, random_state=0)


def _cc(merged, reference, index=None):
    """CC of F between two merged tables over their common reflections (within ``index``)."""
    joined = merged[["F"]].join(reference[["F"]], rsuffix="_ref", how="inner")
    if index is not None:
        joined = joined.loc[joined.index.intersection(index)]
    return np.corrcoef(joined["F"].to_numpy(float), joined["F_ref"].to_numpy(float))[0, 1]


@pytest.fixture(scope="module")
def chunks():
    X, truth = make_unmerged(n_images=60, mean_intensity=20.0, random_state=0)
    return X, truth, X[X["image_id"] < 30], X[X["image_id"] >= 30]


@pytest.fixture(scope="module")
def fits(chunks):
    """The fit of every image at once, the first chunk's fit, and that fit updated with
    the second chunk by partial_fit and by a plain warm start (which forgets the first)."""
    X, _, first, second = chunks
    whole = VariationalMerger(**FAST).fit(X)
    online_first = VariationalMerger(**FAST).partial_fit(first)
    online = copy.deepcopy(online_first).partial_fit(second)
    forgetting = copy.deepcopy(online_first).set_params(warm_start=True).fit(second)
    return {"whole": whole, "online_first": online_first, "online": online, "forgetting": forgetting}


def test_two_chunks_merge_like_all_images_at_once_and_a_warm_start_does_not(chunks, fits):
    X, truth, first, second = chunks
    whole, online, forgetting = (fits[k].transform(X) for k in ("whole", "online", "forgetting"))
    # Reflections observed in both chunks: the warm start's merge rests on the second's alone.
    both = fits["online_first"].transform(first).index.intersection(forgetting.index)
    assert len(both) > 1000
    assert _cc(online, whole, both) > 0.99 > _cc(forgetting, whole, both)
    assert _cc(online, whole) > 0.99
    assert abs(_cc(online, truth.merged) - _cc(whole, truth.merged)) < 0.01
    assert _cc(forgetting, truth.merged) < _cc(online, truth.merged) - 0.02
    assert len(fits["online"].reflections_) == len(fits["whole"].reflections_)


def test_reflections_of_the_first_chunk_only_keep_their_posterior(chunks, fits):
    _, _, first, second = chunks
    before, after = fits["online_first"], fits["online"]
    keys_before, keys_after = before.reflections_.keys, after.reflections_.keys
    rows_before = np.flatnonzero(~np.isin(keys_before, encode(second, anomalous=False, separate_files=False).keys))
    assert len(rows_before) > 100
    rows_after = np.searchsorted(keys_after, keys_before[rows_before])
    np.testing.assert_array_equal(keys_after[rows_after], keys_before[rows_before])
    for name in ("loc_raw", "scale_raw"):
        np.testing.assert_array_equal(after.posterior_weights_[name][rows_after],
                                      before.posterior_weights_[name][rows_before])
    np.testing.assert_array_equal(after.reflection_counts_[rows_after], before.reflection_counts_[rows_before])
    assert after.reflection_counts_.sum() == len(first) + len(second)
    np.testing.assert_array_equal(after.image_ids_, np.arange(60))
    # The first chunk's images keep their offsets (the last per-image weights).
    np.testing.assert_array_equal(after.scale_weights_[-1][:30], before.scale_weights_[-1])


def test_the_first_call_is_fit():
    X, _ = make_unmerged(n_images=8, random_state=1)
    fitted = VariationalMerger(**{**FAST, "max_iter": 20}).fit(X)
    online = VariationalMerger(**{**FAST, "max_iter": 20}).partial_fit(X)
    for name in ("loc_raw", "scale_raw"):
        np.testing.assert_array_equal(online.posterior_weights_[name], fitted.posterior_weights_[name])
    for a, b in zip(online.scale_weights_, fitted.scale_weights_):
        np.testing.assert_array_equal(a, b)


def test_a_chunk_of_another_crystal_form_or_other_reflections_is_refused(chunks, fits):
    _, _, _, second = chunks
    merger = copy.deepcopy(fits["online_first"])
    other = second.copy()
    other.spacegroup = gemmi.SpaceGroup("P 1 21 1")
    with pytest.raises(InputError, match="space group P 1 21 1"):
        merger.partial_fit(other)
    with pytest.raises(ParameterError, match="anomalous=False"):
        copy.deepcopy(merger).set_params(anomalous=True).partial_fit(second)
    with pytest.raises(ParameterError, match="mlp_layers"):
        copy.deepcopy(merger).set_params(mlp_layers=3).partial_fit(second)
    np.testing.assert_array_equal(merger.posterior_weights_["loc_raw"],
                                  fits["online_first"].posterior_weights_["loc_raw"])


def test_a_merger_updated_online_persists_and_updates_again(chunks, fits, tmp_path):
    X, _, _, _ = chunks
    online = fits["online"]
    restored = {"joblib": joblib.load(joblib.dump(online, tmp_path / "m.joblib")[0]),
                "safe": VariationalMerger.load(online.save(tmp_path / "m.npz"))}
    more = X[X["image_id"] < 6].copy()
    more["image_id"] += 100
    for merger in restored.values():
        np.testing.assert_allclose(merger.predict(X), online.predict(X), rtol=1e-6)
        merger.set_params(max_iter=20).partial_fit(more)
        assert len(merger.image_ids_) == 66
        assert merger.reflection_counts_.sum() == len(X) + len(more)


def test_anomalous_double_wilson_updates_both_friedel_halves():
    X, _ = make_unmerged(n_images=12, anomalous=True, anomalous_signal=0.1, random_state=4)
    merger = VariationalMerger(anomalous=True, **{**FAST, "max_iter": 40}).partial_fit(X[X["image_id"] < 6])
    first_r = merger.prior_r_.copy()
    merger.partial_fit(X[X["image_id"] >= 6])
    merged = merger.transform(X)
    assert merger.reflection_counts_.sum() == len(X)
    assert np.isfinite(merger.prior_r_).all() and not np.array_equal(merger.prior_r_, first_r)
    assert np.isfinite(merged["DANO"]).sum() > 100


def test_the_kl_of_two_truncated_normals_is_tfps_and_matches_monte_carlo():
    q = PositiveTruncatedNormal(tf.constant([1.0, 0.2, 3.0]), tf.constant([0.5, 1.0, 0.3]))
    p = PositiveTruncatedNormal(tf.constant([0.8, 1.0, 2.5]), tf.constant([0.7, 0.4, 1.0]))
    samples = q.sample(200_000, seed=tf.constant([1, 2]))
    monte_carlo = tf.reduce_mean(q.log_prob(samples) - p.log_prob(samples), axis=0)
    np.testing.assert_allclose(tfd.kl_divergence(q, p).numpy(), monte_carlo.numpy(), atol=0.01)
    np.testing.assert_allclose(tfd.kl_divergence(q, q).numpy(), 0.0, atol=1e-5)
