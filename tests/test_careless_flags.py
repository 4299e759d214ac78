"""careless 0.5.4's flags on ``skmerge mono``/``poly``, scale and structure-factor
transfer, and the layout of the files careless's analysis tools read."""

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import reciprocalspaceship as rs

import skmerge
from skmerge import VariationalMerger
from skmerge.cli import UsageError, build_parser, main, merger_parameters
from skmerge.datasets import make_unmerged
from skmerge._tf import tf
from skmerge.errors import ParameterError
from skmerge.model.training import Trainer
from skmerge.workflow import statistics_from_outputs
from test_cli import TINY, _write_unmerged

HELP = Path(__file__).resolve().parents[1] / "bench" / "careless_help.txt"
KEYS = "dHKL,XDET,YDET"


def _careless_flags(command):
    """Every option string of ``careless COMMAND --help`` in bench/careless_help.txt."""
    text = HELP.read_text()
    section = text.split(f"$ careless {command} --help", 1)[1].split("$ careless ", 1)[0]
    return set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", section))


def _subparser(command):
    parser = build_parser()
    return next(a for a in parser._actions if hasattr(a, "choices") and a.choices and command in a.choices
                ).choices[command]


@pytest.mark.parametrize("command", ["mono", "poly"])
def test_every_careless_flag_is_known(command):
    careless = _careless_flags(command)
    assert {"--scale-file", "--freeze-structure-factors", "--tf-debug", "-c", "-d"} <= careless
    if command == "poly":
        assert {"-w", "--wavelength-key", "-l", "--wavelength-range"} <= careless
    known = set(_subparser(command)._option_string_actions)
    # Flags inside careless's help prose (e.g. "--positional-encoding-" broken by the line
    # wrap) are not flags of its parser.
    missing = sorted(f for f in careless - known if not f.endswith("-"))
    assert missing == []


def test_careless_flags_reach_the_estimator():
    argv = ["mono", "--kl-weight", "0.5", "--beta-1", "0.8", "--beta-2", "0.95", "--clipnorm", "2",
            "--clipvalue", "3", "--global-clipnorm", "4", "--epsilon", "1e-5", "--scale-bijector", "exp",
            "--disable-metadata-standardization", "-L", "2", "--positional-encoding-keys", "XDET, YDET",
            "--wilson-prior-b", "0", "--structure-factor-init-scale", "0.3", "--jit-compile", KEYS, "x.mtz", "out"]
    args = build_parser().parse_args(argv)
    params = merger_parameters(args, KEYS.split(","))
    assert {k: params[k] for k in ("kl_weight", "beta_1", "beta_2", "clipnorm", "clipvalue", "global_clipnorm",
                                   "epsilon", "scale_bijector", "standardize_metadata", "positional_encoding",
                                   "positional_encoding_keys", "posterior_init", "jit_compile")} == {
        "kl_weight": 0.5, "beta_1": 0.8, "beta_2": 0.95, "clipnorm": 2.0, "clipvalue": 3.0, "global_clipnorm": 4.0,
        "epsilon": 1e-5, "scale_bijector": "exp", "standardize_metadata": False, "positional_encoding": 2,
        "positional_encoding_keys": ["XDET", "YDET"], "posterior_init": 0.3, "jit_compile": True}
    assert params["prior"].b_factor == 0
    VariationalMerger(**{k: v for k, v in params.items() if k != "verbose"})._check_params()
    assert params["image_layers"] == "auto"
    for text, layers in (("2", 2), ("0", 0), ("auto", "auto")):
        assert merger_parameters(build_parser().parse_args(["mono", "--image-layers", text, KEYS, "x.mtz", "out"]),
                                 KEYS.split(","))["image_layers"] == layers
    for text in ("-1", "two"):
        with pytest.raises(UsageError, match=f"--image-layers: expected 'auto' or a number of layers.*'{text}'"):
            build_parser().parse_args(["mono", "--image-layers", text, KEYS, "x.mtz", "out"])


@pytest.mark.parametrize("argv, message", [
    (["--freeze-scales"], "--freeze-scales needs --scale-file"),
    (["--freeze-structure-factors"], "--freeze-structure-factors needs --structure-factor-file"),
    (["--scale-file", "nowhere/run"], "--scale-file nowhere/run: found no saved merger"),
    (["--scale-file", "x.mtz"], "an MTZ holds no scale model"),
    (["--validation-frequency", "0"], "--validation-frequency 0"),
    (["--clipnorm", "-1"], "--clipnorm -1"),
])
def test_bad_careless_flags_are_usage_errors(argv, message, tmp_path, capsys):
    assert main(["mono", *argv, KEYS, str(tmp_path / "x.mtz"), str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err


def test_kl_weight_weighs_the_kl_term():
    X, _ = make_unmerged(n_images=6, random_state=0)
    merger = VariationalMerger(mlp_layers=2, max_iter=10, kl_weight=0.0, random_state=0).fit(X)
    loss, nll, kl = merger.loss_curve_.T
    np.testing.assert_allclose(loss, nll, rtol=1e-6)
    assert (kl > 0).all()


def test_gradient_clipping_follows_keras():
    """Each gradient to norm clipnorm, then all to global_clipnorm, then each element to
    ±clipvalue."""
    trainer = Trainer(None, [], {}, learning_rate=0.1, seed=0, jit_compile=False, clipnorm=5.0,
                      global_clipnorm=6.0, clipvalue=4.0)
    first, second = trainer._clipped([tf.constant([6.0, 8.0]), tf.constant([0.0, 10.0])])
    shrink = 6.0 / np.sqrt(50.0)  # the global norm after clipnorm is √(3² + 4² + 5²)
    np.testing.assert_allclose(first.numpy(), [3 * shrink, 4 * shrink], rtol=1e-6)
    np.testing.assert_allclose(second.numpy(), [0.0, 4.0], rtol=1e-6)


def test_adam_betas_change_the_path():
    X, _ = make_unmerged(n_images=6, random_state=0)
    common = dict(mlp_layers=2, max_iter=10, random_state=0)
    default = VariationalMerger(**common).fit(X).loss_curve_[:, 0]
    slow = VariationalMerger(**common, beta_1=0.0, beta_2=0.5).fit(X).loss_curve_[:, 0]
    assert default[0] == slow[0] and not np.allclose(default[1:], slow[1:])


def test_metadata_options_and_scale_bijector_survive_the_safe_format(tmp_path):
    X, _ = make_unmerged(n_images=6, random_state=0)
    merger = VariationalMerger(metadata=["dHKL", "XDET", "YDET"], positional_encoding=2,
                               positional_encoding_keys=["XDET"], standardize_metadata=False,
                               scale_bijector="exp", epsilon=1e-3, mlp_layers=2, max_iter=30, random_state=0).fit(X)
    # dHKL and YDET as one feature each, XDET as 2 frequencies × (sin, cos)
    assert merger.n_metadata_features_ == 6
    loaded = skmerge.load(merger.save(tmp_path / "m.npz"))
    np.testing.assert_array_equal(loaded.predict(X), merger.predict(X))
    assert loaded.posterior().scale.numpy().min() >= 1e-3


@pytest.fixture(scope="module")
def simulated_run(tmp_path_factory):
    """An anomalous run with half datasets and a test set on simulated data."""
    tmp = tmp_path_factory.mktemp("careless_flags")
    X, truth = make_unmerged(n_images=16, random_state=1)
    _write_unmerged(X, tmp / "sim.mtz")
    out = tmp / "first"
    assert main(["mono", "--anomalous", "--merge-half-datasets", "--test-fraction", "0.1", "--validation-frequency",
                 "20", "--quiet", KEYS, str(tmp / "sim.mtz"), str(out), *TINY]) == 0
    return tmp, out


def test_validation_frequency_records_the_test_loss(simulated_run):
    _, out = simulated_run
    history = pd.read_csv(f"{out}_history.csv")
    recorded = history.dropna(subset=["test_loss"])
    assert recorded["step"].tolist() == list(range(20, len(history) + 1, 20))
    merger = skmerge.load(f"{out}.npz")
    np.testing.assert_allclose(merger.held_out_loss_curve_[:, 1], recorded["test_loss"])
    # the held-out observations' nll term: it falls with training, as the training nll does,
    # and ends above it
    test_loss = recorded["test_loss"].to_numpy()
    train_nll = history["nll"].to_numpy()[recorded["step"].to_numpy() - 1]
    assert test_loss[-1] < test_loss[0] and (test_loss[-3:] > train_nll[-3:]).all()


def _f(path):
    return rs.read_mtz(str(path))["F"]


def _cc(a, b):
    both = pd.concat([pd.Series(np.asarray(x, float), index=x.index) for x in (a, b)], axis=1, join="inner")
    return np.corrcoef(both[0], both[1])[0, 1]


def test_frozen_scale_file_reproduces_the_merge(simulated_run):
    tmp, first = simulated_run
    out = tmp / "scaled"
    assert main(["mono", "--anomalous", "--scale-file", f"{first}_scale", "--freeze-scales", "--quiet", KEYS,
                 str(tmp / "sim.mtz"), str(out), "--iterations", "100"]) == 0
    before, after = skmerge.load(f"{first}.npz"), skmerge.load(f"{out}.npz")
    # careless's _scale naming found the run; its small network came with it
    assert after.mlp_layers == 2 and after.freeze == "scales"
    for old, new in zip(before.scale_weights_, after.scale_weights_):
        np.testing.assert_array_equal(old, new)
    assert _cc(_f(f"{first}_0.mtz"), _f(f"{out}_0.mtz")) > 0.99


def test_frozen_structure_factors_from_a_merged_mtz(simulated_run):
    tmp, first = simulated_run
    out = tmp / "from_mtz"
    assert main(["mono", "--anomalous", "--structure-factor-file", f"{first}_0.mtz", "--freeze-structure-factors",
                 "--quiet", KEYS, str(tmp / "sim.mtz"), str(out), *TINY]) == 0
    merged, start = rs.read_mtz(f"{out}_0.mtz"), rs.read_mtz(f"{first}_0.mtz")
    assert _cc(start["F"], merged["F"]) > 0.999
    assert _cc(start["F(+)"].dropna(), merged["F(+)"].dropna()) > 0.999
    # the MTZ is kept as a path, so the merger is saved in the safe format too
    assert skmerge.load(f"{out}.npz").posterior_init == Path(f"{first}_0.mtz")


def test_structure_factors_from_a_saved_merger_file(simulated_run):
    tmp, first = simulated_run
    X = skmerge.read_unmerged(str(tmp / "sim.mtz"), anomalous=True)
    source = skmerge.load(f"{first}.npz")
    merger = VariationalMerger(posterior_init=source.transform(X), freeze="posterior", anomalous=True,
                               metadata=KEYS.split(","), mlp_layers=2, max_iter=30, random_state=0).fit(X)
    assert _cc(source.transform(X)["F"], merger.transform(X)["F"]) > 0.999
    with pytest.raises(ParameterError, match="freeze='scales' needs warm_start"):
        VariationalMerger(freeze="scales", posterior_init=source.transform(X)).fit(X)


def test_warm_start_with_another_network_is_refused(simulated_run):
    tmp, first = simulated_run
    X = skmerge.read_unmerged(str(tmp / "sim.mtz"), anomalous=True)
    merger = skmerge.load(f"{first}.npz").set_params(warm_start="scales", mlp_layers=3)
    with pytest.raises(ParameterError, match="mlp_layers=2, mlp_width=8"):
        merger.fit(X)
    merger.set_params(mlp_layers=2, metadata=["dHKL"])
    with pytest.raises(ParameterError, match="reads the metadata"):
        merger.fit(X)


def test_analysis_files_read_as_careless_tools_read_them(simulated_run):
    """careless.cchalf stacks the Friedel halves of OUT_xval_0.mtz and wants F, SigF, I,
    SigI; careless.ccanom wants N(±) and SigF(±); careless.ccpred Iobs, SigIobs, Ipred and
    test. The merged file keeps the CCP4 names."""
    _, out = simulated_run
    xval = rs.read_mtz(f"{out}_xval_0.mtz").rename(columns={"SIGI": "SigI", "SIGF": "SigF"})
    halves = [xval.loc[xval.half == h].copy().stack_anomalous() for h in (0, 1)]
    pairs = halves[0][["F", "SigF", "I", "SigI", "repeat"]].merge(
        halves[1][["F", "SigF", "I", "SigI", "repeat"]], on=["H", "K", "L", "repeat"], suffixes=("1", "2"))
    assert len(pairs.dropna()) > 100
    assert {"N(+)", "N(-)", "SigF(+)", "SigF(-)", "F(+)", "F(-)", "repeat", "half"} <= set(xval.columns)
    predictions = rs.read_mtz(f"{out}_predictions_0.mtz")
    assert {"Iobs", "SigIobs", "Ipred", "SigIpred", "test"} <= set(predictions.columns)
    merged = rs.read_mtz(f"{out}_0.mtz")
    assert {"F", "SIGF", "F(+)", "SIGF(+)", "DANO", "SIGDANO"} <= set(merged.columns)
    # skmerge's own statistics read the careless layout back as the run computed them
    statistics, _ = statistics_from_outputs(out)
    overall = json.loads(Path(f"{out}_stats.json").read_text())["datasets"][0]["shells"][-1]
    for name in ("cc_half", "cc_pred", "completeness", "anom_completeness"):
        assert statistics[0].table.loc["overall", name] == pytest.approx(overall[name], rel=1e-4)


@pytest.mark.realdata
def test_hypf_scales_frozen_reproduce_the_merge(data_dir, tmp_path):
    """Scales learned on hypf, saved, frozen, and the posterior refitted on the same
    images give the first merge back, as ``--scale-file --freeze-scales`` does.

    The refit starts from the first fit's posterior (the same observations); both fits
    are short here, so the refit still moves it (bench/RESULTS.md has the full fits)."""
    X = skmerge.read_unmerged(str(data_dir / "hypf_hg_sad" / "hypf_unmerged.mtz"), anomalous=True, dmin=3.0)
    first = VariationalMerger(metadata=["dHKL", "Hobs", "Kobs", "Lobs", "XDET", "YDET", "BATCH"], anomalous=True,
                              mlp_layers=4, max_iter=300, random_state=0).fit(X)
    again = skmerge.load(first.save(tmp_path / "hypf.npz")).set_params(warm_start="scales", freeze="scales").fit(X)
    for old, new in zip(first.scale_weights_, again.scale_weights_):
        np.testing.assert_array_equal(old, new)
    assert _cc(first.transform(X)["F"], again.transform(X)["F"]) > 0.985
    # the refit under the first fit's scales fits the data at least as well
    assert again.loss_curve_[-1, 0] <= first.loss_curve_[-1, 0]


def test_image_layers_change_the_model_fit_and_persist(tmp_path):
    """careless's --image-layers: per-image residual layers after the shared network,
    which start as the identity (same first loss) and then let each image's scales bend
    on their own; saved and loaded, and warm-started on a subset of the images."""
    X, _ = make_unmerged(n_images=6, random_state=0)
    common = dict(metadata=["dHKL", "XDET", "YDET"], mlp_layers=2, mlp_width=6, max_iter=80, random_state=0)
    plain = VariationalMerger(**common).fit(X)
    layered = VariationalMerger(**common, image_layers=2).fit(X)
    assert [w.shape for w in layered.scale_weights_[-5:-1]] == [(6, 6, 6), (6, 6, 6), (6, 6), (6, 6)]
    assert layered.loss_curve_[0, 0] == pytest.approx(plain.loss_curve_[0, 0], rel=1e-5)
    assert np.abs(layered.scale_weights_[-5]).max() > 1e-3, "the per-image kernels were trained"
    assert not np.allclose(layered.predict(X), plain.predict(X), rtol=1e-3)
    assert np.isfinite(layered.loss_curve_).all() and layered.loss_curve_[-1, 0] < layered.loss_curve_[0, 0]
    loaded = skmerge.load(layered.save(tmp_path / "m.npz"))
    assert loaded.image_layers == 2
    np.testing.assert_array_equal(loaded.predict(X), layered.predict(X))
    # An image the fit never saw gets the mean image's layers (and offset).
    unseen = X[X["image_id"] == 0].copy()
    unseen["image_id"] = 99
    assert np.isfinite(layered.predict(unseen)).all()
    layered.set_params(warm_start=True, max_iter=5).fit(X[X["image_id"] < 4])
    assert layered.scale_weights_[-5].shape == (4, 6, 6)


def test_a_full_batch_fit_lays_its_rows_out_for_the_image_layers_once(monkeypatch):
    """A full-batch fit hands its trainer data that hold the image layers' layout of
    its rows (made in every step, it cost 6 % of a thermolysin step); a minibatch fit's
    batches, whose rows change, make theirs in the step."""
    from skmerge.model import training

    started = []
    init = training.Trainer.__init__

    def recording(trainer, model, variables, data, **options):
        started.append((model, data))
        init(trainer, model, variables, data, **options)

    monkeypatch.setattr(training.Trainer, "__init__", recording)
    X, _ = make_unmerged(n_images=6, random_state=0)
    common = dict(metadata=["dHKL", "XDET", "YDET"], mlp_layers=2, mlp_width=6, max_iter=5, random_state=0,
                  image_layers=1)
    VariationalMerger(**common).fit(X)
    model, data = started[-1]
    for made, expected in zip(data["image_blocks"], model.scale_network.image_blocks(data["image"])):
        np.testing.assert_array_equal(np.asarray(made), np.asarray(expected))
    VariationalMerger(**common, batch_size=2).fit(X)
    assert isinstance(started[-1][1], training.ImageBatches)


def test_image_heads_fit_persist_and_serve_unseen_images(tmp_path):
    """Per-image heads: trained weights of each image on the last hidden layer, saved and
    loaded, a head from their prior for an image the fit never saw (scales less certain
    than a seen image's), and warm-started on a subset of the images."""
    X, _ = make_unmerged(n_images=6, random_state=0)
    common = dict(metadata=["dHKL", "XDET", "YDET"], mlp_layers=2, mlp_width=6, max_iter=80, random_state=0)
    headed = VariationalMerger(**common, image_heads=True).fit(X)
    loc, raw_scale = headed.scale_weights_[-3:-1]
    assert loc.shape == raw_scale.shape == (6, 3)
    assert np.abs(loc).max() > 1e-4, "the heads were trained (they start at zero)"
    assert np.isfinite(headed.loss_curve_).all() and headed.loss_curve_[-1, 0] < headed.loss_curve_[0, 0]
    loaded = skmerge.load(headed.save(tmp_path / "m.npz"))
    assert loaded.image_heads
    np.testing.assert_array_equal(loaded.predict(X), headed.predict(X))
    seen = X[X["image_id"] == 0].copy()
    unseen = seen.assign(image_id=99)
    (_, scale_seen, sd_seen), (_, scale_unseen, sd_unseen) = (headed.predict(x, return_scale=True)
                                                              for x in (seen, unseen))
    assert np.isfinite(sd_unseen).all()
    assert np.median(sd_unseen / scale_unseen) > np.median(sd_seen / scale_seen)
    headed.set_params(warm_start=True, max_iter=5).fit(X[X["image_id"] < 4])
    assert headed.scale_weights_[-3].shape == (4, 3)


@pytest.mark.parametrize("params, message", [
    (dict(image_layers=-1), "image_layers"),
    (dict(image_layers="sometimes"), "image_layers"),
    (dict(image_layers=1, image_model="encoder"), "image encoder has none"),
    (dict(image_heads=True, image_model="encoder"), "image_heads=True gives"),
    (dict(image_heads=1.5), "image_heads"),
    (dict(image_heads="sometimes"), "image_heads"),
])
def test_bad_image_layers(params, message):
    X, _ = make_unmerged(n_images=3, random_state=0)
    with pytest.raises(ParameterError, match=message):
        VariationalMerger(max_iter=1, **params).fit(X)


def test_laue_flags_added_after_careless_054(tmp_path, capsys):
    spectrum = tmp_path / "spectrum.txt"
    spectrum.write_text("1.2 1.0\n1.0 0.5\n")
    argv = ["poly", "--spectral-file", str(spectrum), "--lorentz-correction", KEYS, "x.mtz", "out"]
    params = merger_parameters(build_parser().parse_args(argv), KEYS.split(","))
    assert params["lorentz_correction"] is True
    np.testing.assert_array_equal(params["spectrum"], [[1.0, 0.5], [1.2, 1.0]])
    plain = merger_parameters(build_parser().parse_args(["poly", KEYS, "x.mtz", "out"]), KEYS.split(","))
    assert plain["lorentz_correction"] is False and "spectrum" not in plain
    spectrum.write_text("1.0 0.5\n")
    assert main(["poly", "--spectral-file", str(spectrum), KEYS, str(tmp_path / "x.mtz"), str(tmp_path / "o")]) == 2
    assert f"spectral file {spectrum}: give at least two rows" in capsys.readouterr().err
    with pytest.raises(UsageError, match="unrecognized arguments: --lorentz-correction"):
        build_parser().parse_args(["mono", "--lorentz-correction", KEYS, "x.mtz", "out"])


def test_a_scales_only_warm_start_on_the_same_observations_keeps_the_posterior(tmp_path):
    """warm_start="scales" starts the amplitudes from the data, except on the very
    observations of the previous fit, whose posterior answers the same question."""
    X, _ = make_unmerged(n_images=6, random_state=0)
    first = VariationalMerger(mlp_layers=2, max_iter=40, random_state=0).fit(X)
    path = first.save(tmp_path / "first.npz")
    refit = dict(warm_start="scales", freeze="scales", max_iter=1)
    same = skmerge.load(path).set_params(**refit).fit(X)
    np.testing.assert_allclose(same.posterior_weights_["loc_raw"], first.posterior_weights_["loc_raw"], atol=1e-3)
    other = skmerge.load(path).set_params(**refit).fit(X[X["image_id"] > 0])
    seen = np.isin(first.reflections_.keys, other.reflections_.keys)
    change = np.abs(other.posterior_weights_["loc_raw"] - first.posterior_weights_["loc_raw"][seen])
    assert np.median(change) > 1e-2, "started from the data, not from the other fit's posterior"
