"""Data-parallel training on tf.distribute: two worker processes on localhost merge as
one process does.

The workers are subprocesses (a multi-worker strategy must be created before TensorFlow
runs anything, which in the test process it already has); each starts TensorFlow, so
the test takes tens of seconds. ``-m 'not distributed'`` deselects it.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from skmerge import VariationalMerger
from skmerge.cli import main
from skmerge.datasets import make_unmerged
from skmerge.errors import ParameterError
from skmerge.model.distributed import active_strategy, is_chief, local_workers, parse_workers, tf_config_workers

ROOT = Path(__file__).resolve().parents[1]
DATA = {"n_images": 24, "random_state": 0}
PARAMS = {"max_iter": 200, "n_iter_no_change": 1000, "mlp_layers": 2, "mlp_width": 8, "random_state": 0}
TIMEOUT = 240

# The worker leaves with os._exit: TensorFlow's coordination service holds a worker that
# exits normally for seconds, which the test need not wait for.
WORKER = """
import json, os, sys
import numpy as np
from skmerge.model.distributed import is_chief, multi_worker_strategy

workers, index, data, params, out = sys.argv[1], int(sys.argv[2]), *map(json.loads, sys.argv[3:5]), sys.argv[5]
strategy = multi_worker_strategy(workers, index)
from skmerge import VariationalMerger
from skmerge.datasets import make_unmerged

X, _ = make_unmerged(**data)
with strategy.scope():
    merger = VariationalMerger(**params).fit(X)
weights = merger.posterior_weights_
print("posterior", repr(float(np.sum(weights["loc_raw"]))))
if is_chief(strategy):
    np.savez(out, loss=merger.loss_curve_[:, 0], **weights)
sys.stdout.flush()
os._exit(0)
"""


def _start_workers(tmp_path, params):
    """Start two workers; the processes and the files they would write (the chief's
    only)."""
    workers = local_workers(2)
    # One thread each: the two workers share the machine's cores with the test.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    env.pop("TF_CONFIG", None)
    outs = [tmp_path / f"worker{i}.npz" for i in range(2)]
    processes = [subprocess.Popen([sys.executable, "-c", WORKER, workers, str(i), json.dumps(DATA), json.dumps(params),
                                   str(outs[i])], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for i in range(2)]
    return processes, outs


def _finished(processes):
    """The standard output of each worker once all have exited successfully."""
    try:
        results = [p.communicate(timeout=TIMEOUT) for p in processes]
    finally:
        for p in processes:
            p.kill()
    for p, (_, stderr) in zip(processes, results):
        assert p.returncode == 0, stderr[-3000:]
    return [stdout for stdout, _ in results]


def _locations(posterior_weights):
    return np.logaddexp(0.0, posterior_weights["loc_raw"])  # softplus: the posterior's locations


@pytest.mark.distributed
def test_two_workers_merge_as_one_process(tmp_path):
    processes, outs = _start_workers(tmp_path, PARAMS)
    try:
        # The single-process fit runs while the workers start.
        X, _ = make_unmerged(**DATA)
        single = VariationalMerger(**PARAMS).fit(X)
    finally:
        stdouts = _finished(processes)
    assert outs[0].exists() and not outs[1].exists()  # only the chief writes
    # The mirrored posterior is the same on both workers.
    posteriors = [line for out in stdouts for line in out.splitlines() if line.startswith("posterior")]
    assert len(posteriors) == 2 and posteriors[0] == posteriors[1]
    result = np.load(outs[0])
    assert np.corrcoef(_locations(result), _locations(single.posterior_weights_))[0, 1] > 0.995
    # The summed loss of the workers' shares is the full loss: it starts where the
    # single process's does and falls as far (a fit of a shard alone, or one that does
    # not train, would not).
    loss, loss_single = result["loss"], single.loss_curve_[:, 0]
    assert len(loss) == len(loss_single) == PARAMS["max_iter"]
    drop = loss_single[:10].mean() - loss_single[-50:].mean()
    assert drop > 0
    assert abs(loss[:10].mean() - loss_single[:10].mean()) < 0.1 * drop
    assert abs(loss[-50:].mean() - loss_single[-50:].mean()) < 0.1 * drop


def test_without_a_multi_worker_scope_the_fit_is_local():
    assert active_strategy() is None
    import tensorflow as tf

    assert is_chief(tf.distribute.get_strategy())


@pytest.mark.parametrize("workers, message", [
    ("node1:7000", "at least two"), ("node1:7000,node1:7000", "twice"), ("node1,node2:7000", "host:port"),
    ("node1:0,node2:7000", "host:port"),
])
def test_bad_worker_lists(workers, message):
    with pytest.raises(ParameterError, match=message):
        parse_workers(workers)


def test_tf_config_cluster_size():
    config = {"cluster": {"chief": ["a:1"], "worker": ["b:1", "c:1"]}, "task": {"type": "worker", "index": 0}}
    assert tf_config_workers({"TF_CONFIG": json.dumps(config)}) == 3
    assert tf_config_workers({}) == 0
    assert tf_config_workers({"TF_CONFIG": "not json"}) == 0


@pytest.mark.parametrize("flags, message", [
    (["--worker-index", "0"], "--workers and --worker-index go together"),
    (["--workers", "localhost:7000,localhost:7001"], "--workers and --worker-index go together"),
    (["--workers", "localhost:7000,localhost:7001", "--worker-index", "2"], "0 … 1"),
    (["--workers", "localhost:7000", "--worker-index", "0"], "at least two workers"),
])
def test_bad_worker_flags_exit_2(flags, message, tmp_path, capsys):
    mtz = tmp_path / "missing.mtz"
    assert main(["mono", *flags, "dHKL", str(mtz), str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("laue", [False, True])
def test_shares_of_the_images_add_up_to_the_full_loss(laue):
    """The loss terms of the workers' shares sum to the full-data loss: each reflection's
    KL once, each observation's likelihood once, over the observations of all shares, and
    the image heads' KL once (a third of it on each of three workers)."""
    from skmerge.model.build import build_model
    from skmerge.model.data import encode, laue_band
    from skmerge.model.distributed import _shard
    from skmerge._tf import tf

    X, _ = make_unmerged(n_images=6 if laue else 9, laue=laue, random_state=1)
    merger = VariationalMerger(mlp_layers=2, mc_samples=400, laue=laue, metadata=["dHKL"], image_heads=not laue)
    harmonics = None
    if laue:
        bands, dmin = laue_band(X, "Wavelength", None)
        harmonics = {"wavelength_key": "Wavelength", "wavelength_range": bands, "dmin": dmin}
    observations = encode(X, None, anomalous=False, separate_files=False, harmonics=harmonics)
    model, data, state = build_model(merger, observations, np.random.RandomState(0), harmonics=harmonics)
    seed = tf.constant([3, 4])
    if not laue:  # the image heads' KL, global, is shared out over the workers
        heads = model.scale_network.heads.loc
        heads.assign(np.random.default_rng(2).normal(0, 0.1, heads.shape).astype(np.float32))
        assert float(model.scale_network.heads_kl()) > 0.1
    full = model.loss_terms(data, seed).numpy()
    order = np.random.default_rng(0).permutation(len(state.image_ids))
    shares = [_shard(data, np.sort(order[k::3]), state.reflection_counts, 3).full_batch() for k in range(3)]
    assert sum(int(s["intensity"].shape[0]) for s in shares) == int(data["intensity"].shape[0])
    summed = sum(model.loss_terms(share, seed).numpy() for share in shares)
    np.testing.assert_allclose(summed[2], full[2], rtol=1e-4)  # the KL, for the same samples of F
    np.testing.assert_allclose(summed[1], full[1], rtol=0.02)  # the likelihood, up to the scales' noise
    if not laue:  # a share drawn in image batches carries its third of the heads' KL too
        from skmerge.model.training import ImageBatches

        share = _shard(data, np.sort(order[:3]), state.reflection_counts, 3)
        batches = ImageBatches(share.data, share.image, share.n_rows_per_reflection, 2, n_total=share.n_total,
                               global_kl_share=share.global_kl_share)
        batch = batches.draw(seed)
        with_heads = model.loss_terms(batch, seed).numpy()[2]
        heads_kl = float(model.scale_network.heads_kl())
        heads.assign(np.zeros(heads.shape, np.float32))
        assert float(model.scale_network.heads_kl()) < 1e-3 * heads_kl
        without = model.loss_terms(batch, seed).numpy()[2]
        assert with_heads - without == pytest.approx(heads_kl / 3 / share.n_total, rel=1e-2)
