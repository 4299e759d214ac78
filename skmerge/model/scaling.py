"""The scale model: a neural network from an observation's metadata to the distribution
of its scale, and what tells images apart: per-image offsets, per-image layers, or an
image encoder.

log Σᵢ ~ Normal(μᵢ, sᵢ) with (μᵢ, sᵢ) = network(metadataᵢ) (+ bᵢₘₐ₉ₑ on μ), so Σ is
always positive (careless uses a normal law for Σ, which allows negative scales). With
the image encoder, (μᵢ, sᵢ) = network(metadataᵢ, eᵢₘₐ₉ₑ) instead, where the image's
embedding e is computed from the image's own observations (:class:`ImageEncoder`).
Image layers (careless's ``--image-layers``) are residual layers between the shared
stack and the output whose weights belong to each image, so that every image can bend
the metadata's effect on its scale its own way. Image heads are each image's own
weights on a few learned combinations of the shared stack's last hidden layer, added to
μ, with a Gaussian posterior and a hierarchical prior whose width the fit learns
(:class:`ImageHeads`), so that images bend their scales only as far as the
images together show they must. A known factor of the rows (a Laue spectrum and Lorentz
factor, ``log_known_scale``) adds to μ.
"""

import numpy as np

from .._tf import concat_flat, split_like, tf, tfd
from ..features import split_metadata
from .posterior import softplus_inverse

_LEAK = 0.01
_INITIAL_SPREAD = 0.05
_MIN_SPREAD = 1e-3
# The image heads' posterior standard deviation at the start (equal for every weight, so
# that the posterior starts as the prior: KL 0).
_INITIAL_HEAD_SCALE = 1e-3
# Size of the learned basis the image heads weigh: a head on all `width` hidden units
# spends a step's time on per-row arithmetic over `width` columns (1.6× the step of a
# fit without heads on hypf); on a few learned combinations of them it is cheap, and a
# fit uses only a few (most units' heads shrank to zero on simulated data).
_HEAD_BASIS = 3
_CHUNK_ROWS = 4096
_PARALLEL_CHUNKS = 2
# Rows per block of the image layers (every block holds rows of one image).
_IMAGE_BLOCK_ROWS = 64
# The image encoder: hidden width of both its perceptrons, and the size of an embedding.
_ENCODER_WIDTH = 16
_EMBEDDING_SIZE = 4
# What the encoder reads of an observation besides its metadata features.
N_OBSERVATION_INPUTS = 2


def image_model(params):
    """How an estimator's scale model tells images apart: "offsets", "encoder", or None
    when images get no scale of their own (``image_scales=False`` and no ``"image_id"``
    among the metadata)."""
    own = params.image_scales
    if isinstance(params.metadata, (list, tuple)):
        own = own or split_metadata(params.metadata)[1]
    return params.image_model if own else None


def _own_image(image, n_images):
    """Every row's image, with rows of image −1 (images the fit never saw) numbered
    ``n_images``: the row of the table of per-image weights that ends with the weights
    such images get."""
    return tf.where(image >= 0, image, n_images)


def _image_blocks(image, n_images):
    """Where each row goes when rows are laid out in blocks of ``_IMAGE_BLOCK_ROWS`` rows
    of one image (the rows of image −1 in blocks of the mean image, numbered
    ``n_images``): every row's slot, every slot's row (the number of rows for an empty
    slot), and every block's image so numbered.

    There are as many blocks as these rows could need (rows // block + images + 1), so
    that the shapes depend on the number of rows only; the unused blocks are empty and
    belong to the mean image."""
    n_rows = tf.shape(image)[0]
    own = _own_image(image, n_images)
    order = tf.argsort(own, stable=True)
    ordered = tf.gather(own, order)
    counts = tf.math.bincount(own, minlength=n_images + 1, maxlength=n_images + 1, dtype=tf.int32)
    blocks = (counts + _IMAGE_BLOCK_ROWS - 1) // _IMAGE_BLOCK_ROWS
    first_block = tf.cumsum(blocks, exclusive=True)
    rank = tf.range(n_rows) - tf.gather(tf.cumsum(counts, exclusive=True), ordered)
    ordered_slot = (tf.gather(first_block, ordered) + rank // _IMAGE_BLOCK_ROWS) * _IMAGE_BLOCK_ROWS \
        + rank % _IMAGE_BLOCK_ROWS
    n_blocks = n_rows // _IMAGE_BLOCK_ROWS + n_images + 1
    block_image = tf.minimum(tf.searchsorted(first_block + blocks, tf.range(n_blocks), side="right"), n_images)
    slot = tf.scatter_nd(order[:, None], ordered_slot, [n_rows])
    empty = tf.fill([n_blocks * _IMAGE_BLOCK_ROWS], n_rows)
    slot_row = tf.tensor_scatter_nd_update(empty, ordered_slot[:, None], order)
    return slot, slot_row, block_image


def _to_slots(rows, slot, slot_row):
    """Rows (rows, k) laid out in their slots (slots, k), empty slots zero (``slot`` and
    ``slot_row`` from :func:`_image_blocks`).

    The layout moves each row to one slot, so each direction's gradient is the other
    direction's gather: no scatter either way. With a scatter one way the layout took 1.3×
    as long, and a thermolysin step about 6 % longer (bench/RESULTS.md, session 33)."""
    @tf.custom_gradient
    def moved(rows):
        with_empty = tf.concat([rows, tf.zeros([1, tf.shape(rows)[1]])], 0)
        return tf.gather(with_empty, slot_row), lambda d_slots: _to_rows(d_slots, slot, slot_row)

    return moved(rows)


def _to_rows(slots, slot, slot_row):
    """The rows' values (rows, k) read back from their slots (slots, k): the inverse of
    :func:`_to_slots`."""
    @tf.custom_gradient
    def moved(slots):
        return tf.gather(slots, slot), lambda d_rows: _to_slots(d_rows, slot, slot_row)

    return moved(slots)


def observation_inputs(intensity, sigma, expected):
    """What the image encoder reads of each observation besides its metadata: asinh(I/⟨I⟩)
    and log(σ/⟨I⟩), with ⟨I⟩ the mean intensity expected at the observation's resolution.

    Dividing by ⟨I⟩ takes the fall-off with resolution out, so that what is left of an
    image's intensities is its scale (and partialities, and the amplitudes' spread);
    asinh grows like a logarithm for strong spots and keeps the sign of negative ones,
    so that no single spot dominates an image's mean.

    Returns
    -------
    ndarray of shape (n, N_OBSERVATION_INPUTS), float32
    """
    return np.stack([np.arcsinh(intensity / expected), np.log(sigma / expected)], axis=1).astype(np.float32)


class ImageEncoder(tf.Module):
    """A set encoder: each image's embedding, computed from its own observations.

    A perceptron maps each observation's inputs to a summary; the summaries of an image
    are averaged, and a second perceptron maps the average to the image's embedding.
    The average makes the embedding independent of the order of the observations, and
    the weights are shared by all images, so that the model's size does not grow with
    their number and an image the fit never saw gets an embedding all the same.

    Parameters
    ----------
    n_inputs : int
        Inputs per observation.
    rng : numpy.random.RandomState
        Draws the initial weights.
    """

    def __init__(self, n_inputs, rng, name="image_encoder"):
        super().__init__(name=name)
        self.observation_layers = _dense_layers([n_inputs, _ENCODER_WIDTH, _ENCODER_WIDTH], rng)
        self.image_layers = _dense_layers([_ENCODER_WIDTH, _ENCODER_WIDTH, _EMBEDDING_SIZE], rng)

    def __call__(self, inputs, image):
        """The embedding of every row's image, pooling the rows given: every row of an
        image must be among them (whole data, or a batch of whole images). Rows of image
        −1 (padding) are pooled among themselves."""
        images, local = tf.unique(image)
        pooled = tf.math.unsorted_segment_mean(self.summaries(inputs), local, tf.size(images))
        return tf.gather(self.embedding(pooled), local)

    def table(self, pieces, n_images):
        """The embedding of each of ``n_images`` images, shape (n_images, size), from
        ``pieces`` of rows, (inputs, image) pairs that may split an image's rows: the
        summaries are summed per image across the pieces before the average."""
        total = tf.zeros([n_images, _ENCODER_WIDTH])
        count = tf.zeros([n_images])
        for inputs, image in pieces:
            total += tf.math.unsorted_segment_sum(self.summaries(inputs), image, n_images)
            count += tf.math.unsorted_segment_sum(tf.ones(tf.shape(image)), image, n_images)
        return self.embedding(total / tf.maximum(count, 1.0)[:, None])

    def summaries(self, inputs):
        return _perceptron(self.observation_layers, inputs, activate_last=True)

    def embedding(self, pooled):
        return _perceptron(self.image_layers, pooled, activate_last=False)

    def variables_in_order(self):
        return [v for layer in (*self.observation_layers, *self.image_layers) for v in layer]


class ImageHeads(tf.Module):
    """Each image's head: weights w of its own on ``_HEAD_BASIS`` learned linear
    combinations z = h·P of the scale network's last hidden layer h (the basis P shared
    by the images), which add z·w to μ of log Σ.

    The weights' posterior is Normal(m, s) per weight and their prior Normal(0, τⱼ) per
    combination j, τⱼ² the mean of m² + s² over the images: the prior width that
    maximises the ELBO for the posterior given (:meth:`kl`). As log Σ is normal given w,
    the heads' uncertainty adds (z·s)² to the variance of log Σ instead of being sampled.

    Parameters
    ----------
    n_images : int
        Number of images with a head of their own.
    width : int
        Width of the hidden layer the basis combines.
    rng : numpy.random.RandomState
        Draws the basis.
    """

    def __init__(self, n_images, width, rng, name="image_heads"):
        super().__init__(name=name)
        self.basis = tf.Variable(rng.normal(0, np.sqrt(1.0 / width), (width, _HEAD_BASIS)).astype(np.float32))
        self.loc = tf.Variable(np.zeros((n_images, _HEAD_BASIS), np.float32))
        self.raw_scale = tf.Variable(np.full((n_images, _HEAD_BASIS), softplus_inverse(_INITIAL_HEAD_SCALE),
                                             np.float32))

    def __call__(self, mu, spread, basis_values, image):
        """(μ, s) of log Σ with every row's image head on the rows' ``basis_values`` z:
        mean z·m and variance (z·s)² added; rows of image −1 get a head from the prior
        (mean 0, standard deviation τ)."""
        loc = tf.concat([self.loc, tf.zeros([1, _HEAD_BASIS])], 0)
        scale = tf.concat([self.scale(), self.prior_scale()[None]], 0)
        own = _own_image(image, self.loc.shape[0])
        mu = mu + tf.reduce_sum(basis_values * tf.gather(loc, own), 1)
        head_var = tf.reduce_sum(tf.square(basis_values * tf.gather(scale, own)), 1)
        return mu, tf.sqrt(tf.square(spread) + head_var)

    def scale(self):
        return tf.nn.softplus(self.raw_scale)

    def prior_scale(self):
        """τⱼ of every combination of the basis: the root mean square of the heads'
        posterior over the images."""
        return tf.sqrt(tf.reduce_mean(tf.square(self.loc) + tf.square(self.scale()), 0))

    def kl(self):
        """KL(q‖p) of the heads, summed over the images' weights.

        With τ the ELBO-optimal width for the posterior given, the gradient through τ is
        zero, so it is held fixed: a hierarchical prior whose width the images decide, as
        wide as their heads differ and no wider — images whose scales the shared network
        explains get heads near zero."""
        prior = tfd.Normal(0.0, tf.stop_gradient(self.prior_scale()))
        return tf.reduce_sum(tfd.kl_divergence(tfd.Normal(self.loc, self.scale()), prior))


def _dense_layers(sizes, rng):
    """(kernel, bias) of each layer of a perceptron, He-initialised."""
    return [(tf.Variable(rng.normal(0, np.sqrt(2.0 / fan_in), (fan_in, fan_out)).astype(np.float32)),
             tf.Variable(np.zeros(fan_out, np.float32)))
            for fan_in, fan_out in zip(sizes[:-1], sizes[1:])]


def _with_bias_row(kernel, bias):
    """A kernel (…, fan_in, fan_out) with its bias (…, fan_out) as an extra last row, to
    act on a constant input of one."""
    return tf.concat([kernel, bias[..., None, :]], -2)


def _residual_kernel(kernel, bias):
    """:func:`_with_bias_row` with a column of zeros besides, so that a residual layer
    keeps its input's constant one."""
    zeros = [[0, 0]] * (len(kernel.shape) - 1)
    return tf.pad(_with_bias_row(kernel, bias), [*zeros, [0, 1]])


def _perceptron(layers, h, activate_last):
    for i, (kernel, bias) in enumerate(layers):
        h = tf.matmul(h, kernel) + bias
        if activate_last or i < len(layers) - 1:
            h = tf.nn.leaky_relu(h, _LEAK)
    return h


class ScaleNetwork(tf.Module):
    """A residual multilayer perceptron with per-image offsets or an image encoder.

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
    encoder : bool, default=False
        Append to every observation's features the embedding of its image by an
        :class:`ImageEncoder` (which reads the features and the
        :func:`observation_inputs`).
    image_layers : int, default=0
        Residual layers with a width × width kernel and a bias per image, after the
        shared stack. They start at zero, so that the network starts as without them.
    n_layer_images : int, default=0
        Number of images with layers or heads of their own (rows of image −1 get the
        mean image's layers and a head drawn from the heads' prior).
    image_heads : bool, default=False
        Give each image a head on the last hidden layer (:class:`ImageHeads`), whose
        basis values are the output layer's extra columns.
    """

    def __init__(self, n_features, n_layers, width, n_images, rng, image_offsets=None, spread_bijector="softplus",
                 encoder=False, image_layers=0, n_layer_images=0, image_heads=False, name="scale"):
        super().__init__(name=name)
        sizes = [max(n_features + (_EMBEDDING_SIZE if encoder else 0), 1)] + [width] * n_layers
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
        offsets = np.asarray(np.zeros(n_images) if image_offsets is None else image_offsets, np.float32)
        # Without offsets the empty table is a constant: a data-parallel fit broadcasts
        # every variable's first value to its workers, and TensorFlow's collectives crash
        # on an empty tensor.
        self.image_offsets = tf.Variable(offsets) if len(offsets) else tf.constant(offsets)
        self.n_features = n_features
        # Made after the network so that its weights draw as without an encoder.
        self.encoder = ImageEncoder(n_features + N_OBSERVATION_INPUTS, rng) if encoder else None
        self.image_kernels = [tf.Variable(np.zeros((n_layer_images, width, width), np.float32))
                              for _ in range(image_layers)]
        self.image_biases = [tf.Variable(np.zeros((n_layer_images, width), np.float32)) for _ in range(image_layers)]
        self.heads = ImageHeads(n_layer_images, width, rng) if image_heads else None

    def __call__(self, features, image, image_inputs=None, image_embedding=None, image_blocks=None):
        """(μ, s) of log Σ for each observation.

        With offsets, ``image`` is −1 for images without an offset of their own
        (held-out images), which get the mean offset. With the encoder, ``image`` numbers
        the images of the rows and ``image_inputs`` are the rows'
        :func:`observation_inputs`: each image's embedding pools its rows among those
        given, unless ``image_embedding`` (the table of every image's, from
        :meth:`image_embeddings`) is given. ``image_blocks`` is :meth:`image_blocks` of
        ``image``, if computed already.
        """
        if self.encoder is not None:
            if image_embedding is None:
                embedding = self.encoder(tf.concat([features, image_inputs], 1), image)
            else:
                embedding = tf.gather(image_embedding, image)
            features = tf.concat([features, embedding], 1)
        blocks = (image_blocks or self.image_blocks(image)) if self.image_kernels else None
        out = self._output(self._inputs(features, image), lambda hidden: self._image_stack(hidden, blocks))
        offset = None
        if self.image_offsets.shape[0] > 0:
            known = image >= 0
            offset = tf.where(known, tf.gather(self.image_offsets, tf.maximum(image, 0)),
                              tf.reduce_mean(self.image_offsets))
        return self._mu_and_spread(out, image, offset)

    @property
    def image_weight_count(self):
        """The number of point-estimated weights of each image's own — its offset and its
        image layers' kernels and biases — that :meth:`image_parameter_gradients` covers
        (0 with the image encoder, whose embeddings are not weights of their own)."""
        if self.encoder is not None:
            return 0
        width = self.out_kernel.shape[0]
        return int(self.image_offsets.shape[0] > 0) + len(self.image_kernels) * (width * width + width)

    def image_parameter_gradients(self, data):
        """Each row's gradient of log E[Σ] (μ + s²/2) with respect to the weights of its
        own image that :attr:`image_weight_count` counts — its offset, then each image
        layer's kernel and bias — as a float32 array of shape (rows, weights per image).
        Rows of image −1 (no weights of their own) get zeros."""
        image = data["image"]
        if self.image_kernels:
            rows = self._own_weight_gradients(self._inputs(data["features"], image), image).numpy()
        else:
            # An offset adds to μ alone, so every row's gradient is 1; tracing the general
            # gradient took a fifth of a small rotation fit's time.
            rows = np.ones((len(image), 1), np.float32)
        rows[image.numpy() < 0] = 0.0
        return rows

    @tf.function(reduce_retracing=True)
    def _own_weight_gradients(self, inputs, image):
        # A row's scale depends on its own image's weights alone, so the gradient of the
        # rows' sum with respect to a copy of the weights per row is every row's own.
        own = tf.maximum(image, 0)
        has_offsets = self.image_offsets.shape[0] > 0
        layers = [[tf.gather(kernel, own), tf.gather(bias, own)]
                  for kernel, bias in zip(self.image_kernels, self.image_biases)]
        copies = ([tf.gather(self.image_offsets, own)] if has_offsets else []) + [w for pair in layers for w in pair]

        def own_layers(hidden):
            for kernel, bias in layers:
                hidden = hidden + tf.nn.leaky_relu(tf.einsum("ri,rio->ro", hidden, _residual_kernel(kernel, bias)),
                                                   _LEAK)
            return hidden

        with tf.GradientTape() as tape:
            tape.watch(copies)
            mu, spread = self._mu_and_spread(self._output(inputs, own_layers), image,
                                             copies[0] if has_offsets else None)
            log_scale = mu + tf.square(spread) / 2
        gradients = tape.gradient(log_scale, copies, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return tf.concat([tf.reshape(g, [tf.shape(image)[0], -1]) for g in gradients], 1)

    def _output(self, inputs, image_stack):
        """The output layer's values of every row: the shared stack, then (with image
        layers) ``image_stack`` on its hidden values (rows, width + 1), then the output
        layer."""
        if self.image_kernels:
            hidden = self._checkpointed(inputs, self._hidden, self._stack_weights(), self.out_kernel.shape[0] + 1)
            return tf.matmul(image_stack(hidden), self._output_weights())
        return self._checkpointed(inputs, self._dense, [*self._stack_weights(), self._output_weights()],
                                  self._n_outputs())

    def _inputs(self, features, image):
        """The shared stack's input: the features, or a column of zeros without any."""
        return tf.zeros([tf.shape(image)[0], 1]) if self.n_features == 0 and self.encoder is None else features

    def _mu_and_spread(self, out, image, offset):
        """(μ, s) from the output layer's values: the spread made positive, the heads and
        the rows' image offsets (None without) added."""
        mu = out[:, 0]
        positive = tf.exp if self.spread_bijector == "exp" else tf.nn.softplus
        spread = positive(out[:, 1]) + _MIN_SPREAD
        if self.heads is not None:
            mu, spread = self.heads(mu, spread, out[:, 2:], image)
        if offset is not None:
            mu = mu + offset
        return mu, spread

    def heads_kl(self):
        """KL(q‖p) of the image heads (:meth:`ImageHeads.kl`; 0 without heads)."""
        return tf.constant(0.0) if self.heads is None else self.heads.kl()

    def of(self, data):
        """(μ, s) of log Σ for the rows of a dict of tensors
        (:func:`~skmerge.model.data.tensor_data`), with the rows' known log scale
        (``log_known_scale``) added to μ."""
        mu, spread = self(data["features"], data["image"], data.get("image_inputs"), data.get("image_embedding"),
                          data.get("image_blocks"))
        if "log_known_scale" in data:
            mu = mu + data["log_known_scale"]
        return mu, spread

    def image_embeddings(self, pieces, n_images):
        """The encoder's embedding of each image from all of its rows, which the
        ``pieces`` (dicts of tensors) may split."""
        return self.encoder.table(((tf.concat([p["features"], p["image_inputs"]], 1), p["image"]) for p in pieces),
                                  n_images)

    def _stack_weights(self):
        """The shared stack's weights as :meth:`_hidden` reads them: the first layer's
        kernel and bias, then each residual layer's kernel with its bias as an extra row
        and a column of zeros (for the constant row of the hidden values)."""
        residual = [_residual_kernel(kernel, bias) for kernel, bias in zip(self.kernels[1:], self.biases[1:])]
        return [self.kernels[0], self.biases[0], *residual]

    def _output_weights(self):
        """The output layer's kernel with its bias as an extra row."""
        return _with_bias_row(self._out_kernel(), self._out_bias())

    def _hidden(self, h, weights):
        """The shared stack on a chunk of rows held transposed, (features, rows) → (width
        + 1, rows): the last hidden values with a row of ones under them; ``weights`` are
        :meth:`_stack_weights`.

        With rows along the last axis each 10 × 10 layer is one wide matrix product,
        which the CPU kernels run faster than a tall (rows, 10) @ (10, 10) one. The
        residual layers hold their biases in their kernels, acting on the row of ones:
        the stack is bound by the number of operations on each chunk of rows more than by
        arithmetic, and a bias added apart is one more operation per layer forward and
        backward (bench/RESULTS.md).
        """
        first_kernel, first_bias, *residual = weights
        h = tf.nn.leaky_relu(tf.matmul(first_kernel, h, transpose_a=True) + first_bias[:, None], _LEAK)
        h = tf.concat([h, tf.ones([1, tf.shape(h)[1]])], 0)
        for kernel in residual:
            h = h + tf.nn.leaky_relu(tf.matmul(kernel, h, transpose_a=True), _LEAK)
        return h

    def _dense(self, h, weights):
        """The shared stack and the output layer, (features, rows) → (outputs, rows): the
        raw μ and spread, then the heads' basis values; ``weights`` are
        :meth:`_stack_weights` and :meth:`_output_weights`."""
        return tf.matmul(weights[-1], self._hidden(h, weights[:-1]), transpose_a=True)

    def _out_kernel(self):
        return self.out_kernel if self.heads is None else tf.concat([self.out_kernel, self.heads.basis], 1)

    def _out_bias(self):
        return self.out_bias if self.heads is None else tf.pad(self.out_bias, [[0, _HEAD_BASIS]])

    def _n_outputs(self):
        return 2 if self.heads is None else 2 + _HEAD_BASIS

    def image_blocks(self, image):
        """The layout of rows of images ``image`` in the image layers' blocks
        (:func:`_image_blocks`); None without image layers. It depends on the rows'
        images only, so a full-batch fit computes it once (an argsort of every row): made
        in every step, it took 6 % of a thermolysin step."""
        return _image_blocks(image, self.image_kernels[0].shape[0]) if self.image_kernels else None

    def _image_stack(self, hidden, blocks):
        """The image layers on rows (rows, width + 1) → (rows, width + 1), the last
        column ones (as :meth:`_hidden` leaves them, transposed): each row through
        its image's kernels and biases, the mean image's for rows of image −1; ``blocks``
        is the rows' :meth:`image_blocks`.

        The rows are laid out in blocks of ``_IMAGE_BLOCK_ROWS`` rows of one image each,
        so that a layer is one batched (block, width + 1) @ (width + 1, width + 1) product
        (the biases act on the column of ones, as in the shared stack); with a kernel
        gathered for every row a step of hypf with two layers took 3× as long
        (bench/RESULTS.md). They stay in that layout through every layer (the empty
        slots compute values that are never read back): laid out anew for each layer, a
        thermolysin step with three layers took 14 % longer.
        """
        slot, slot_row, block_image = blocks
        size = hidden.shape[1]
        blocks = tf.reshape(_to_slots(hidden, slot, slot_row), [-1, _IMAGE_BLOCK_ROWS, size])
        for kernel in self._image_layer_weights():
            blocks = blocks + tf.nn.leaky_relu(tf.matmul(blocks, tf.gather(kernel, block_image)), _LEAK)
        return _to_rows(tf.reshape(blocks, [-1, size]), slot, slot_row)

    def _image_layer_weights(self):
        """Each image layer's kernels, every image's and the mean image's last, with the
        bias as an extra row and a column of zeros (as :meth:`_stack_weights`)."""
        for kernel, bias in zip(self.image_kernels, self.image_biases):
            kernel = _residual_kernel(kernel, bias)
            yield tf.concat([kernel, tf.reduce_mean(kernel, 0, keepdims=True)], 0)

    def _checkpointed(self, features, fn, weights, n_out):
        """``fn`` (a stack on a chunk of rows held transposed, (features, rows) →
        (n_out, rows), called as ``fn(chunk, weights)`` with the tensors ``weights``) on
        every row, (rows, features) → (rows, n_out), in chunks of rows.

        The stack is bound by memory traffic: kept for the backward pass, twenty
        activations of every row fall out of the CPU cache. So the gradient recomputes
        each chunk's forward pass just before its backward pass (gradient checkpointing
        per chunk), and two chunks run at a time, one per core. This is faster than the
        stack on all rows at once, compiled with XLA (bench/RESULTS.md).
        """
        # Read as tensors: custom_gradient counts a variable among its inputs (the first
        # layer's kernel and bias, seen eagerly under a distribution strategy) as one the
        # function reads, whose gradient `grad` would have to return apart.
        weights = [tf.convert_to_tensor(w) for w in weights]
        n = tf.shape(features)[0]
        n_chunks = (n + _CHUNK_ROWS - 1) // _CHUNK_ROWS
        padded = tf.pad(features, [[0, n_chunks * _CHUNK_ROWS - n], [0, 0]])
        chunks = tf.transpose(tf.reshape(padded, [n_chunks, _CHUNK_ROWS, -1]), [0, 2, 1])

        def each_chunk(body, elems, signature):
            return tf.map_fn(body, elems, parallel_iterations=_PARALLEL_CHUNKS, fn_output_signature=signature)

        @tf.custom_gradient
        def stack(chunks, *weights):
            def grad(d_out):
                def chunk_grad(args):
                    x, dy = args
                    with tf.GradientTape() as tape:
                        tape.watch([x, *weights])
                        y = fn(x, weights)
                    d_x, *d_weights = tape.gradient(y, [x, *weights], output_gradients=dy)
                    # The weights' gradients end to end: map_fn stacks each output
                    # separately, with a handful of graph ops per output.
                    return [d_x, concat_flat(d_weights)]

                d_chunks, d_weights = each_chunk(chunk_grad, (chunks, d_out), [tf.float32, tf.float32])
                return (d_chunks, *split_like(tf.reduce_sum(d_weights, 0), weights))

            return each_chunk(lambda x: fn(x, weights), chunks, tf.float32), grad

        return tf.reshape(tf.transpose(stack(chunks, *weights), [0, 2, 1]), [-1, n_out])[:n]

    def get_weights(self):
        return [v.numpy() for v in self._ordered()]

    def set_weights(self, weights):
        for v, value in zip(self._ordered(), weights):
            if isinstance(v, tf.Variable):
                v.assign(value)

    def _dense_variables(self):
        basis = [] if self.heads is None else [self.heads.basis]
        return [*self.kernels, *self.biases, self.out_kernel, self.out_bias, *basis]

    def _ordered(self):
        encoder = self.encoder.variables_in_order() if self.encoder is not None else []
        return [*self._dense_variables(), *encoder, *self.image_kernels, *self.image_biases, *self._heads(),
                self.image_offsets]

    def _heads(self):
        return [] if self.heads is None else [self.heads.loc, self.heads.raw_scale]

    def per_image_weights(self):
        """Positions in :meth:`get_weights` of the weights whose first axis runs over
        the images (the image layers', the heads' and the offsets)."""
        n = len(self._ordered())
        return list(range(n - 1 - 2 * len(self.image_kernels) - len(self._heads()), n))
