"""Import TensorFlow and TensorFlow-Probability without their start-up chatter.

TensorFlow prints CUDA/cuDNN registration errors and oneDNN notices to the process's
standard error from C++ before Python logging is configured, so setting the log level is
not enough: the file descriptor itself is redirected while the import runs. Import errors
are still raised normally, with the captured text attached.

Thread limits. A process that has been told how many threads to use keeps TensorFlow to
that number too: ``OMP_NUM_THREADS`` — which joblib's loky workers receive (``cpu_count
// n_jobs`` by default, see ``inner_max_num_threads``), which dask's nanny sets to 1 in
its workers, and which batch schedulers and users set — becomes TensorFlow's intra-op and
inter-op thread count, unless ``TF_NUM_INTRAOP_THREADS`` / ``TF_NUM_INTEROP_THREADS`` are
set explicitly (they win). Without any of these TensorFlow uses every core, as before.
Parallel model searches therefore do not oversubscribe the cores.
"""

import contextlib
import os
import sys
import tempfile

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# oneDNN's kernels run the scale network's (10, 10) @ (10, rows) products about twice as
# fast as the default ones on CPUs with AVX-512 (hypf: 37 → 25 ms per training step).
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

_THREAD_VARIABLES = ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS")


def _thread_limit(environ=os.environ):
    """TensorFlow's thread counts (intra-op, inter-op) for this process, or None to leave
    TensorFlow's defaults: explicit ``TF_NUM_*_THREADS`` first, else ``OMP_NUM_THREADS``."""
    def positive(name):
        try:
            value = int(str(environ.get(name, "")).strip())
        except ValueError:
            return None
        return value if value > 0 else None

    limit = positive("OMP_NUM_THREADS")
    intra = positive("TF_NUM_INTRAOP_THREADS") or limit
    inter = positive("TF_NUM_INTEROP_THREADS") or limit
    if intra is None and inter is None:
        return None
    return intra, inter


def _apply_thread_limit(tensorflow, limit):
    """Tell TensorFlow the thread counts before its runtime starts (a no-op when
    something else has already started it).

    The limits are set through the API only, not also by writing ``TF_NUM_*_THREADS``
    into the environment: the runtime builds its thread pools from the context's
    configuration, which falls back to those variables only when the count is 0, so the
    API alone reaches every pool; it also works when TensorFlow was imported (but not
    started) before skmerge, reports what applies through ``thread_settings``, and does
    not leak into the environment of child processes.
    """
    if limit is None:
        return
    intra, inter = limit
    threading = tensorflow.config.threading
    try:
        # A count already configured in this process (non-zero) is left alone.
        if intra and not threading.get_intra_op_parallelism_threads():
            threading.set_intra_op_parallelism_threads(intra)
        if inter and not threading.get_inter_op_parallelism_threads():
            threading.set_inter_op_parallelism_threads(inter)
    except RuntimeError:
        pass  # TensorFlow was initialised before skmerge imported it: keep its settings.


def thread_settings():
    """This process's thread-limiting environment variables and the (intra-op, inter-op)
    thread counts TensorFlow was configured with (0: TensorFlow's default, one per core).
    Handy to check what a joblib or dask worker is running with."""
    names = ("OMP_NUM_THREADS", *_THREAD_VARIABLES)
    environment = {name: os.environ[name] for name in names if name in os.environ}
    threading = tf.config.threading
    return environment, (threading.get_intra_op_parallelism_threads(), threading.get_inter_op_parallelism_threads())


@contextlib.contextmanager
def quiet_stderr():
    """Capture what C++ code writes to the process's standard error while the block
    runs; if the block raises, the captured text is added to the exception's notes.

    TensorFlow's import and the first XLA compilation of a process log through absl
    before Python logging is set up, so only redirecting the file descriptor hides them.
    """
    sys.stderr.flush()
    saved_fd = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        except Exception as exc:
            captured.seek(0)
            detail = captured.read().decode(errors="replace").strip()
            if detail:
                exc.add_note(detail)
            raise
        finally:
            os.dup2(saved_fd, 2)
            os.close(saved_fd)


@contextlib.contextmanager
def without_graph_rewrites():
    """Instantiate the compiled functions called in the block without Grappler's graph
    rewrites, and leave the process's setting as it was afterwards.

    The training step is written op by op as it should run: Grappler's passes over it (and
    over the bodies of its loops) cost a small fit up to a third of its time and leave the
    time per step as it was on rotation, stills and Laue data (bench/RESULTS.md). The
    setting is part of every call's configuration, and a function called under another
    one is instantiated again (with the rewrites, and their rounding): so every call of
    the step, not only the first, goes through this block.
    """
    options = tf.config.optimizer
    previous = options.get_experimental_options().get("disable_meta_optimizer", False)
    options.set_experimental_options({"disable_meta_optimizer": True})
    try:
        yield
    finally:
        options.set_experimental_options({"disable_meta_optimizer": previous})


def _quiet_import():
    limit = _thread_limit()
    if "tensorflow" in sys.modules:
        import tensorflow
        import tensorflow_probability

        _apply_thread_limit(tensorflow, limit)
        return tensorflow, tensorflow_probability
    try:
        with quiet_stderr():
            import tensorflow
            import tensorflow_probability

            _apply_thread_limit(tensorflow, limit)
    except Exception as exc:
        detail = "\n".join(getattr(exc, "__notes__", ()))
        raise ImportError(f"could not import TensorFlow/TensorFlow-Probability: {exc}\n{detail}") from exc
    tensorflow.get_logger().setLevel("ERROR")
    return tensorflow, tensorflow_probability


tf, tfp = _quiet_import()
tfd = tfp.distributions
tfb = tfp.bijectors


def concat_flat(tensors):
    """The tensors' elements end to end in one vector (a graph op or two for a whole list,
    where an op per tensor would grow a traced graph with the number of tensors)."""
    return tf.concat([tf.reshape(t, [-1]) for t in tensors], 0)


def split_like(vector, like):
    """:func:`concat_flat` undone: ``vector`` cut into tensors of the shapes of ``like``."""
    pieces = tf.split(vector, [int(np.prod(t.shape)) for t in like])
    return [tf.reshape(piece, t.shape) for piece, t in zip(pieces, like)]
