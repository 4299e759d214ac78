"""The merging model's ELBO, the trainer and the scale network (the distributions
themselves are tested in test_distributions.py)."""

import numpy as np
import pytest
from scipy import stats

from skmerge._tf import tf, tfd
from skmerge.errors import NumericalError
from skmerge.model import training
from skmerge.model.error_model import ErrorModel
from skmerge.model.likelihoods import NormalLikelihood, StudentTLikelihood
from skmerge.model.posterior import TruncatedNormalPosterior
from skmerge.model.priors import WilsonDistribution
from skmerge.model.scaling import ScaleNetwork
from skmerge.model.training import LOSS_TERMS, MergingModel, Trainer

def _small_model(likelihood, error_model=None):
    """A MergingModel of three reflections (one centric) seen by five observations."""
    posterior = TruncatedNormalPosterior(np.array([1.0, 0.5, 2.0]), np.array([0.3, 0.2, 0.4]))
    prior = WilsonDistribution([False, True, False], [1.0, 1.0, 2.0])
    network = ScaleNetwork(1, 2, 4, n_images=0, rng=np.random.RandomState(0))
    data = {
        "refl": tf.constant([0, 1, 2, 2, 0]),
        "image": tf.fill([5], -1),
        "features": tf.zeros([5, 1]),
        "intensity": tf.constant([1.1, 0.2, 4.5, 3.5, 0.8]),
        "sigma": tf.constant([0.2, 0.1, 0.5, 0.5, 0.2]),
    }
    return MergingModel(posterior, prior, likelihood, network, mc_samples=3, error_model=error_model), data


def test_loss_terms_come_from_the_distribution_objects():
    """nll: the likelihood's tfd log_prob at the predicted intensities; kl: −(H[q] +
    E_q[log p]) from the posterior and prior distributions, per observation."""
    likelihood = StudentTLikelihood(dof=5.0)
    error_model = ErrorModel(sdfac=1.5).build()
    model, data = _small_model(likelihood, error_model)
    seed = tf.constant([4, 2])
    loss, nll, kl = model.loss_terms(data, seed).numpy()

    q = model.posterior.distribution()
    samples = q.sample(3, seed=seed)
    predicted = model._predicted(samples, data, seed)
    sigma = error_model(data["sigma"], predicted)
    law = tfd.StudentT(5.0, predicted, sigma)
    expected_nll = -tf.reduce_mean(law.log_prob(data["intensity"]), axis=0).numpy().sum() / 5
    expected_kl = -(q.entropy() + model.prior.expected_log_prob(q, samples)).numpy().sum() / 5
    np.testing.assert_allclose([nll, kl, loss], [expected_nll, expected_kl, expected_nll + expected_kl], rtol=1e-5)
    np.testing.assert_allclose(model.loss_terms(data, seed).numpy(), [loss, nll, kl])  # same seed, same value


def test_amplitude_moments_and_samples_append_the_unseen_reflections_prior():
    model, _ = _small_model(NormalLikelihood())
    extra = WilsonDistribution([True], [4.0])
    moments = [m.numpy() for m in model.amplitude_moments(extra)]
    posterior_moments = model.posterior.distribution().raw_moments()
    for k, (got, q) in enumerate(zip(moments, posterior_moments)):
        np.testing.assert_allclose(got[:3], q.numpy())
        np.testing.assert_allclose(got[3], stats.halfnorm(scale=2.0).moment(k + 1), rtol=1e-5)
    samples = model.amplitude_samples(5, tf.constant([1, 1]), extra).numpy()
    assert samples.shape == (5, 4) and (samples >= 0).all()


class _Quadratic(tf.Module):
    """A loss (x − 3)² that turns NaN beyond ``blow_up``: drives the trainer's recovery."""

    def __init__(self, blow_up):
        super().__init__()
        self.x = tf.Variable(0.0)
        self.blow_up = blow_up

    def loss_terms(self, data, seed):
        loss = tf.square(self.x - 3.0)
        loss = tf.where(self.x > self.blow_up, np.float32(np.nan), loss)
        return tf.stack([loss, loss, 0.0 * loss])


def test_trainer_recovers_from_non_finite_steps():
    model = _Quadratic(blow_up=4.0)
    trainer = Trainer(model, [model.x], {}, learning_rate=2.0, seed=0, jit_compile=False)
    history, _ = trainer.run(1500, tol=0.0, n_iter_no_change=10**6)
    assert np.isfinite(history).all()
    assert history.shape[1] == len(LOSS_TERMS)
    assert trainer.learning_rate.numpy() < 2.0
    assert abs(model.x.numpy() - 3.0) < 0.05


class _Bowl(tf.Module):
    """Σ c·(v − target)² over variables of several shapes (a scalar, a vector, a matrix)."""

    def __init__(self, rng):
        super().__init__()
        self.targets = [np.float32(1.5), rng.normal(size=4).astype(np.float32), rng.normal(size=(3, 2)).astype(np.float32)]
        self.weights = [0.5, 2.0, 1.0]
        self.vars = [tf.Variable(np.zeros_like(t)) for t in self.targets]

    def loss_terms(self, data, seed):
        loss = tf.add_n([c * tf.reduce_sum(tf.square(v - t)) for c, v, t in zip(self.weights, self.vars, self.targets)])
        return tf.stack([loss, loss, 0.0 * loss])


def test_trainer_steps_are_adam_with_warm_up_on_every_variable():
    """Each variable moves as Adam (bias-corrected, with the trainer's linear warm-up of
    the step size) moves it, whatever its shape: the moments of all variables are kept in
    one vector, which must not mix them up."""
    model = _Bowl(np.random.RandomState(4))
    lr, beta_1, beta_2, n_steps = 0.05, 0.8, 0.95, 30
    trainer = Trainer(model, model.vars, {}, learning_rate=lr, seed=0, jit_compile=False, beta_1=beta_1,
                      beta_2=beta_2)
    trainer.run(n_steps, tol=0.0, n_iter_no_change=10**6)

    values = [np.zeros_like(t, dtype=np.float64) for t in model.targets]
    m = [np.zeros_like(v) for v in values]
    v2 = [np.zeros_like(v) for v in values]
    for t in range(1, n_steps + 1):
        step = min(1.0, t / training._WARMUP) * lr * np.sqrt(1 - beta_2**t) / (1 - beta_1**t)
        for i, (c, target) in enumerate(zip(model.weights, model.targets)):
            g = 2 * c * (values[i] - target)
            m[i] = beta_1 * m[i] + (1 - beta_1) * g
            v2[i] = beta_2 * v2[i] + (1 - beta_2) * g**2
            values[i] = values[i] - step * m[i] / (np.sqrt(v2[i]) + training._EPS)
    for var, expected in zip(model.vars, values):
        assert var.shape == expected.shape
        np.testing.assert_allclose(var.numpy(), expected, rtol=1e-4, atol=1e-6)
    assert int(trainer.step.numpy()) == n_steps


class _Recording(_Bowl):
    """A bowl that records, each time its loss is traced, whether graph rewrites are off."""

    def __init__(self, rng):
        super().__init__(rng)
        self.rewrites_off = []

    def loss_terms(self, data, seed):
        self.rewrites_off.append(tf.config.optimizer.get_experimental_options()["disable_meta_optimizer"])
        return super().loss_terms(data, seed)


@pytest.mark.parametrize("setting", [False, True])
def test_trainer_compiles_its_step_without_graph_rewrites_and_keeps_the_setting(setting):
    """Grappler's passes over the step cost a short fit much of its time and change no
    step's speed (bench/RESULTS.md): the trainer traces and instantiates its step with
    them off, calls every chunk of steps with them off (a call with them on would
    instantiate the step again), and leaves the process's own setting as it found it."""
    options = tf.config.optimizer
    found = options.get_experimental_options()["disable_meta_optimizer"]
    model = _Recording(np.random.RandomState(0))
    trainer = Trainer(model, model.vars, {}, learning_rate=0.1, seed=0, jit_compile=False)
    chunk, calls = trainer._chunk, []

    def recording_chunk(n_steps):
        calls.append(options.get_experimental_options()["disable_meta_optimizer"])
        return chunk(n_steps)

    trainer._chunk = recording_chunk
    options.set_experimental_options({"disable_meta_optimizer": setting})
    try:
        trainer.run(3 * training._CHUNK, tol=0.0, n_iter_no_change=10**6)
        assert model.rewrites_off and all(model.rewrites_off)
        assert calls == [True] * 3
        assert options.get_experimental_options()["disable_meta_optimizer"] is setting
    finally:
        options.set_experimental_options({"disable_meta_optimizer": found})


def test_trainer_raises_numerical_error_when_every_step_fails():
    model = _Quadratic(blow_up=-1.0)
    trainer = Trainer(model, [model.x], {}, learning_rate=0.1, seed=0, jit_compile=False)
    with pytest.raises(NumericalError, match="stopped being finite"):
        trainer.run(200, tol=0.0, n_iter_no_change=10**6)


@pytest.mark.parametrize("n_rows", [1, 4096, 10_001])
def test_scale_network_chunked_pass_matches_a_plain_dense_stack(n_rows):
    """The chunked, recomputing scale network gives the values and gradients of the plain
    (rows, features) dense stack, for one partial chunk, exactly one, and several."""
    rng = np.random.RandomState(1)
    network = ScaleNetwork(5, 4, 10, n_images=0, rng=rng)
    network.out_kernel.assign(rng.normal(0, 0.3, (10, 2)).astype(np.float32))
    features = tf.constant(rng.normal(size=(n_rows, 5)).astype(np.float32))
    weights = tf.constant(rng.normal(size=(n_rows, 2)).astype(np.float32))
    image = tf.fill([n_rows], -1)

    def plain():
        h = tf.nn.leaky_relu(features @ network.kernels[0] + network.biases[0], 0.01)
        for kernel, bias in zip(network.kernels[1:], network.biases[1:]):
            h = h + tf.nn.leaky_relu(h @ kernel + bias, 0.01)
        out = h @ network.out_kernel + network.out_bias
        return out[:, 0], tf.nn.softplus(out[:, 1]) + 1e-3

    variables = network.trainable_variables
    results = []
    for fn in (lambda: network(features, image), plain):
        with tf.GradientTape() as tape:
            mu, spread = fn()
            loss = tf.reduce_sum(weights[:, 0] * mu + weights[:, 1] * spread)
        grads = tape.gradient(loss, variables)
        results.append((mu.numpy(), spread.numpy(), [g.numpy() for g in grads if g is not None]))
    (mu, spread, grads), (mu_ref, spread_ref, grads_ref) = results
    np.testing.assert_allclose(mu, mu_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(spread, spread_ref, rtol=1e-4, atol=1e-5)
    assert len(grads) == len(grads_ref) == 2 * 4 + 2
    for g, g_ref in zip(grads, grads_ref):
        np.testing.assert_allclose(g, g_ref, rtol=1e-3, atol=1e-3 * np.abs(g_ref).max())


@pytest.mark.parametrize("n_rows, n_images", [(1, 3), (300, 1), (5_000, 40)])
def test_image_layers_in_blocks_match_a_kernel_per_row(n_rows, n_images):
    """The image layers computed in blocks of one image's rows give the values and
    gradients of every row through its own image's kernel and bias (the mean image's for
    rows of image −1), with images of very different row counts."""
    rng = np.random.RandomState(2)
    network = ScaleNetwork(3, 2, 6, n_images, rng, image_layers=2, n_layer_images=n_images)
    for v in (*network.image_kernels, *network.image_biases):
        v.assign(rng.normal(0, 0.4, v.shape).astype(np.float32))
    hidden = tf.constant(rng.normal(size=(n_rows, 6)).astype(np.float32))
    # Most rows on image 0, the rest spread, some unseen.
    image = tf.constant(np.where(rng.rand(n_rows) < 0.5, 0, rng.randint(-1, n_images, n_rows)).astype(np.int32))
    weights = tf.constant(rng.normal(size=(n_rows, 6)).astype(np.float32))

    def per_row():
        h = hidden
        known = (image >= 0)[:, None]
        for kernel, bias in zip(network.image_kernels, network.image_biases):
            row_kernel = tf.where(known[:, :, None], tf.gather(kernel, tf.maximum(image, 0)), tf.reduce_mean(kernel, 0))
            row_bias = tf.where(known, tf.gather(bias, tf.maximum(image, 0)), tf.reduce_mean(bias, 0))
            h = h + tf.nn.leaky_relu(tf.einsum("ri,rij->rj", h, row_kernel) + row_bias, 0.01)
        return h

    variables = [*network.image_kernels, *network.image_biases]
    results = []
    def in_blocks():
        # The stack reads and keeps the column of ones its kernels hold the biases for.
        out = network._image_stack(tf.concat([hidden, tf.ones([n_rows, 1])], 1), network.image_blocks(image))
        np.testing.assert_array_equal(out[:, -1].numpy(), 1.0)
        return out[:, :-1]

    for fn in (in_blocks, per_row):
        with tf.GradientTape() as tape:
            tape.watch(hidden)
            out = fn()
            loss = tf.reduce_sum(weights * out)
        grads = tape.gradient(loss, [hidden, *variables])
        results.append((out.numpy(), [tf.convert_to_tensor(g).numpy() for g in grads]))
    (out, grads), (out_ref, grads_ref) = results
    np.testing.assert_allclose(out, out_ref, rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(grads, grads_ref):
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-4 * max(np.abs(g_ref).max(), 1.0))


def test_image_heads_add_their_mean_and_variance_to_log_scale():
    """Each row's image head adds z·m to μ of log Σ and (z·s)² to its variance, z = h·P
    the learned basis of the last hidden layer h; rows of image −1 get the prior's head
    (mean 0, standard deviation τ, the root mean square of the heads over the images). Heads at zero leave the network
    as without them; the heads start with the KL zero."""
    rng = np.random.RandomState(3)
    features = tf.constant(rng.normal(size=(50, 3)).astype(np.float32))
    image = tf.constant(rng.randint(-1, 4, 50).astype(np.int32))
    plain = ScaleNetwork(3, 2, 6, 4, np.random.RandomState(0))
    headed = ScaleNetwork(3, 2, 6, 4, np.random.RandomState(0), image_heads=True, n_layer_images=4)
    assert float(headed.heads_kl()) == pytest.approx(0.0, abs=1e-4)
    for v in (plain.out_kernel, plain.image_offsets):
        v.assign(rng.normal(0, 0.3, v.shape).astype(np.float32))
    basis = headed.heads.basis.numpy()
    dense = len(plain.get_weights()) - 1
    headed.set_weights(plain.get_weights()[:dense] + [basis, np.zeros((4, 3)), np.full((4, 3), -30.0),
                                                      plain.get_weights()[-1]])
    for a, b in zip(plain(features, image), headed(features, image)):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)

    loc, scale = rng.normal(0, 0.2, (4, 3)), rng.uniform(0.01, 0.3, (4, 3))
    headed.heads.loc.assign(loc.astype(np.float32))
    headed.heads.raw_scale.assign(np.log(np.expm1(scale)).astype(np.float32))
    mu, spread = (v.numpy() for v in headed(features, image))
    mu_plain, spread_plain = (v.numpy() for v in plain(features, image))
    hidden = headed._hidden(tf.transpose(features), headed._stack_weights()).numpy()[:-1].T @ basis
    tau = np.sqrt((loc**2 + scale**2).mean(0))
    row_loc = np.where((image.numpy() >= 0)[:, None], loc[np.maximum(image.numpy(), 0)], 0.0)
    row_scale = np.where((image.numpy() >= 0)[:, None], scale[np.maximum(image.numpy(), 0)], tau)
    np.testing.assert_allclose(mu, mu_plain + (hidden * row_loc).sum(1), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(spread, np.sqrt(spread_plain**2 + ((hidden * row_scale) ** 2).sum(1)), rtol=1e-4)
    kl = np.log(tau / scale) + (scale**2 + loc**2) / (2 * tau**2) - 0.5
    assert float(headed.heads_kl()) == pytest.approx(kl.sum(), rel=1e-4)
    # τ is the prior width that maximises the ELBO: any other width gives a larger KL.
    for factor in (0.8, 1.25):
        t = factor * tau
        assert (np.log(t / scale) + (scale**2 + loc**2) / (2 * t**2) - 0.5).sum() > kl.sum()
    assert len(headed.per_image_weights()) == 3 and headed.get_weights()[-3].shape == (4, 3)


def test_first_xla_compilation_is_quiet():
    """XLA logs its start-up through absl at the first compilation of a process; the
    trainer keeps it off standard error (a fresh process, so this is the first)."""
    import subprocess
    import sys

    script = (
        "from skmerge._tf import tf\n"
        "from skmerge.model.training import Trainer\n"
        "x = tf.Variable(0.0)\n"
        "class Model(tf.Module):\n"
        "    def loss_terms(self, data, seed):\n"
        "        loss = tf.square(x - 3.0)\n"
        "        return tf.stack([loss, loss, 0.0 * loss])\n"
        "history, _ = Trainer(Model(), [x], {}, learning_rate=0.1, seed=0, jit_compile=True).run(\n"
        "    60, tol=0.0, n_iter_no_change=10**6)\n"
        "assert len(history) == 60\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
