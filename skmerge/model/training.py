"""The ELBO and the loop that maximises it.

A whole chunk of optimisation steps runs inside one compiled TensorFlow function (a
``tf.while_loop``, XLA-compiled), so the host only speaks to TensorFlow once per chunk: to
read the loss terms, update the progress bar, check convergence and keep a copy of the
last good state.
"""

import math

import numpy as np

from .._tf import tf
from ..errors import NumericalError

LOSS_TERMS = ("loss", "nll", "kl")
_CHUNK = 50
_BETA_1, _BETA_2, _EPS = 0.9, 0.99, 1e-8
_MAX_RECOVERIES = 6
_WARMUP = 100.0


class MergingModel(tf.Module):
    """Posterior, prior, likelihood and scale model, joined into the ELBO.

    All quantities are in standardised units: intensities divided by the merger's
    intensity scale, so that ⟨F²/ε⟩ ≈ 1 and scales are of order one.
    """

    def __init__(self, posterior, prior, likelihood, scale_network, mc_samples):
        super().__init__(name="merging_model")
        self.posterior = posterior
        self.prior = prior
        self.likelihood = likelihood
        self.scale_network = scale_network
        self.mc_samples = int(mc_samples)
        self.fixed_scales = None

    def freeze_scales(self, data):
        """Evaluate the scale model once for ``data`` and reuse it in every step: with
        the scales frozen the network need not run again."""
        self.fixed_scales = self.scale_network(data["features"], data["image"])

    def _scales(self, data):
        if self.fixed_scales is not None:
            return self.fixed_scales
        return self.scale_network(data["features"], data["image"])

    def loss_terms(self, data, seed):
        """−ELBO per observation and its parts: the expected negative log-likelihood and
        the KL divergence of the amplitudes, both divided by the number of observations."""
        samples = self.posterior.sample(self.mc_samples, seed)
        f = tf.gather(samples, data["refl"], axis=1)
        mu, spread = self._scales(data)
        z = tf.random.stateless_normal(tf.shape(f), seed=seed + 7)
        predicted = tf.exp(mu + spread * z) * tf.square(f)
        log_lik = self.likelihood.log_prob(data["intensity"], predicted, data["sigma"])
        n_obs = tf.cast(tf.shape(data["intensity"])[0], tf.float32)
        nll = -tf.reduce_sum(tf.reduce_mean(log_lik, axis=0)) / n_obs
        moments = self.posterior.moments()
        kl = -(self.posterior.entropy() + self.prior.expected_log_prob(moments, samples))
        kl = tf.reduce_sum(kl) / n_obs
        return tf.stack([nll + kl, nll, kl])

    def amplitude_moments(self, extra_prior=None):
        """Raw moments of F: the posterior's, followed by ``extra_prior``'s (reflections
        the fit never saw)."""
        moments = self.posterior.moments()
        if extra_prior is None:
            return moments
        return tuple(tf.concat([a, b], 0) for a, b in zip(moments, extra_prior.moments()))

    def amplitude_samples(self, n_samples, seed, extra_prior=None):
        samples = self.posterior.sample(n_samples, seed)
        if extra_prior is None:
            return samples
        return tf.concat([samples, extra_prior.sample(n_samples, seed + 3)], 1)

    def predict(self, data, extra_prior=None):
        """Mean and standard deviation of each observation's predicted intensity, and
        the mean and standard deviation of its scale."""
        _, m2, _, m4 = (tf.gather(m, data["refl"]) for m in self.amplitude_moments(extra_prior))
        mu, spread = self.scale_network(data["features"], data["image"])
        var = tf.square(spread)
        scale_mean = tf.exp(mu + var / 2)
        scale_sq = tf.exp(2 * mu + 2 * var)
        mean = scale_mean * m2
        sd = tf.sqrt(tf.maximum(scale_sq * m4 - tf.square(mean), 0.0))
        scale_sd = tf.sqrt(tf.maximum(scale_sq - tf.square(scale_mean), 0.0))
        return mean, sd, scale_mean, scale_sd

    def log_predictive(self, data, n_samples, seed, extra_prior=None):
        """log p(Iᵢ | data) per observation, averaging the likelihood over samples of
        the posterior (the prior for reflections the fit never saw) and of the scales."""
        samples = self.amplitude_samples(n_samples, seed, extra_prior)
        f = tf.gather(samples, data["refl"], axis=1)
        mu, spread = self.scale_network(data["features"], data["image"])
        z = tf.random.stateless_normal(tf.shape(f), seed=seed + 7)
        predicted = tf.exp(mu + spread * z) * tf.square(f)
        log_lik = self.likelihood.log_prob(data["intensity"], predicted, data["sigma"])
        return tf.reduce_logsumexp(log_lik, axis=0) - math.log(n_samples)


class Trainer:
    """Adam on a chosen set of variables, a chunk of steps per compiled call.

    Steps whose loss or gradient is not finite leave the state untouched; a chunk with
    such steps restores the state from its start and halves the learning rate, and
    after repeated consecutive failures training stops with :class:`NumericalError`.
    """

    def __init__(self, model, variables, data, *, learning_rate, seed, jit_compile=True):
        self.model = model
        self.variables = list(variables)
        self.data = data
        self.seed = int(seed)
        self.learning_rate = tf.Variable(float(learning_rate), trainable=False)
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.m = [tf.Variable(tf.zeros_like(v), trainable=False) for v in self.variables]
        self.v = [tf.Variable(tf.zeros_like(v), trainable=False) for v in self.variables]
        self._chunk = tf.function(self._run_chunk, jit_compile=jit_compile)

    def _run_chunk(self, n_steps):
        def body(i, n_bad, history):
            seed = tf.stack([tf.constant(self.seed, tf.int64), self.step])
            with tf.GradientTape() as tape:
                terms = self.model.loss_terms(self.data, tf.cast(seed, tf.int32))
                loss = terms[0]
            grads = tape.gradient(loss, self.variables)
            grads = [tf.zeros_like(v) if g is None else tf.convert_to_tensor(g) for g, v in zip(grads, self.variables)]
            ok = tf.math.is_finite(terms[0]) & tf.math.is_finite(tf.linalg.global_norm(grads))
            t = tf.cast(self.step + 1, tf.float32)
            # A linear warm-up keeps Adam's first, full-size steps from throwing the
            # scale network far from its starting point.
            warmup = tf.minimum(1.0, t / _WARMUP)
            lr = warmup * self.learning_rate * tf.sqrt(1 - _BETA_2**t) / (1 - _BETA_1**t)
            for var, g, m, v in zip(self.variables, grads, self.m, self.v):
                g = tf.where(ok, g, 0.0)
                m_new = _BETA_1 * m + (1 - _BETA_1) * g
                v_new = _BETA_2 * v + (1 - _BETA_2) * tf.square(g)
                m.assign(tf.where(ok, m_new, m))
                v.assign(tf.where(ok, v_new, v))
                var.assign(tf.where(ok, var - lr * m_new / (tf.sqrt(v_new) + _EPS), var))
            self.step.assign_add(tf.cast(ok, tf.int64))
            history = tf.tensor_scatter_nd_update(history, [[i]], [terms])
            return i + 1, n_bad + tf.cast(~ok, tf.int32), history

        start = [tf.constant(0), tf.constant(0), tf.zeros([_CHUNK, len(LOSS_TERMS)])]
        _, n_bad, history = tf.while_loop(lambda i, n, h: i < n_steps, body, start)
        return history, n_bad

    def _state(self):
        return [*self.variables, *self.m, *self.v, self.step]

    def run(self, max_iter, *, tol, n_iter_no_change, progress=None, monitor=None):
        """Optimise for up to ``max_iter`` steps.

        Without a monitor, training stops when the mean loss of the last
        ``n_iter_no_change`` steps is less than ``tol`` below the mean of the
        ``n_iter_no_change`` steps before them (comparing window means keeps the Monte
        Carlo noise of single steps from looking like progress). With a monitor (e.g. a
        held-out loss, evaluated after every chunk) it stops when the monitor has not
        improved by ``tol`` for ``n_iter_no_change`` steps, and the best monitored state
        is restored. Returns the loss terms of every step and whether it converged.
        """
        history, recoveries = [], 0
        best, best_state, since_best = np.inf, None, 0
        converged = False
        while len(history) < max_iter:
            n = min(_CHUNK, max_iter - len(history))
            saved = [v.numpy() for v in self._state()]
            terms, n_bad = self._chunk(tf.constant(n))
            terms = terms.numpy()[:n]
            if int(n_bad) > 0 or not np.isfinite(terms).all():
                recoveries += 1
                if recoveries > _MAX_RECOVERIES:
                    raise NumericalError(
                        f"the loss stopped being finite at step {len(history)} and kept "
                        f"failing after {_MAX_RECOVERIES} restarts with smaller steps; "
                        "check the input for extreme values or lower learning_rate."
                    )
                for var, value in zip(self._state(), saved):
                    var.assign(value)
                self.learning_rate.assign(self.learning_rate * 0.5)
                continue
            recoveries = 0
            history.extend(terms)
            if progress is not None:
                progress(len(history), terms[:, 0].mean())
            if monitor is None:
                if len(history) >= 2 * n_iter_no_change:
                    loss = np.asarray(history)[:, 0]
                    last = loss[-n_iter_no_change:].mean()
                    before = loss[-2 * n_iter_no_change : -n_iter_no_change].mean()
                    if before - last < tol:
                        converged = True
                        break
                continue
            current = monitor()
            if current < best - tol:
                best, since_best = current, 0
                best_state = [v.numpy() for v in self.variables]
            else:
                since_best += n
            if since_best >= n_iter_no_change:
                converged = True
                break
        if best_state is not None:
            for var, value in zip(self.variables, best_state):
                var.assign(value)
        return np.array(history).reshape(-1, len(LOSS_TERMS)), converged
