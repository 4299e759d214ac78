"""The image encoder (``image_model="encoder"``) on small simulated serial stills."""

import joblib
import numpy as np
import pytest

from skmerge import VariationalMerger
from skmerge.datasets import make_unmerged
from skmerge.errors import ParameterError
from skmerge.model import data as model_data
from skmerge.model.scaling import ScaleNetwork
from skmerge.model.training import ImageBatches

METADATA = ["dHKL", "XDET", "YDET", "EWALD_OFFSET"]
FAST = dict(metadata=METADATA, mlp_layers=2, mlp_width=8, max_iter=300, random_state=0)
N_HELD_OUT = 6


@pytest.fixture(scope="module")
def stills():
    """Stills whose images carry strongly different scales (a log-normal factor with a
    spread of 0.7 on top of the simulator's), split into training and held-out images."""
    X, truth = make_unmerged(n_images=60, stills=True, mosaicity=0.0004, dmin=2.5, random_state=0)
    rng = np.random.RandomState(1)
    images = np.unique(X["image_id"])
    factor = np.exp(rng.normal(0, 0.7, len(images)))
    row_factor = factor[np.searchsorted(images, X["image_id"].to_numpy())]
    X = X.copy()
    X["Iobs"] *= row_factor
    X["SIGIobs"] *= row_factor
    held_out = np.isin(X["image_id"].to_numpy(), rng.choice(images, N_HELD_OUT, replace=False))
    return X[~held_out], X[held_out], truth, dict(zip(images, factor))


@pytest.fixture(scope="module")
def fits(stills):
    X_train = stills[0]
    return {kind: VariationalMerger(image_model=kind, **FAST).fit(X_train) for kind in ("offsets", "encoder")}


def _cc_truth(merger, X, truth):
    merged = merger.transform(X)
    return np.corrcoef(merged["F"].to_numpy(float), truth.merged.loc[merged.index, "F"].to_numpy(float))[0, 1]


def _image_scales(merger, X):
    """Each image's geometric mean predicted scale, by image_id."""
    _, scale, _ = merger.predict(X, return_scale=True)
    image = X["image_id"].to_numpy()
    return {i: float(np.exp(np.mean(np.log(scale[image == i])))) for i in np.unique(image)}


def test_encoder_merges_as_well_as_offsets(stills, fits):
    X_train, _, truth, _ = stills
    offsets, encoder = (_cc_truth(fits[kind], X_train, truth) for kind in ("offsets", "encoder"))
    assert encoder > 0.8
    assert encoder > offsets - 0.01


def test_encoder_size_does_not_grow_with_the_images(stills, fits):
    X_train = stills[0]
    n_images = X_train["image_id"].nunique()
    fewer = X_train[X_train["image_id"].isin(np.unique(X_train["image_id"])[:20])]
    small = VariationalMerger(image_model="encoder", **dict(FAST, max_iter=1)).fit(fewer)
    assert [w.shape for w in small.scale_weights_] == [w.shape for w in fits["encoder"].scale_weights_]
    assert fits["encoder"].scale_weights_[-1].size == 0
    assert fits["offsets"].scale_weights_[-1].size == n_images


def test_unseen_images_get_scales_from_their_own_observations(stills, fits):
    _, X_test, _, factor = stills
    predicted = _image_scales(fits["encoder"], X_test)
    images = sorted(predicted)
    log_predicted = np.log([predicted[i] for i in images])
    # The held-out images' own scale factors, which the fit never saw.
    assert np.corrcoef(log_predicted, np.log([factor[i] for i in images]))[0, 1] > 0.6
    # Offsets give every unseen image the same mixture of the images' offsets, so only the
    # metadata varies.
    offsets = _image_scales(fits["offsets"], X_test)
    assert np.std(log_predicted) > 2 * np.std(np.log([offsets[i] for i in images]))


def test_encoder_predicts_unseen_images_better_than_the_offsets_mixture(stills, fits):
    # Offsets predict an image the fit never saw as each training image in turn; the
    # encoder reads the image's own observations, so its predictions follow them. (Its
    # predictive SD leaves out the embedding's uncertainty: sharper, it scores lower
    # than the mixture here, -4.76 against -4.69.)
    X_test = stills[1]
    observed = X_test["Iobs"].to_numpy()
    encoder, offsets = (np.corrcoef(fits[kind].predict(X_test), observed)[0, 1] for kind in ("encoder", "offsets"))
    assert encoder > offsets + 0.1


def test_predictions_do_not_depend_on_how_evaluation_is_chunked(stills, fits, monkeypatch):
    X_test = stills[1]
    merger = fits["encoder"]
    whole = merger.predict(X_test, return_scale=True)
    # Chunks of 100 rows split every image: its embedding must still pool all its rows.
    monkeypatch.setattr(model_data, "EVAL_CHUNK", 100)
    for a, b in zip(whole, merger.predict(X_test, return_scale=True)):
        # Float32 sums in another order.
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(a).max())


@pytest.mark.parametrize("how", ["npz", "joblib"])
def test_saved_encoder_predicts_identically(stills, fits, tmp_path, how):
    from skmerge import load

    X_test = stills[1]
    merger = fits["encoder"]
    path = tmp_path / f"merger.{how}"
    if how == "npz":
        merger.save(path)
    else:
        joblib.dump(merger, path)
    loaded = load(path)
    np.testing.assert_array_equal(loaded.predict(X_test), merger.predict(X_test))
    np.testing.assert_array_equal(loaded.score_samples(X_test), merger.score_samples(X_test))


def test_batches_pool_each_image_exactly(stills):
    X_train = stills[0]
    image = np.unique(X_train["image_id"].to_numpy(), return_inverse=True)[1].ravel()
    rng = np.random.RandomState(0)
    n = len(image)
    data = model_data.tensor_data(np.zeros(n, int), image, rng.normal(size=(n, 3)), np.ones(n), np.ones(n),
                                  image_inputs=rng.normal(size=(n, 2)))
    network = ScaleNetwork(3, 2, 8, 0, rng, encoder=True)
    # A trained output layer, so that the scales depend on the embedding.
    network.out_kernel.assign(rng.normal(size=network.out_kernel.shape).astype(np.float32))
    whole, _ = network.of(data)
    batches = ImageBatches(data, image, np.ones(n), batch_size=5)
    batch = batches.draw(np.array([3, 4], np.int32))
    real = batch["weight"].numpy() > 0
    drawn = batches.row_table.numpy()[np.unique(batch["image"].numpy()[real])].ravel()
    batch_mu, _ = network.of(batch)
    assert real.sum() == (drawn >= 0).sum() < n
    np.testing.assert_allclose(np.sort(batch_mu.numpy()[real]), np.sort(whole.numpy()[drawn[drawn >= 0]]),
                               rtol=1e-5)


def test_minibatch_fit_with_the_encoder(stills):
    X_train, X_test, _, _ = stills
    merger = VariationalMerger(image_model="encoder", batch_size=8, **dict(FAST, max_iter=50)).fit(X_train)
    assert np.isfinite(merger.predict(X_test)).all()
    assert np.isfinite(merger.score(X_test))


def test_warm_start_needs_the_same_image_model(stills, fits):
    from sklearn.base import clone

    merger = clone(fits["offsets"]).set_params(max_iter=5)
    merger.fit(stills[0])
    merger.set_params(image_model="encoder", warm_start=True)
    with pytest.raises(ParameterError, match="image_model"):
        merger.fit(stills[0])


def test_image_model_is_validated():
    X, _ = make_unmerged(n_images=4, random_state=0)
    with pytest.raises(ParameterError, match="image_model"):
        VariationalMerger(image_model="layers").fit(X)
