"""The images' scale weights' share of SIGF (:mod:`skmerge.model.scale_uncertainty`):
each row's gradient against TensorFlow's Jacobian, the factors against a reference
computation for image offsets, and how the merged table applies them."""

from types import SimpleNamespace

import numpy as np
import pytest

from skmerge import VariationalMerger
from skmerge._tf import tf
from skmerge.datasets import make_unmerged
from skmerge.model.fitted import evaluation_chunks, mixture_images
from skmerge.model.marginals import row_pieces
from skmerge.model.sandwich import shared_correlation
from skmerge.model.scaling import ScaleNetwork

FAST = dict(mlp_layers=2, max_iter=150, random_state=0)


def _network_with_image_weights(n_images=3, n_features=2, image_layers=2, offsets=True):
    rng = np.random.RandomState(0)
    network = ScaleNetwork(n_features, 2, 4, n_images if offsets else 0, rng, image_layers=image_layers,
                           n_layer_images=n_images)
    # Image layers start at zero; give them values, so that every weight moves the scale.
    for variable in [*network.image_kernels, *network.image_biases]:
        variable.assign(rng.normal(0, 0.5, variable.shape).astype(np.float32))
    if offsets:
        network.image_offsets.assign(rng.normal(0, 0.3, n_images).astype(np.float32))
    return network


@pytest.mark.parametrize("image_layers, offsets", [(2, True), (1, False), (0, True)])
def test_each_rows_gradient_is_its_own_images_column_of_the_jacobian(image_layers, offsets):
    network = _network_with_image_weights(image_layers=image_layers, offsets=offsets)
    rng = np.random.default_rng(1)
    features = tf.constant(rng.normal(size=(9, 2)), tf.float32)
    image = tf.constant([0, 1, 2, 0, 1, 2, 2, 0, 1])
    data = {"features": features, "image": image}
    rows = network.image_parameter_gradients(data)
    assert rows.shape == (9, network.image_weight_count)

    variables = ([network.image_offsets] if offsets else []) + [
        w for pair in zip(network.image_kernels, network.image_biases) for w in pair]
    with tf.GradientTape(persistent=True) as tape:
        mu, spread = network(features, image)
        log_scale = mu + tf.square(spread) / 2
    jacobians = [tape.jacobian(log_scale, v, experimental_use_pfor=False).numpy() for v in variables]
    own = np.concatenate([j[np.arange(9), image.numpy()].reshape(9, -1) for j in jacobians], 1)
    np.testing.assert_allclose(rows, own, rtol=1e-4, atol=1e-6)
    # A row's scale does not move with another image's weights.
    others = sum(np.abs(j).sum() for j in jacobians) - np.abs(own).sum()
    assert others == pytest.approx(0.0, abs=1e-5)


def test_held_out_rows_and_encoders_have_no_weights_of_their_own():
    network = _network_with_image_weights()
    data = {"features": tf.zeros([2, 2]), "image": tf.constant([-1, 0])}
    rows = network.image_parameter_gradients(data)
    assert (rows[0] == 0).all() and (rows[1] != 0).any()
    encoder = ScaleNetwork(2, 2, 4, 0, np.random.RandomState(0), encoder=True)
    assert encoder.image_weight_count == 0


def _offset_reference(merger, X):
    """The factors of a fit with image offsets only (∂ log Σ/∂b = 1), image by image in
    scalars: Aⱼ = Σ cᵢ(sᵢF²)², bₕⱼ = Σ cᵢ·2sᵢF·sᵢF², loss Sₕ = Σⱼ bₕⱼ²/Aⱼ, with cᵢ = 1/σᵢ²
    (a Normal likelihood without error model)."""
    model = merger._get_model()
    state = merger._check_input(X)
    data, _ = state.evaluation_data(merger, X)
    chunk = next(iter(evaluation_chunks(model, data)))
    refl, _, sigma, scale, _ = next(row_pieces(model, [chunk]))
    image = chunk["image"].numpy()
    f_mean, f_square = (m.numpy().astype(np.float64) for m in model.amplitude_moments()[:2])
    f = f_mean[refl]
    c = 1 / sigma.astype(np.float64) ** 2
    n_refl, n_images = len(f_mean), image.max() + 1
    a = np.bincount(image, c * (scale * f**2) ** 2, n_images)
    pair = refl * n_images + image
    b = np.bincount(pair, c * 2 * scale * f * scale * f**2, n_refl * n_images).reshape(n_refl, n_images)
    lost = (b**2 / a).sum(1)
    precision = 1 / (f_square - f_mean**2)
    # An offset is log Σ itself, so each image's Var(log Σ) is 1/Aⱼ.
    return precision / np.maximum(precision - lost, precision / 25), 1 / a


def test_image_offsets_lose_what_the_scalar_reference_computes():
    X, _ = make_unmerged(n_images=8, random_state=0)
    merger = VariationalMerger(likelihood="normal", error_model=None, prior="wilson", **FAST).fit(X)
    assert merger._get_model().scale_network.image_weight_count == 1
    reference, scale_variance = _offset_reference(merger, X)
    np.testing.assert_allclose(merger.image_weight_ratio_, reference, rtol=2e-3)
    np.testing.assert_allclose(merger.image_scale_variance_, scale_variance, rtol=2e-3)
    # Eight images of a few hundred observations each: a little, and most for the
    # reflections measured most precisely.
    assert (merger.image_weight_ratio_ >= 1).all() and np.median(merger.image_weight_ratio_) < 1.1
    assert merger.image_weight_ratio_.max() > 1.01


def test_fits_without_image_weights_or_with_given_scales_have_no_factors():
    X, _ = make_unmerged(n_images=6, random_state=0)
    merger = VariationalMerger(image_scales=False, image_layers=0, **FAST).fit(X)
    assert not hasattr(merger, "image_weight_ratio_") and not hasattr(merger, "image_scale_variance_")
    assert merger._get_model().image_weight_ratio is None
    assert merger._get_model().image_scale_variance is None


def test_stills_image_layers_widen_the_strongest_reflections_most():
    X, _ = make_unmerged(n_images=12, stills=True, random_state=0)
    merger = VariationalMerger(**FAST).fit(X)
    assert merger.image_layers_ > 0
    assert merger.reference_b_ == 0.0  # stills stay in the model's frame
    ratio = merger.image_weight_ratio_
    assert (ratio >= 1).all() and ratio.max() > 1.2
    # Fifths of the posterior's F/SD: the most precisely measured fifth lost the most to
    # their images' layers.
    model = merger._get_model()
    moments = [m.numpy() for m in model.amplitude_moments()[:2]]
    posterior_precision = moments[0] / np.sqrt(moments[1] - moments[0] ** 2)
    fifth = np.argsort(np.argsort(posterior_precision)) * 5 // len(ratio)
    assert ratio[fifth == 4].mean() > ratio[fifth == 0].mean()
    assert np.isfinite(merger.transform(X)["SIGF"]).all()


def test_predictions_carry_their_images_scale_variance():
    X, _ = make_unmerged(n_images=12, stills=True, random_state=0)
    merger = VariationalMerger(**FAST).fit(X)
    variance = merger.image_scale_variance_
    assert variance.shape == (12,) and (variance > 0).all()
    seen = X.iloc[np.flatnonzero(X["image_id"] == 3)]
    mean, sd, scale, scale_sd = merger.predict(seen, return_std=True, return_scale=True)
    model = merger._get_model()
    model.image_scale_variance = None
    mean0, sd0, scale0, scale_sd0 = merger.predict(seen, return_std=True, return_scale=True)
    # The variance v of the image's weights moves Σ and I by one factor: v·Σ² and v·I²
    # are added, the means stay.
    np.testing.assert_array_equal(mean, mean0)
    np.testing.assert_array_equal(scale, scale0)
    np.testing.assert_allclose(sd, np.sqrt(sd0**2 + variance[3] * mean**2), rtol=1e-5)
    np.testing.assert_allclose(scale_sd, np.sqrt(scale_sd0**2 + variance[3] * scale**2), rtol=1e-5)
    assert (sd > sd0).all()


@pytest.mark.parametrize("kind", ["stills", "laue"])
def test_an_image_the_fit_never_saw_is_the_mixture_of_the_images_it_saw(kind):
    if kind == "laue":
        X, _ = make_unmerged(n_images=10, laue=True, wavelength_range=(0.95, 1.75), random_state=0)
        merger = VariationalMerger(laue=True, wavelength_range=(0.95, 1.75), image_scales=True, **FAST).fit(X)
    else:
        X, _ = make_unmerged(n_images=12, stills=True, random_state=0)
        merger = VariationalMerger(**FAST).fit(X)
    new = X.iloc[np.flatnonzero(X["image_id"] == 3)].copy()
    new["image_id"] += 1000
    mean, sd, scale, scale_sd = merger.predict(new, return_std=True, return_scale=True)
    log_density = merger.score_samples(new)
    # The reference: the same rows given to each training image in turn (its own weights
    # and their variance), mixed with equal weights.
    parts, densities = [], []
    for image in np.unique(X["image_id"]):
        as_image = new.assign(image_id=image)
        parts.append(merger.predict(as_image, return_std=True, return_scale=True))
        densities.append(merger.score_samples(as_image))
    parts = np.array(parts, np.float64)
    for value, spread, (means, sds) in ((mean, sd, parts[:, :2].transpose(1, 0, 2)),
                                        (scale, scale_sd, parts[:, 2:].transpose(1, 0, 2))):
        np.testing.assert_allclose(value, means.mean(0), rtol=1e-5)
        np.testing.assert_allclose(spread**2, (sds**2 + means**2).mean(0) - means.mean(0) ** 2, rtol=1e-3)
    reference = np.log(np.mean(np.exp(np.array(densities, np.float64)), 0))
    np.testing.assert_allclose(log_density, reference, atol=1e-4)
    # Wider than any one image's prediction where the images' scales disagree.
    assert np.median(sd / parts[:, 1].max(0)) > 1


def test_the_mixture_draws_a_fixed_subset_of_many_images():
    network = ScaleNetwork(2, 1, 4, 500, np.random.RandomState(0))
    model = SimpleNamespace(scale_network=network)
    params = SimpleNamespace(seed_=7)
    subset = mixture_images(model, 500, params)
    assert len(subset) == 64 and len(np.unique(subset)) == 64 and subset.max() < 500
    np.testing.assert_array_equal(subset, mixture_images(model, 500, params))
    np.testing.assert_array_equal(mixture_images(model, 30, params), np.arange(30))
    without_weights = SimpleNamespace(scale_network=ScaleNetwork(2, 1, 4, 0, np.random.RandomState(0)))
    assert len(mixture_images(without_weights, 30, params)) == 0


def test_unequal_ratios_keep_the_variance_of_the_difference():
    rng = np.random.default_rng(0)
    variance, mate_variance = rng.uniform(0.5, 2.0, (2, 1000))
    correlation = rng.uniform(-0.5, 0.9, 1000)
    ratio, mate_ratio = rng.uniform(1.0, 1.5, (2, 1000))
    widened = shared_correlation(correlation, variance, mate_variance, ratio, mate_ratio)
    inside = np.abs(widened) < 1
    before = variance + mate_variance - 2 * correlation * np.sqrt(variance * mate_variance)
    after = ratio * variance + mate_ratio * mate_variance - 2 * widened * np.sqrt(
        ratio * variance * mate_ratio * mate_variance)
    np.testing.assert_allclose(after[inside], before[inside], rtol=1e-10)
    assert inside.mean() > 0.9


def test_merged_table_widens_sigf_per_reflection_and_keeps_sigdano():
    X, _ = make_unmerged(n_images=12, anomalous=True, anomalous_signal=0.05, random_state=0)
    merger = VariationalMerger(anomalous=True, **FAST).fit(X)
    merger.sandwich_ratio_ = 1.0
    rng = np.random.default_rng(0)
    tables = {}
    for name, ratio in (("plain", None), ("widened", rng.uniform(1.0, 2.0, len(merger.reflections_)))):
        if ratio is None:
            del merger.image_weight_ratio_
        else:
            merger.image_weight_ratio_ = ratio.astype(np.float32)
        merger._model = None  # rebuilt from the attributes, as after loading
        tables[name] = merger.transform(X)
    plain, widened = tables["plain"], tables["widened"]
    for column in ("F", "F(+)", "F(-)", "DANO", "I"):
        np.testing.assert_allclose(widened[column].to_numpy(float), plain[column].to_numpy(float), equal_nan=True)
    gain = (widened["SIGF(+)"] / plain["SIGF(+)"]).to_numpy(float)
    measured = np.isfinite(gain)
    assert (gain[measured] >= 1 - 1e-6).all() and (gain[measured] <= np.sqrt(2.0) + 1e-5).all()
    assert gain[measured].std() > 0.05  # per reflection, not one factor
    # Where the shared variance fits within a correlation of ±1, SIGDANO stands.
    sigdano = (widened["SIGDANO"] / plain["SIGDANO"]).to_numpy(float)
    assert np.nanmedian(np.abs(sigdano - 1)) < 1e-4
