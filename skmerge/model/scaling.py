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
    """

    def __init__(self, n_features, n_layers, width, n_images, rng, image_offsets=None, name="scale"):
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
        self.out_bias = tf.Variable(np.array([0.0, softplus_inverse(_INITIAL_SPREAD)], np.float32))
        offsets = np.zeros(n_images) if image_offsets is None else image_offsets
        self.image_offsets = tf.Variable(np.asarray(offsets, np.float32))
        self.n_features = n_features

    def __call__(self, features, image):
        """(μ, s) of log Σ for each observation. ``image`` is −1 for images without an
        offset of their own (held-out images), which get the mean offset."""
        if self.n_features == 0:
            h = tf.zeros([tf.shape(image)[0], 1])
        else:
            h = features
        h = tf.nn.leaky_relu(h @ self.kernels[0] + self.biases[0], _LEAK)
        for kernel, bias in zip(self.kernels[1:], self.biases[1:]):
            h = h + tf.nn.leaky_relu(h @ kernel + bias, _LEAK)
        out = h @ self.out_kernel + self.out_bias
        mu = out[:, 0]
        if self.image_offsets.shape[0] > 0:
            known = image >= 0
            offset = tf.gather(self.image_offsets, tf.maximum(image, 0))
            mu = mu + tf.where(known, offset, tf.reduce_mean(self.image_offsets))
        return mu, tf.nn.softplus(out[:, 1]) + _MIN_SPREAD

    def get_weights(self):
        return [v.numpy() for v in self._ordered()]

    def set_weights(self, weights):
        for v, value in zip(self._ordered(), weights):
            v.assign(value)

    def _ordered(self):
        return [*self.kernels, *self.biases, self.out_kernel, self.out_bias, self.image_offsets]
