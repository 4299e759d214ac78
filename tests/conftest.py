"""Shared fixtures: real data under ../shared/data and small simulated data sets."""

import os
import signal
from pathlib import Path

import joblib
import pytest

# Each xdist worker gets its share of the cores before anything imports TensorFlow, which
# skmerge then limits to OMP_NUM_THREADS: without it every worker's TensorFlow starts a
# thread per core, and on a 2-core machine the two workers' fits run about 10 % slower for
# the contention. (numpy's BLAS is loaded by pytest's plugins before this file, so it keeps
# its threads.) The share is of joblib's count, as joblib gives its own workers: it sees a
# container's CPU quota. Left alone when the variable is set already.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    os.environ.setdefault(
        "OMP_NUM_THREADS", str(max(1, joblib.cpu_count() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    if DATA.is_dir():
        return
    skip = pytest.mark.skip(reason=f"real data folder {DATA} is missing (see ../shared/data/README.md)")
    for item in items:
        if "realdata" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def data_dir():
    return DATA


@pytest.fixture
def interruptible():
    """Ctrl-C as an interactive run gets it: SIGINT raises KeyboardInterrupt. A shell starts
    background jobs with SIGINT ignored, and the test processes inherit that when the suite
    itself runs in the background."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)
