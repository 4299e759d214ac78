"""The ELBO and the loop that maximises it.

A whole chunk of optimisation steps runs inside one TensorFlow graph function (a
``tf.while_loop``, optionally XLA-compiled), so the host only speaks to TensorFlow once
per chunk: to read the loss terms, update the progress bar, check convergence and keep a
copy of the last good state.
"""

import contextlib
import math

import numpy as np

from .._tf import concat_flat, quiet_stderr, split_like, tf, without_graph_rewrites
from ..errors import NumericalError
from .linear_response import FamilyCovariance

LOSS_TERMS = ("loss", "nll", "kl")
_CHUNK = 50
_EPS = 1e-8
_MAX_RECOVERIES = 6
_WARMUP = 100.0


class MergingModel(tf.Module):
    """Posterior, prior, likelihood and scale model, joined into the ELBO.

    All quantities are in standardised units: intensities divided by the merger's
    intensity scale, so that ⟨F²/ε⟩ ≈ 1 and scales are of order one.

    The data are rows (one per reflection contribution: ``refl``, ``image``, ``features``)
    and observations (``intensity``, ``sigma``). Normally each row is one observation. In
    Laue data a spot may hold several harmonics: then ``spot`` maps each row to its
    observation, whose predicted intensity is the sum over its rows of Σ·F².

    Parameters
    ----------
    posterior : TruncatedNormalPosterior
        The learnable posterior of the amplitudes.
    prior : distribution
        The built prior over the same reflections (``WilsonDistribution`` or
        ``ReferenceDistribution``: a ``tfd.Distribution`` with ``expected_log_prob``
        and ``raw_moments``).
    likelihood : likelihood object
        ``NormalLikelihood``, ``LaplaceLikelihood``, ``StudentTLikelihood`` or any object
        with ``log_prob(intensity, predicted, sigma)``.
    scale_network : ScaleNetwork
    mc_samples : int
        Posterior samples per step for the expected log-likelihood.
    error_model : skmerge.model.error_model.ErrorModelModule, optional
        Refines every observation's σ before the likelihood sees it.
    kl_weight : float, default=1.0
        Weight of the KL term in the loss (1 is the ELBO).
    """

    def __init__(self, posterior, prior, likelihood, scale_network, mc_samples, error_model=None, kl_weight=1.0):
        super().__init__(name="merging_model")
        self.posterior = posterior
        self.prior = prior
        self.likelihood = likelihood
        self.scale_network = scale_network
        self.mc_samples = int(mc_samples)
        self.error_model = error_model
        self.kl_weight = float(kl_weight)
        # The marginals of the amplitudes on grids after training (GridMarginals), which
        # the merged table reports instead of the mean-field posterior's moments.
        self.marginals = None
        # J/H of the likelihood on the training data after training, which widens the
        # merged table's SIGF (skmerge.model.sandwich).
        self.sandwich_ratio = 1.0
        # Per reflection, the factor of its posterior variance that carries its images'
        # own scale weights' uncertainty (skmerge.model.scale_uncertainty); None for 1.
        self.image_weight_ratio = None
        # Per image, the variance of its log scale from those weights, which predictions
        # carry; None for 0.
        self.image_scale_variance = None

    def observation_log_likelihood(self, data, predicted):
        """log p(Iᵢ | ``predicted``) of every observation of ``data`` (its ``intensity`` and
        ``sigma``), the error model refining σ first; ``predicted`` broadcasts against them."""
        sigma = data["sigma"]
        if self.error_model is not None:
            sigma = self.error_model(sigma, predicted)
        return self.likelihood.log_prob(data["intensity"], predicted, sigma)

    def prepared(self, data):
        """``data`` (a dict of tensors) with what the scale model computes from its rows'
        images alone (:meth:`~skmerge.model.scaling.ScaleNetwork.image_blocks`): the data
        of full-batch steps, so that it is computed once, not in every step (minibatches,
        whose rows change, compute theirs in the step)."""
        blocks = self.scale_network.image_blocks(data["image"])
        return data if blocks is None else {**data, "image_blocks": blocks}

    def scales(self, data):
        """(μ, s) of log Σ per row; frozen scales are looked up instead of recomputed."""
        if "mu" in data:
            return data["mu"], data["spread"]
        return self.scale_network.of(data)

    def _predicted(self, samples, data, seed):
        """Samples of each observation's predicted intensity, shape (n_samples, n_obs)."""
        f = tf.gather(samples, data["refl"], axis=1)
        mu, spread = self.scales(data)
        if "log_scale_variance" in data:
            # The uncertainty v of the rows' images' own weights (in evaluation): log Σ
            # gets s² + v about the same E[Σ].
            variance = data["log_scale_variance"]
            mu, spread = mu - variance / 2, tf.sqrt(tf.square(spread) + variance)
        z = tf.random.stateless_normal(tf.shape(f), seed=seed + 7)
        predicted = tf.exp(mu + spread * z) * tf.square(f)
        if "spot" not in data:
            return predicted
        n_obs = tf.shape(data["intensity"])[0]
        summed = tf.math.unsorted_segment_sum(tf.transpose(predicted), data["spot"], n_obs)
        return tf.transpose(summed)

    def loss_terms(self, data, seed):
        """−ELBO per observation and its parts: the expected negative log-likelihood and
        the KL divergence of the amplitudes (and of the scale model's image heads), both
        divided by the number of observations (the loss weighs the KL by ``kl_weight``).

        A minibatch carries ``weight`` (of each observation: N/batch for the images drawn,
        0 for padding), ``kl_weight`` (of each row: the same factor over the number of
        rows of the row's reflection, so that the rows of all images together count each
        reflection's KL once) and ``n_total``; without them the batch is the whole data.
        A shard of a data-parallel fit carries ``global_kl_share``, the share of the scale
        model's KL (global, not per row) its loss holds: 1/n on each of n workers.
        """
        posterior = self.posterior.distribution()
        samples = posterior.sample(self.mc_samples, seed=seed)
        log_lik = tf.reduce_mean(self.observation_log_likelihood(data, self._predicted(samples, data, seed)), axis=0)
        # KL(q‖p) = −H[q] − E_q[log p]: the entropy is exact and the prior gives its
        # expectation in closed form where it can, which keeps the gradient noise down.
        kl = -(posterior.entropy() + self.prior.expected_log_prob(posterior, samples))
        if "weight" in data:
            n_total = data["n_total"]
            nll = -tf.reduce_sum(data["weight"] * log_lik) / n_total
            kl = tf.reduce_sum(data["kl_weight"] * tf.gather(kl, data["refl"])) / n_total
        else:
            n_total = tf.cast(tf.shape(data["intensity"])[0], tf.float32)
            nll = -tf.reduce_sum(log_lik) / n_total
            kl = tf.reduce_sum(kl) / n_total
        kl = kl + data.get("global_kl_share", 1.0) * self.scale_network.heads_kl() / n_total
        return tf.stack([nll + self.kl_weight * kl, nll, kl])

    def amplitude_moments(self, extra_prior=None):
        """Raw moments of F: the marginals' after training on grids, else the posterior's,
        followed by ``extra_prior``'s (reflections the fit never saw)."""
        if self.marginals is not None:
            moments = tuple(tf.constant(m, tf.float32) for m in self.marginals.raw_moments())
        else:
            moments = self.posterior.distribution().raw_moments()
        if extra_prior is None:
            return moments
        return tuple(tf.concat([a, b], 0) for a, b in zip(moments, extra_prior.raw_moments()))

    def amplitude_covariance(self, n_samples, seed):
        """The linear-response covariance of the posterior's amplitudes
        (:class:`~skmerge.model.linear_response.FamilyCovariance`) where the prior ties
        them together, from ``n_samples`` posterior samples drawn with ``seed`` (an int);
        the grid marginals' covariance of every child with its parent when training
        left them; None for a prior that ties no amplitudes together (or for grid
        marginals of a forest without edges)."""
        if self.marginals is not None:  # their moments hold the variances of unrelated amplitudes
            return self.marginals if (self.marginals.parent >= 0).any() else None
        if not hasattr(self.prior, "coupling"):
            return None
        q = self.posterior.distribution()
        m1, m2, _, _ = (m.numpy().astype(np.float64) for m in q.raw_moments())
        coupling = self.prior.coupling(q.sample(n_samples, seed=tf.constant([seed, 5]))).numpy()
        return FamilyCovariance(m2 - m1**2, self.prior.parent, coupling)

    def amplitude_samples(self, n_samples, seed, extra_prior=None):
        samples = self.posterior.distribution().sample(n_samples, seed=seed)
        if extra_prior is None:
            return samples
        return tf.concat([samples, extra_prior.sample(n_samples, seed=seed + 3)], 1)

    def predict(self, data, extra_prior=None):
        """Per row: mean and standard deviation of Σ·F², and of the scale Σ (with the
        rows' ``log_scale_variance`` where given)."""
        _, m2, _, m4 = (tf.gather(m, data["refl"]) for m in self.amplitude_moments(extra_prior))
        mu, spread = self.scales(data)
        var = tf.square(spread)
        scale_mean = tf.exp(mu + var / 2)
        scale_sq = tf.exp(2 * mu + 2 * var)
        mean = scale_mean * m2
        sd = tf.sqrt(tf.maximum(scale_sq * m4 - tf.square(mean), 0.0))
        # Var Σ = E[Σ]²·(exp(s²) − 1), not E[Σ²] − E[Σ]², which float32 cancellation
        # swamps when the spread is small.
        scale_sd = scale_mean * tf.sqrt(tf.math.expm1(var))
        if "log_scale_variance" in data:
            # The uncertainty v of the rows' images' own weights moves Σ and I by one
            # factor: v·Σ² and v·I² to first order. (The full product moments, which also
            # scale F's own spread by exp(v), widened thermolysin's held-out intervals past
            # nominal: robust SD(z) 0.83 against 0.88.)
            variance = data["log_scale_variance"]
            sd = tf.sqrt(tf.square(sd) + variance * tf.square(mean))
            scale_sd = tf.sqrt(tf.square(scale_sd) + variance * tf.square(scale_mean))
        return mean, sd, scale_mean, scale_sd

    def expected_log_likelihood(self, data, n_samples, seed, extra_prior=None):
        """E_q[log p(Iᵢ | F, Σ)] per observation from ``n_samples`` samples: the
        likelihood term of the loss, also for observations the fit never saw."""
        samples = self.amplitude_samples(n_samples, seed, extra_prior)
        return tf.reduce_mean(self.observation_log_likelihood(data, self._predicted(samples, data, seed)), axis=0)

    def log_predictive(self, data, n_samples, seed, extra_prior=None):
        """log p(Iᵢ | data) per observation, averaging the likelihood over samples of
        the posterior (the prior for reflections the fit never saw) and of the scales."""
        samples = self.amplitude_samples(n_samples, seed, extra_prior)
        log_lik = self.observation_log_likelihood(data, self._predicted(samples, data, seed))
        return tf.reduce_logsumexp(log_lik, axis=0) - math.log(n_samples)


class ImageBatches:
    """Random batches of whole images, drawn inside the compiled training loop.

    The rows (and observations) of every image are listed in padded tables so that a
    batch of ``batch_size`` images has a fixed shape; padding gets zero weight and image
    −1 (so that an image encoder pools only the rows of each image). Drawing
    ``batch_size`` of the n images uniformly makes each image's terms count n/batch_size
    times, which keeps the loss an unbiased estimate of the full-data loss.

    ``image`` numbers the images of the rows 0 … n−1 (``data["image"]``, what the scale
    model reads, may number them otherwise); ``n_total``, the number of observations
    the loss is divided by, defaults to those of ``data`` (a shard of a data-parallel
    fit divides by those of all shards, and its batches carry ``global_kl_share``, the
    share of the scale model's KL its loss holds).
    """

    def __init__(self, data, image, n_rows_per_reflection, batch_size, spot=None, n_total=None, global_kl_share=None):
        self.data = data
        self.global_kl_share = global_kl_share
        self.batch_size = int(batch_size)
        self.n_images = int(image.max()) + 1
        self.n_total = float(len(data["intensity"]) if n_total is None else n_total)
        row_table, local = _padded_table(image)
        self.row_table = tf.constant(row_table, tf.int32)
        self.kl_per_row = tf.constant(1.0 / n_rows_per_reflection, tf.float32)
        self.spot_table = None
        if spot is not None:
            spot_image = np.zeros(len(data["intensity"]), np.int64)
            spot_image[spot] = image
            spot_table, spot_local = _padded_table(spot_image)
            self.spot_table = tf.constant(spot_table, tf.int32)
            self.row_spot = tf.constant(spot_local[spot], tf.int32)

    def draw(self, seed):
        """One batch: the data of ``batch_size`` random images."""
        scores = tf.random.stateless_uniform([self.n_images], seed=seed + 11)
        images = tf.math.top_k(scores, self.batch_size).indices
        factor = self.n_images / self.batch_size
        rows = tf.reshape(tf.gather(self.row_table, images), [-1])
        row_ok = tf.cast(rows >= 0, tf.float32)
        rows = tf.maximum(rows, 0)
        batch = {k: tf.gather(v, rows) for k, v in self.data.items() if k not in ("intensity", "sigma", "spot")}
        batch["image"] = tf.where(row_ok > 0, batch["image"], -1)
        batch["kl_weight"] = factor * row_ok * tf.gather(self.kl_per_row, rows)
        batch["n_total"] = tf.constant(self.n_total, tf.float32)
        if self.global_kl_share is not None:
            batch["global_kl_share"] = tf.constant(self.global_kl_share, tf.float32)
        if self.spot_table is None:
            obs, obs_ok = rows, row_ok
        else:
            table = tf.gather(self.spot_table, images)
            slot = tf.repeat(tf.range(self.batch_size), tf.shape(self.row_table)[1])
            batch["spot"] = slot * tf.shape(table)[1] + tf.gather(self.row_spot, rows)
            obs = tf.reshape(table, [-1])
            obs_ok = tf.cast(obs >= 0, tf.float32)
            obs = tf.maximum(obs, 0)
        batch["intensity"] = tf.gather(self.data["intensity"], obs)
        batch["sigma"] = tf.gather(self.data["sigma"], obs)
        batch["weight"] = factor * obs_ok
        return batch


def _padded_table(group):
    """Rows of each group id in a (n_groups, max_size) table padded with −1, and the
    position of every row within its group."""
    order = np.argsort(group, kind="stable")
    counts = np.bincount(group)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    position = np.empty(len(group), np.int64)
    position[order] = np.arange(len(group)) - np.repeat(starts, counts)
    table = np.full((len(counts), max(counts.max(), 1)), -1, np.int64)
    table[group, position] = np.arange(len(group))
    return table, position


class Trainer:
    """Adam on a chosen set of variables, a chunk of steps per compiled call.

    Adam is written out here rather than taken from ``tf.keras.optimizers``: TensorFlow's
    optimisers are Keras 3's, a dependency the model otherwise does without, and the
    update has to sit inside the compiled loop with each step masked when its loss or
    gradient is not finite and a warm-up on the step size, which a stock optimiser does
    not offer.

    ``data`` is the whole data (full-batch steps; for a :class:`MergingModel`, its
    :meth:`~MergingModel.prepared` data) or an object whose ``draw(seed)`` gives a batch
    for every step (:class:`ImageBatches`, or :class:`~skmerge.model.streaming.StoreBatches`
    fed from an observation store). Steps whose loss or gradient is not finite leave the state
    untouched; a chunk with such steps restores the state from its start and halves the
    learning rate, and after repeated consecutive failures training stops with
    :class:`NumericalError`.

    ``beta_1`` and ``beta_2`` are Adam's decay rates. The gradients are clipped as Keras's
    optimisers clip them: each variable's to norm ``clipnorm``, all of them together to
    norm ``global_clipnorm``, then every element to [−``clipvalue``, ``clipvalue``] (None
    leaves them).
    """

    def __init__(self, model, variables, data, *, learning_rate, seed, jit_compile=True, beta_1=0.9, beta_2=0.99,
                 clipnorm=None, clipvalue=None, global_clipnorm=None):
        self.model = model
        self.variables = list(variables)
        self.data = data
        self.seed = int(seed)
        self.beta_1, self.beta_2 = float(beta_1), float(beta_2)
        self.clipnorm, self.clipvalue, self.global_clipnorm = clipnorm, clipvalue, global_clipnorm
        self.learning_rate = tf.Variable(float(learning_rate), trainable=False)
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False)
        # Adam's moments of all variables end to end in one vector each, so that a step
        # updates them with a dozen ops instead of a dozen per variable: a fit's fixed cost
        # is mostly tracing and optimising the step's graph (bench/RESULTS.md).
        n_weights = sum(int(np.prod(v.shape)) for v in self.variables)
        self.m = tf.Variable(tf.zeros([n_weights]), trainable=False)
        self.v = tf.Variable(tf.zeros([n_weights]), trainable=False)
        # Traced without AutoGraph: the chunk is written in graph ops (tf.while_loop) and
        # Python loops that unroll, so AutoGraph's source conversion only costs tracing time.
        self._chunk = tf.function(self._run_chunk, jit_compile=jit_compile, autograph=False)
        self._jit_compile = jit_compile

    def _gradients(self, seed):
        """The loss terms of one step and the gradient of the loss for every variable."""
        with tf.GradientTape() as tape:
            batch = self.data.draw(seed) if hasattr(self.data, "draw") else self.data
            terms = self.model.loss_terms(batch, seed)
            loss = terms[0]
        grads = tape.gradient(loss, self.variables)
        return terms, [tf.zeros_like(v) if g is None else tf.convert_to_tensor(g) for g, v in zip(grads, self.variables)]

    def _step(self):
        """One Adam step, left out when its loss or gradient is not finite: the step's
        loss terms and whether it was taken."""
        seed = tf.cast(tf.stack([tf.constant(self.seed, tf.int64), self.step]), tf.int32)
        terms, grads = self._gradients(seed)
        ok = tf.math.is_finite(terms[0]) & tf.math.is_finite(tf.linalg.global_norm(grads))
        grads = self._clipped(grads)
        t = tf.cast(self.step + 1, tf.float32)
        # A linear warm-up keeps Adam's first, full-size steps from throwing the
        # scale network far from its starting point.
        warmup = tf.minimum(1.0, t / _WARMUP)
        beta_1, beta_2 = self.beta_1, self.beta_2
        lr = warmup * self.learning_rate * tf.sqrt(1 - beta_2**t) / (1 - beta_1**t)
        g = tf.where(ok, concat_flat(grads), 0.0)
        m_new = beta_1 * self.m + (1 - beta_1) * g
        v_new = beta_2 * self.v + (1 - beta_2) * tf.square(g)
        self.m.assign(tf.where(ok, m_new, self.m))
        self.v.assign(tf.where(ok, v_new, self.v))
        update = tf.where(ok, lr * m_new / (tf.sqrt(v_new) + _EPS), 0.0)
        for var, var_update in zip(self.variables, split_like(update, self.variables)):
            var.assign_sub(var_update)
        self.step.assign_add(tf.cast(ok, tf.int64))
        return terms, ok

    def _run_chunk(self, n_steps):
        def body(i, n_bad, history):
            terms, ok = self._step()
            history = tf.tensor_scatter_nd_update(history, [[i]], [terms])
            return i + 1, n_bad + tf.cast(~ok, tf.int32), history

        start = [tf.constant(0), tf.constant(0), tf.zeros([_CHUNK, len(LOSS_TERMS)])]
        _, n_bad, history = tf.while_loop(lambda i, n, h: i < n_steps, body, start)
        return history, n_bad

    def _clipped(self, grads):
        if self.clipnorm is not None:
            grads = [tf.clip_by_norm(g, self.clipnorm) for g in grads]
        if self.global_clipnorm is not None:
            grads, _ = tf.clip_by_global_norm(grads, self.global_clipnorm)
        if self.clipvalue is not None:
            grads = [tf.clip_by_value(g, -self.clipvalue, self.clipvalue) for g in grads]
        return grads

    def _state(self):
        return [*self.variables, self.m, self.v, self.step]

    def run(self, max_iter, *, tol, n_iter_no_change, progress=None, monitor=None, watch=None, watch_every=None):
        """Optimise for up to ``max_iter`` steps.

        Without a monitor, training stops when the mean loss of the last
        ``n_iter_no_change`` steps is less than ``tol`` below the mean of the
        ``n_iter_no_change`` steps before them (comparing window means keeps the Monte
        Carlo noise of single steps from looking like progress). With a monitor (e.g. a
        held-out loss, evaluated after every chunk) it stops when the monitor has not
        improved by ``tol`` for ``n_iter_no_change`` steps, and the best monitored state
        is restored. Returns the loss terms of every step and whether it converged;
        ``kept_step`` is then the number of steps that led to the final state.

        ``watch`` (e.g. a held-out loss that does not steer training) is called after
        every ``watch_every`` steps; ``watched`` holds its (step, value) pairs.
        """
        history, recoveries = [], 0
        self.watched = []
        best, best_state, since_best = np.inf, None, 0
        self.kept_step = 0
        converged = False
        while len(history) < max_iter:
            n = min(_CHUNK, max_iter - len(history))
            if watch is not None:
                n = min(n, watch_every - len(history) % watch_every)
            saved = [v.numpy() for v in self._state()]
            # The first XLA compilation of a process logs its start-up through absl. Every
            # chunk runs without graph rewrites, not only the first: a call with them on
            # would instantiate the step again.
            quiet = quiet_stderr() if self._jit_compile and not history else contextlib.nullcontext()
            with quiet, without_graph_rewrites():
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
            if watch is not None and len(history) % watch_every == 0:
                self.watched.append((len(history), watch()))
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
                self.kept_step = len(history)
            else:
                since_best += n
            if since_best >= n_iter_no_change:
                converged = True
                break
        if best_state is not None:
            for var, value in zip(self.variables, best_state):
                var.assign(value)
        else:
            self.kept_step = len(history)
        return np.array(history).reshape(-1, len(LOSS_TERMS)), converged
