"""Data-parallel training on TensorFlow's ``tf.distribute``.

The same fit runs in several processes, on one host or many: the workers of a
:class:`tf.distribute.MultiWorkerMirroredStrategy`. Every worker reads the whole table
and builds the same model (the model's variables are mirrored: each worker holds all
reflections' posterior and all images' offsets, and the strategy starts them from the
first worker's values). The images are dealt out among the workers; in each step every
worker computes the loss and its gradients on its own images, TensorFlow's collective
all-reduce sums them over the workers, and every worker applies the same Adam update,
so that the variables stay equal. The loss of a step is the sum of the workers' shares,
each an unbiased estimate of its images' part of the full loss, so the fit is the
single-process one within Monte Carlo noise.

From Python, create the strategy at the start of each worker's program (before
TensorFlow runs anything) and fit inside its scope::

    strategy = multi_worker_strategy(["node1:7000", "node2:7000"], worker_index=i)
    with strategy.scope():
        merger = VariationalMerger(random_state=0).fit(X)
    if is_chief(strategy):
        merger.save("merger.npz")

On the command line, ``skmerge mono … --workers node1:7000,node2:7000 --worker-index i``
(or ``TF_CONFIG`` in the environment) does the same, and only the chief writes the
outputs (see docs/cli.md).
"""

import json
import os
import socket
from numbers import Integral

import numpy as np

from .._tf import tf
from ..errors import InputError, ParameterError
from .training import ImageBatches, Trainer

__all__ = ["multi_worker_strategy", "is_chief", "parse_workers", "tf_config_workers", "local_workers"]

_RING = tf.distribute.experimental.CommunicationImplementation.RING


def multi_worker_strategy(workers=None, worker_index=None):
    """TensorFlow's multi-worker strategy for a data-parallel fit, one worker per process.

    Every worker process calls this with the same ``workers`` and its own
    ``worker_index``, before TensorFlow runs anything; the call returns once all workers
    have connected. Fits inside ``strategy.scope()`` are then data-parallel.

    Parameters
    ----------
    workers : list of str or str, optional
        The ``host:port`` of every worker (a list, or one comma-separated string); each
        worker listens on its own port. None reads the cluster and this worker's place
        in it from the ``TF_CONFIG`` environment variable, as TensorFlow's cluster
        launchers set it.
    worker_index : int, optional
        This process's position in ``workers`` (0 is the chief, which writes the
        outputs); required with ``workers``.

    Returns
    -------
    tf.distribute.MultiWorkerMirroredStrategy
        Its collectives use ring all-reduce, which works on CPUs.

    Raises
    ------
    ParameterError
        If the worker list or index is malformed, ``TF_CONFIG`` is missing or
        unreadable, or TensorFlow has already run something in this process.

    Examples
    --------
    In each of two processes on one machine (``i`` = 0 and 1):

    >>> strategy = multi_worker_strategy("localhost:7000,localhost:7001", worker_index=i)  # doctest: +SKIP
    >>> with strategy.scope():  # doctest: +SKIP
    ...     merger = VariationalMerger(random_state=0).fit(X)
    """
    if workers is None:
        if worker_index is not None:
            raise ParameterError("worker_index needs workers (the host:port of every worker).")
        resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
        _check_tf_config()
    else:
        workers = parse_workers(workers)
        if not isinstance(worker_index, Integral) or not 0 <= worker_index < len(workers):
            raise ParameterError(f"worker_index {worker_index!r}: give this worker's position in the list of "
                                 f"{len(workers)} workers, 0 … {len(workers) - 1}.")
        resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
            tf.train.ClusterSpec({"worker": workers}), task_type="worker", task_id=int(worker_index),
            rpc_layer="grpc")
    try:
        return tf.distribute.MultiWorkerMirroredStrategy(
            cluster_resolver=resolver,
            communication_options=tf.distribute.experimental.CommunicationOptions(implementation=_RING))
    except RuntimeError as exc:
        raise ParameterError(f"the multi-worker strategy could not start ({exc}): create it at the start of the "
                             "program, before TensorFlow runs anything.") from None


def parse_workers(workers):
    """The list of ``host:port`` of a worker list (a list or a comma-separated string).

    Examples
    --------
    >>> parse_workers("node1:7000, node2:7000")
    ['node1:7000', 'node2:7000']
    """
    listed = [w.strip() for w in workers.split(",")] if isinstance(workers, str) else [str(w) for w in workers]
    for worker in listed:
        host, _, port = worker.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ParameterError(f"worker {worker!r}: give host:port, e.g. node1:7000.")
    if len(set(listed)) != len(listed):
        raise ParameterError(f"workers {','.join(listed)}: a host:port is listed twice; each worker needs its own.")
    if len(listed) < 2:
        raise ParameterError(f"workers {','.join(listed)}: a data-parallel fit needs at least two workers.")
    return listed


def local_workers(n_workers):
    """A worker list of ``n_workers`` on this machine, on ports that are free now (to try
    data-parallel fits, or to test them, on one machine).

    Examples
    --------
    >>> len(parse_workers(local_workers(2)))
    2
    """
    sockets = [socket.socket() for _ in range(n_workers)]
    try:
        for s in sockets:
            s.bind(("localhost", 0))
        return ",".join(f"localhost:{s.getsockname()[1]}" for s in sockets)
    finally:
        for s in sockets:
            s.close()


def _check_tf_config():
    text = os.environ.get("TF_CONFIG")
    if text is None:
        raise ParameterError("no workers given and no TF_CONFIG in the environment: give the host:port of every "
                             "worker, or set TF_CONFIG as TensorFlow's cluster launchers do.")
    try:
        config = json.loads(text)
        config["cluster"], config["task"]["type"], config["task"]["index"]
    except (ValueError, KeyError, TypeError):
        raise ParameterError("TF_CONFIG is not TensorFlow's cluster description: give JSON with 'cluster' "
                             "(e.g. {\"worker\": [\"node1:7000\", \"node2:7000\"]}) and 'task' "
                             "({\"type\": \"worker\", \"index\": 0}).") from None


def tf_config_workers(environ=os.environ):
    """The number of tasks of the cluster that ``TF_CONFIG`` describes (0 without one).

    Examples
    --------
    >>> tf_config_workers({"TF_CONFIG": '{"cluster": {"worker": ["a:1", "b:1"]}, '
    ...                                 '"task": {"type": "worker", "index": 0}}'})
    2
    """
    try:
        cluster = json.loads(environ.get("TF_CONFIG", "{}")).get("cluster", {})
        return sum(len(tasks) for kind, tasks in cluster.items() if kind in ("chief", "worker"))
    except (ValueError, AttributeError, TypeError):
        return 0


def is_chief(strategy):
    """Whether this process writes the outputs of a data-parallel fit: the ``chief``
    task, or worker 0 of a cluster without one (always, without a multi-worker strategy).

    Examples
    --------
    >>> import tensorflow as tf
    >>> is_chief(tf.distribute.get_strategy())
    True
    """
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    if resolver.task_type == "chief":
        return True
    return resolver.task_type == "worker" and resolver.task_id == 0 and "chief" not in resolver.cluster_spec().jobs


def active_strategy():
    """The multi-worker strategy whose scope the caller is in, or None: fits outside
    such a scope train in this process alone."""
    if not tf.distribute.has_strategy():
        return None
    strategy = tf.distribute.get_strategy()
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or strategy.num_replicas_in_sync < 2:
        return None
    if len(strategy.extended.worker_devices) != 1:
        raise ParameterError("a data-parallel fit runs one replica per worker process; this strategy has "
                             f"{len(strategy.extended.worker_devices)} on this worker.")
    return strategy


def check_workers(strategy, params, observations, seed):
    """Raise on every worker at once unless all hold the same data and seed, before the
    model is built: workers that read different data would otherwise build variables of
    different shapes and wait for each other forever, or fit nonsense.

    ``random_state`` must be an integer, the same on every worker, so that the workers
    deal out the images and split the data alike.
    """
    if not isinstance(params.random_state, Integral):
        raise ParameterError(f"random_state={params.random_state!r}: a data-parallel fit needs an integer "
                             "random_state, the same on every worker, so that the workers share out the images "
                             "and start the same way.")
    _check_same(strategy, {"observations": len(observations.intensity), "rows": len(observations.rows),
                           "images": len(np.unique(observations.image_id)), "fit seed": seed})


def data_parallel_trainer(strategy, params, model, variables, data, state, seed, options):
    """A :class:`DataParallelTrainer` on this worker's share of the images of ``data``
    (after :func:`check_workers`).

    ``options`` are the :class:`~skmerge.model.training.Trainer`'s keyword arguments.
    The images are dealt out at random, seeded by the fit's seed; with ``batch_size``
    each worker draws its share of the batch from its images in every step.
    """
    n_workers = strategy.num_replicas_in_sync
    worker = _replica_id(strategy)
    n_images = len(state.image_ids)
    if n_images < n_workers:
        raise ParameterError(f"the data hold {n_images} image(s): a data-parallel fit over {n_workers} workers "
                             "needs at least one image per worker.")
    batch_size = params.batch_size
    if batch_size is not None and batch_size < n_workers:
        raise ParameterError(f"batch_size={batch_size}: a data-parallel fit over {n_workers} workers draws at "
                             "least one image per worker in every step; give at least that many.")
    images = np.sort(np.random.default_rng(seed).permutation(n_images)[worker::n_workers])
    share = _shard(data, images, state.reflection_counts, n_workers)
    if batch_size is not None and batch_size < n_images:
        own_batch = min(batch_size // n_workers + (worker < batch_size % n_workers), len(images))
        share = ImageBatches(share.data, share.image, share.n_rows_per_reflection, own_batch, spot=share.spot,
                             n_total=share.n_total, global_kl_share=share.global_kl_share)
    else:
        share = model.prepared(share.full_batch())
    # Each worker draws its own Monte Carlo samples, as independent as the
    # single-process fit's samples of different images.
    worker_seed = int(np.random.SeedSequence([seed, worker]).generate_state(1)[0] % 2**31)
    return DataParallelTrainer(strategy, model, variables, share, seed=worker_seed, **options)


class _Shard:
    """The rows and observations of some images: the data dict, the images' numbers
    0 … k−1 by row, each row's number of rows of its reflection in all the data, the
    rows' observations (Laue spots), the number of observations of all shards and the
    share of the scale model's global KL this shard's loss carries (1 / shards)."""

    def __init__(self, data, image, n_rows_per_reflection, spot, n_total, global_kl_share):
        self.data, self.image, self.n_rows_per_reflection = data, image, n_rows_per_reflection
        self.spot, self.n_total, self.global_kl_share = spot, n_total, global_kl_share

    def full_batch(self):
        """The data with weights: every observation of the shard in every step, the KL of
        each reflection shared out over its rows, so that the shards' losses add up to
        the full-data loss."""
        n_obs = int(self.data["intensity"].shape[0])
        return dict(self.data, weight=tf.ones([n_obs]), kl_weight=tf.constant(1.0 / self.n_rows_per_reflection,
                                                                               tf.float32),
                    n_total=tf.constant(self.n_total, tf.float32),
                    global_kl_share=tf.constant(self.global_kl_share, tf.float32))


def _shard(data, images, reflection_counts, n_shards):
    image = data["image"].numpy()
    rows = np.flatnonzero(np.isin(image, images))
    spot = data["spot"].numpy()[rows] if "spot" in data else None
    observations = rows if spot is None else np.unique(spot)
    share = {key: tf.gather(value, observations if key in ("intensity", "sigma") else rows)
             for key, value in data.items() if key != "spot"}
    if spot is not None:
        spot = np.searchsorted(observations, spot)
        share["spot"] = tf.constant(spot, tf.int32)
    counts = reflection_counts[data["refl"].numpy()[rows]]
    return _Shard(share, np.searchsorted(images, image[rows]), counts, spot, float(data["intensity"].shape[0]),
                  1.0 / n_shards)


def _replica_id(strategy):
    """This worker's number among the strategy's replicas (0 … n−1)."""
    ids = strategy.run(lambda: tf.constant(tf.distribute.get_replica_context().replica_id_in_sync_group))
    return int(strategy.experimental_local_results(ids)[0])


def _check_same(strategy, values):
    """InputError, raised on every worker at once, unless all workers hold the same
    ``values`` (named numbers)."""
    local = tf.constant([list(values.values())], tf.int64)
    every = strategy.gather(strategy.run(lambda: tf.identity(local)), axis=0).numpy()
    differ = [name for name, column in zip(values, every.T) if len(set(column)) > 1]
    if differ:
        raise InputError("the workers of the data-parallel fit disagree on " + ", ".join(
            f"the number of {name} ({', '.join(str(v) for v in column)})" if name != "fit seed" else
            f"the {name}" for name, column in zip(values, every.T) if name in differ)
            + ": give every worker the same files, options and random_state.")


def _agreed(strategy, function):
    """``function`` (of no arguments, returning a number) evaluated on every worker, with
    the chief's value returned on all of them, so that decisions taken on it (early
    stopping) are the same everywhere."""
    chief = is_chief(strategy)

    def evaluate():
        value = float(function())
        shared = strategy.run(lambda: tf.constant(value if chief else 0.0, tf.float64))
        return float(strategy.reduce(tf.distribute.ReduceOp.SUM, shared, axis=None))

    return evaluate


def replicated_trainer(model, variables, data, **options):
    """A trainer for data that every worker holds whole (``options`` are the
    :class:`~skmerge.model.training.Trainer`'s): inside a multi-worker strategy's scope
    a :class:`DataParallelTrainer` that averages the workers' equal gradients, which
    keeps the mirrored variables equal; else a plain Trainer."""
    strategy = active_strategy()
    if strategy is None:
        return Trainer(model, variables, data, **options)
    return DataParallelTrainer(strategy, model, variables, data, reduce=tf.distribute.ReduceOp.MEAN, **options)


class DataParallelTrainer(Trainer):
    """A :class:`~skmerge.model.training.Trainer` whose steps run on every worker of a
    multi-worker strategy: the loss terms and gradients of each worker's data are
    combined over the workers by ``reduce`` (summed, when each worker holds a share of
    the data) before the update.

    The chunk of steps runs as a TensorFlow graph: XLA cannot compile the collective
    all-reduce on CPUs, so ``jit_compile`` compiles the gradient of each worker's share
    alone.
    """

    def __init__(self, strategy, model, variables, data, *, jit_compile=True, reduce=tf.distribute.ReduceOp.SUM,
                 **options):
        super().__init__(model, variables, data, jit_compile=False, **options)
        self.strategy, self.reduce = strategy, reduce
        self._jit_compile = jit_compile
        own_gradients = super()._gradients
        self._own_gradients = tf.function(own_gradients, jit_compile=True) if jit_compile else own_gradients

    def _gradients(self, seed):
        terms, grads = self._own_gradients(seed)
        return tf.distribute.get_replica_context().all_reduce(self.reduce, (terms, grads))

    def _step(self):
        taken = self.strategy.run(super()._step)
        return tf.nest.map_structure(lambda value: self.strategy.experimental_local_results(value)[0], taken)

    def run(self, max_iter, *, monitor=None, **options):
        return super().run(max_iter, monitor=None if monitor is None else _agreed(self.strategy, monitor),
                           **options)
