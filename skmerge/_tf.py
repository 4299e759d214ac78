"""Import TensorFlow and TensorFlow-Probability without their start-up chatter.

TensorFlow prints CUDA/cuDNN registration errors and oneDNN notices to the process's
standard error from C++ before Python logging is configured, so setting the log level is
not enough: the file descriptor itself is redirected while the import runs. Import errors
are still raised normally, with the captured text attached.
"""

import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")


def _quiet_import():
    if "tensorflow" in sys.modules:
        import tensorflow
        import tensorflow_probability

        return tensorflow, tensorflow_probability
    sys.stderr.flush()
    saved_fd = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow
            import tensorflow_probability

            # The first XLA compilation logs through absl before logging is set up;
            # trigger it while standard error is still captured.
            tensorflow.function(lambda x: x + 1, jit_compile=True)(tensorflow.constant(0.0))
        except Exception as exc:
            os.dup2(saved_fd, 2)
            captured.seek(0)
            detail = captured.read().decode(errors="replace").strip()
            raise ImportError(
                f"could not import TensorFlow/TensorFlow-Probability: {exc}\n{detail}"
            ) from exc
        finally:
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
    tensorflow.get_logger().setLevel("ERROR")
    return tensorflow, tensorflow_probability


tf, tfp = _quiet_import()
tfd = tfp.distributions
tfb = tfp.bijectors
