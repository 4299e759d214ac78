"""Signals during a run: SIGTERM unwinds like SIGINT, and both wait while a run's files
are moved into place (a light module: the command line imports it before anything
heavy)."""

import contextlib
import signal


@contextlib.contextmanager
def interrupt_on_sigterm():
    """Within the block SIGTERM raises KeyboardInterrupt, as SIGINT does, so that a run
    stopped either way unwinds its ``finally`` blocks (the staging directory of
    :func:`skmerge.io.writers.output_set` goes, the earlier outputs stay). Outside the main thread, where
    handlers cannot be set, nothing changes."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def signals_held():
    """Defer SIGINT and SIGTERM (where the platform can) until the block is done."""
    held = {signal.SIGINT, signal.SIGTERM}
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
