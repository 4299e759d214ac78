"""The scale model: a neural network from an observation's metadata to the distribution
of its scale, plus optional per-image offsets.

log Σᵢ ~ Normal(μᵢ, sᵢ) with (μᵢ, sᵢ) = network(metadataᵢ) (+ bᵢₘₐ₉ₑ on μ), so Σ is
always positive (careless uses a normal law for Σ, which allows negative scales).
"""

import numpy as np

from .._tf import tf
from .posterior import softplus_inverse

_LEAK = 0.01
_INITIAL_SPREAD = 0.05
_MIN_SPREAD = 1e-3
_CHUNK_ROWS = 4096
_PARALLEL_CHUNKS = 2


class ScaleNetwork(tf.Module):
    """A residual multilayer perceptron with per-image offsets.

    Parameters
    ----------
    n_features : int
        Number of metadata features (0 gives a constant scale).
    n_layers, width : int
        Hidden layers and their width (careless uses 20 × 10).
    n_images : int
        Number of images with their own offset (0 disables per-image offsets).
    rng : numpy.random.RandomState
        Draws the initial weights, so that fits are repeatable.
    image_offsets : ndarray of shape (n_images,), optional
        Initial per-image log-scale offsets.
    spread_bijector : {"softplus", "exp"}, default="softplus"
        The function that keeps the spread s of log Σ positive.
    """

    def __init__(self, n_features, n_layers, width, n_images, rng, image_offsets=None, spread_bijector="softplus",
                 name="scale"):
        super().__init__(name=name)
        sizes = [max(n_features, 1)] + [width] * n_layers
        self.kernels, self.biases = [], []
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            # He initialisation; residual layers start smaller so that the sum of 20
            # blocks does not blow up the activations at the start.
            std = np.sqrt(2.0 / fan_in) * (1.0 if i == 0 else 0.3)
            self.kernels.append(tf.Variable(rng.normal(0, std, (fan_in, fan_out)).astype(np.float32)))
            self.biases.append(tf.Variable(np.zeros(fan_out, np.float32)))
        # The output layer starts at zero: scale 1 (or the per-image offsets), small spread.
        self.out_kernel = tf.Variable(np.zeros((sizes[-1], 2), np.float32))
        self.spread_bijector = spread_bijector
        raw_spread = np.log(_INITIAL_SPREAD) if spread_bijector == "exp" else softplus_inverse(_INITIAL_SPREAD)
        self.out_bias = tf.Variable(np.array([0.0, raw_spread], np.float32))
        offsets = np.zeros(n_images) if image_offsets is None else image_offsets
        self.image_offsets = tf.Variable(np.asarray(offsets, np.float32))
        self.n_features = n_features

    def __call__(self, features, image):
        """(μ, s) of log Σ for each observation. ``image`` is −1 for images without an
        offset of their own (held-out images), which get the mean offset."""
        if self.n_features == 0:
            features = tf.zeros([tf.shape(image)[0], 1])
        out = self._stack(features)
        mu = out[:, 0]
        if self.image_offsets.shape[0] > 0:
            known = image >= 0
            offset = tf.gather(self.image_offsets, tf.maximum(image, 0))
            mu = mu + tf.where(known, offset, tf.reduce_mean(self.image_offsets))
        positive = tf.exp if self.spread_bijector == "exp" else tf.nn.softplus
        return mu, positive(out[:, 1]) + _MIN_SPREAD

    def _dense(self, h):
        """The dense stack on a chunk of rows held transposed, (features, rows) → (2, rows).

        With rows along the last axis each 10 × 10 layer is one wide matrix product,
        which the CPU kernels run faster than a tall (rows, 10) @ (10, 10) one.
        """
        h = tf.nn.leaky_relu(tf.matmul(self.kernels[0], h, transpose_a=True) + self.biases[0][:, None], _LEAK)
        for kernel, bias in zip(self.kernels[1:], self.biases[1:]):
            h = h + tf.nn.leaky_relu(tf.matmul(kernel, h, transpose_a=True) + bias[:, None], _LEAK)
        return tf.matmul(self.out_kernel, h, transpose_a=True) + self.out_bias[:, None]

    def _stack(self, features):
        """The dense stack on every row, (rows, features) → (rows, 2), in chunks of rows.

        The stack is bound by memory traffic: kept for the backward pass, twenty
        activations of every row fall out of the CPU cache. So the gradient recomputes
        each chunk's forward pass just before its backward pass (gradient checkpointing
        per chunk), and two chunks run at a time, one per core. This is faster than the
        stack on all rows at once, compiled with XLA (bench/RESULTS.md).
        """
        n = tf.shape(features)[0]
        n_chunks = (n + _CHUNK_ROWS - 1) // _CHUNK_ROWS
        padded = tf.pad(features, [[0, n_chunks * _CHUNK_ROWS - n], [0, 0]])
        chunks = tf.transpose(tf.reshape(padded, [n_chunks, _CHUNK_ROWS, -1]), [0, 2, 1])
        variables = self._dense_variables()

        def each_chunk(fn, elems, signature):
            return tf.map_fn(fn, elems, parallel_iterations=_PARALLEL_CHUNKS, fn_output_signature=signature)

        @tf.custom_gradient
        def stack(chunks):
            def grad(d_out, variables=variables):
                def chunk_grad(args):
                    x, dy = args
                    with tf.GradientTape() as tape:
                        tape.watch(x)
                        y = self._dense(x)
                    return tape.gradient(y, [x, *variables], output_gradients=dy)

                per_chunk = each_chunk(chunk_grad, (chunks, d_out), [tf.float32] * (len(variables) + 1))
                return per_chunk[0], [tf.reduce_sum(g, 0) for g in per_chunk[1:]]

            return each_chunk(self._dense, chunks, tf.float32), grad

        return tf.reshape(tf.transpose(stack(chunks), [0, 2, 1]), [-1, 2])[:n]

    def get_weights(self):
        return [v.numpy() for v in self._ordered()]

    def set_weights(self, weights):
        for v, value in zip(self._ordered(), weights):
            v.assign(value)

    def _dense_variables(self):
        return [*self.kernels, *self.biases, self.out_kernel, self.out_bias]

    def _ordered(self):
        return [*self._dense_variables(), self.image_offsets]
