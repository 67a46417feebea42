"""The reliability promises (README, "Reliability"): user paths are never destroyed, inputs are
converted without loss or refused, training state is honest, predictions are never silently
wrong. Each test failed on the code before them."""

import json
import os
import tempfile
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from ray_ensembles import DeepEnsemble, DeepEnsembleClassifier, TensorDataset, Trainer
from ray_ensembles.loop import checkpoint
from ray_ensembles.io import storage
from ray_ensembles import sweep
from ray_ensembles.model import selection
from ray_ensembles.loop.data import read_table, table_to_dataset
from ray_ensembles.model.ensemble import load_ensemble
from ray_ensembles.io.manifest import FORMAT_VERSION
from ray_ensembles.model.metrics import calibration_curve, crps_gaussian, miscalibration_area
from ray_ensembles.loop.training import EnsembleFit

G = torch.Generator().manual_seed(0)
X = torch.rand(200, 2, generator=G) * 8 - 4
Y = X[:, :1] ** 3 / 10 + X[:, 1:].sin() + 0.3 * torch.randn(200, 1, generator=G)


def small(**kwargs):
    return DeepEnsemble(dim_in=2, num_members=2, hidden_dim=16, **kwargs)


def train(e, tmp_path, X=X, Y=Y, **kwargs):
    trainer = Trainer(e, TensorDataset(X, Y), results_folder=tmp_path, **{"train_num_steps": 40, **kwargs})
    trainer.train()
    return trainer


# A. a path the user gives is never destroyed ------------------------------------------------------

@pytest.mark.unit
def test_save_refuses_a_folder_or_file_that_is_not_an_ensemble_and_replaces_a_previous_one(tmp_path):
    e = small()
    results = tmp_path / "results"
    (results / "checkpoint-1").mkdir(parents=True)
    (results / "notes.txt").write_text("mine")
    (tmp_path / "file").write_text("mine")
    for path in (results, tmp_path / "file"):
        with pytest.raises(ValueError, match="Refusing to write an ensemble"):
            e.save(path)
    assert (results / "notes.txt").read_text() == "mine" and (tmp_path / "file").read_text() == "mine"
    e.save(tmp_path / "ens")
    small(seed=1).save(tmp_path / "ens")  # a previous ensemble is replaced, leaving nothing behind
    assert DeepEnsemble.load(tmp_path / "ens").seed == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ens", "file", "results"]
    (tmp_path / "empty").mkdir()
    e.save(tmp_path / "empty")


@pytest.mark.unit
@pytest.mark.parametrize("path", [".", "..", ""])
def test_save_to_the_working_directory_or_a_parent_is_a_clear_error(tmp_path, monkeypatch, path):
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    with pytest.raises(ValueError, match="Refusing to write an ensemble.*which would be replaced"):
        small().save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd"]


@pytest.mark.unit
def test_saved_ensembles_and_checkpoints_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        trainer = train(small(), tmp_path / "r", train_num_steps=5)
        trainer.ensemble.save(tmp_path / "ens")
    finally:
        os.umask(old)
    for folder in (tmp_path / "ens", trainer.checkpoint_path):
        assert folder.stat().st_mode & 0o777 == 0o755
        assert {p.stat().st_mode & 0o777 for p in folder.iterdir()} == {0o644}


# B. inputs are converted without loss, or refused ---------------------------------------------

@pytest.mark.unit
def test_float64_features_and_targets_are_standardised_before_the_cast(tmp_path):
    g = torch.Generator().manual_seed(1)
    seconds = torch.rand(400, 1, generator=g, dtype=torch.float64) * 3600
    X64 = 1.7e9 + seconds  # Unix timestamps over an hour: float32 keeps 4 distinct values of them
    Y64 = 1e8 + torch.sin(seconds / 600)
    e = DeepEnsemble(dim_in=1, num_members=2, hidden_dim=32)
    train(e, tmp_path, X=X64, Y=Y64, train_num_steps=600, train_lr=1e-2)
    assert len(torch.unique(e.standardizer.standardize_x(X64))) == 400
    pred = e(X64)
    assert pred.mean.dtype == torch.float64  # the target's own precision
    rmse = (pred.mean - Y64).square().mean().sqrt()
    assert rmse < 0.2 * (Y64 - 1e8).std()  # it learned sin; float32 made the target one value
    e.save(tmp_path / "ens")
    assert torch.equal(DeepEnsemble.load(tmp_path / "ens")(X64).mean, pred.mean)


@pytest.mark.unit
def test_tensors_that_require_grad_are_data_not_part_of_a_graph(tmp_path):
    encoder = torch.nn.Linear(2, 2)
    features = encoder(X)  # requires grad
    dataset = TensorDataset(features, Y)
    assert not dataset.X.requires_grad and dataset.X.numpy().shape == (200, 2)  # Ray sends .numpy()
    train(small(), tmp_path, X=features, train_num_steps=25, train_batch_size=100)  # 2 epochs


@pytest.mark.unit
def test_pandas_lists_bools_and_torch_datasets_are_accepted(tmp_path):
    frame = pd.DataFrame({"u": X[:, 0].double().numpy(), "v": X[:, 1].double().numpy()})
    dataset = TensorDataset(frame, pd.Series(Y[:, 0].double().numpy()))
    assert dataset.feature_names == ["u", "v"] and dataset.X.dtype == torch.float64
    assert TensorDataset(X.tolist(), Y[:, 0].tolist()).X.shape == (200, 2)
    labels = X[:, 0] > 0
    clf = DeepEnsembleClassifier(dim_in=2, num_classes=2, num_members=2, hidden_dim=16, depth=1)
    Trainer(clf, TensorDataset(X, labels.numpy()), train_num_steps=60, train_lr=1e-2,
            results_folder=tmp_path).train()
    assert (clf(X).probs.argmax(-1) == labels.long()).float().mean() > 0.9
    trainer = Trainer(small(), torch.utils.data.TensorDataset(X, Y), train_num_steps=2, results_folder=tmp_path)
    assert torch.equal(trainer.dataset.X, X)


@pytest.mark.unit
def test_numpy_integers_are_accepted_and_stored_as_python_ints(tmp_path):
    e = DeepEnsemble(dim_in=np.int64(2), num_members=np.int64(2), hidden_dim=np.int64(8), seed=np.int64(3))
    trainer = Trainer(e, TensorDataset(X, Y), train_num_steps=np.int64(3), train_batch_size=np.int64(50),
                      save_every=np.int64(2), results_folder=tmp_path)
    trainer.train()
    e.save(tmp_path / "ens")  # JSON would refuse a numpy int
    assert all(type(v) is int for v in (e.config["hidden_dim"], e.config["seed"], e.config["dim_in"],
                                        trainer.settings.num_steps, trainer.settings.batch_size))
    space = sweep.normalize_param_space({"num_members": [np.int64(1), np.int64(2)]})
    assert [type(v) for v in space["num_members"]["grid_search"]] == [int, int]


@pytest.mark.unit
def test_features_may_not_repeat_or_include_the_target_and_labels_follow_one_rule():
    table = pa.table({"a": [1.0, 2.0, 3.0], "b": [0.5, 0.1, 0.2], "y": [0.0, 1.0, 1.0]})
    for features in (["a", "y"], ["a", "a"]):
        with pytest.raises(ValueError, match="distinct columns other than the target 'y'"):
            table_to_dataset(table, "y", features)
    # float-valued whole labels: accepted here as in TensorDataset and the classifier
    assert table_to_dataset(table, "y", task="classification").y.tolist() == [0, 1, 1]
    with pytest.raises(TypeError, match="integer class labels"):
        table_to_dataset(table, "b", ["a"], task="classification")


# D. training state is honest ------------------------------------------------------------------

@pytest.mark.unit
def test_continuing_a_trained_ensemble_keeps_its_statistics_unless_asked(tmp_path):
    e = small()
    train(e, tmp_path / "a", train_num_steps=200, train_lr=1e-2)
    before, stats = e(X).mean, e.standardizer.state()
    shifted = TensorDataset(X[:50] + 3, Y[:50] * 10)  # new rows of another scale
    Trainer(e, shifted, train_num_steps=1, train_lr=1e-12, results_folder=tmp_path / "b").train()
    assert e.standardizer.state() == stats
    torch.testing.assert_close(e(X).mean, before, atol=1e-4, rtol=0)
    Trainer(e, shifted, train_num_steps=1, train_lr=1e-12, refit_normalization=True,
            results_folder=tmp_path / "c").train()
    assert e.standardizer.state()["y_std"] != stats["y_std"]


@pytest.mark.unit
def test_loading_the_final_checkpoint_reports_its_losses_and_other_data_is_refused(tmp_path):
    full = train(small(), tmp_path, train_num_steps=20, save_every=10)
    trainer = Trainer(small(), TensorDataset(X, Y), train_num_steps=20, save_every=10, results_folder=tmp_path)
    trainer.load(2)
    trainer.train()
    assert trainer.metrics["members"] == full.metrics["members"]
    assert all(np.isfinite(m["train_loss"]) for m in trainer.metrics["members"].values())
    other = Trainer(small(), TensorDataset(X + 1, Y), train_num_steps=20, results_folder=tmp_path)
    with pytest.raises(ValueError, match="trained on other data"):
        other.load(1)
    longer = Trainer(small(), TensorDataset(X, Y), train_num_steps=30, save_every=10, results_folder=tmp_path)
    with pytest.warns(UserWarning, match="num_steps 20 -> 30"):
        longer.load(1)


@pytest.mark.unit
@pytest.mark.parametrize("stop_at", [7, 23], ids=["before the first checkpoint", "after two"])
def test_train_after_an_interrupt_continues_from_the_last_checkpoint(tmp_path, monkeypatch, stop_at):
    options = dict(train_num_steps=40, save_every=10, train_batch_size=50)
    full = train(small(), tmp_path / "full", **options)
    step = EnsembleFit.train_step

    def interrupted(fit):
        if fit.step == stop_at:
            raise KeyboardInterrupt
        return step(fit)

    e = small()
    trainer = Trainer(e, TensorDataset(X, Y), results_folder=tmp_path / "r", **options)
    monkeypatch.setattr(EnsembleFit, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    monkeypatch.setattr(EnsembleFit, "train_step", step)
    trainer.train()  # from checkpoint-2 (step 20), or from the same initial weights
    for k, v in full.ensemble.state_dict().items():
        torch.testing.assert_close(e.state_dict()[k], v, atol=1e-6, rtol=0, msg=k)
    losses = [[m["train_loss"] for m in t.metrics["members"].values()] for t in (trainer, full)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)


@pytest.mark.unit
def test_restart_attempts_and_a_partial_epoch_survive_a_checkpoint(tmp_path):
    options = dict(train_num_steps=14, save_every=6, train_batch_size=40)  # 5 steps an epoch
    full = train(small(), tmp_path / "full", **options)
    resumed = Trainer(small(), TensorDataset(X, Y), results_folder=tmp_path / "full", **options)
    resumed.load(1)  # step 6: one step into epoch 1
    assert resumed._fit.epoch_steps.tolist() == [1, 1]
    resumed.train()
    full_epochs = [h["member_train_loss"] for h in full.history if "epoch" in h]
    resumed_epochs = [h["member_train_loss"] for h in resumed.history if "epoch" in h]
    # epoch 1's mean over all 5 steps; each entry maps member -> loss (approx takes no nesting)
    assert [list(e) for e in resumed_epochs] == [list(e) for e in full_epochs[1:]]
    np.testing.assert_allclose([list(e.values()) for e in resumed_epochs],
                               [list(e.values()) for e in full_epochs[1:]], rtol=1e-6)

    fit = EnsembleFit(small(), TensorDataset(X, Y), resumed.settings, "cpu")
    fit.attempts = [2, 0]
    fit.step = 3
    checkpoint.save(fit, tmp_path / "attempts")
    again = EnsembleFit(small(), TensorDataset(X, Y), resumed.settings, "cpu")
    checkpoint.restore(again, tmp_path / "attempts")
    assert again.attempts == [2, 0]  # a second divergence gets attempt 3, a seed it never had


@pytest.mark.unit
def test_a_restarted_members_nan_stays_out_of_its_epoch_mean(tmp_path):
    trainer = Trainer(small(), TensorDataset(X, Y), train_num_steps=4, train_batch_size=50,
                      on_divergence="restart", results_folder=tmp_path)
    fit = trainer._new_fit()
    forward_backward = fit._forward_backward

    def poisoned(xs, ys):  # member 1 diverges at step 1
        losses = forward_backward(xs, ys)
        return losses.index_fill(0, torch.tensor([1]), float("nan")) if fit.step == 1 else losses

    fit._forward_backward = poisoned
    fit.run()
    assert fit.attempts == [0, 1] and torch.isfinite(fit.last_epoch_loss).all()


@pytest.mark.unit
def test_ema_predicts_about_as_well_as_the_weights_and_reports_their_loss(tmp_path):
    # the README's example settings: 300 steps, ema_decay 0.995, EMA every 10 steps
    errors, losses = {}, {}
    for decay in (0.0, 0.995):
        e = small(seed=1)
        trainer = train(e, tmp_path / str(decay), train_num_steps=300, train_lr=1e-2, ema_decay=decay)
        errors[decay] = (e(X).mean - Y).square().mean().sqrt().item()
        losses[decay] = [m["train_loss"] for m in trainer.metrics["members"].values()]
    assert errors[0.995] < 1.3 * errors[0.0]  # before: 0.224 against 0.096 on the README's data
    assert losses[0.995] != losses[0.0]
    e = small()
    initial = e.members.weights[0].clone()
    train(e, tmp_path / "short", train_num_steps=9, train_lr=1e-2, ema_decay=0.5, ema_update_every=10)
    assert not torch.allclose(e.members.weights[0], initial)  # the last steps reached the EMA


@pytest.mark.unit
def test_the_cosine_schedule_and_trainer_save_milestone(tmp_path):
    options = dict(train_num_steps=10, lr_scheduler=True, save_every=5, train_lr=1e-2, results_folder=tmp_path)
    trainer = Trainer(small(), TensorDataset(X, Y), **options)
    assert [trainer.settings.lr_at(s) for s in (0, 5, 10)] == pytest.approx([1e-2, 5e-3, 0.0])
    Trainer(small(), TensorDataset(X, Y), **options).train()
    trainer.load(1)
    trainer.save(7)  # the held training state, under a milestone of the caller's choosing
    again = Trainer(small(), TensorDataset(X, Y), **options)
    again.load(7)
    again.train()
    trainer.train()
    assert torch.equal(again.ensemble(X).mean, trainer.ensemble(X).mean)
    constant = small()
    train(constant, tmp_path / "constant", train_num_steps=10, train_lr=1e-2, lr_scheduler=False)
    assert not torch.equal(constant(X).mean, trainer.ensemble(X).mean)


# E. predictions are honest ----------------------------------------------------------------------

@pytest.mark.unit
def test_loaded_ensembles_predict_in_eval_mode_and_threads_do_not_move_batch_norm(tmp_path):
    e = DeepEnsemble(dim_in=2, num_members=2, hidden_dim=16, batch_norm=True)
    train(e, tmp_path, train_num_steps=20)
    e.save(tmp_path / "ens")
    loaded = DeepEnsemble.load(tmp_path / "ens")
    assert not loaded.training
    loaded.train()  # left in training mode by its user: prediction still must not move statistics
    stats = [b.clone() for b in loaded.buffers()]
    expected = DeepEnsemble.load(tmp_path / "ens")(X).mean
    results = []
    threads = [threading.Thread(target=lambda: results.extend(loaded(X).mean for _ in range(20))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(r, expected) for r in results) and len(results) == 80
    assert all(torch.equal(a, b) for a, b in zip(stats, loaded.buffers())) and loaded.training


@pytest.mark.unit
def test_log_prob_checks_its_target_and_takes_numpy(tmp_path):
    pred = small()(X)
    torch.testing.assert_close(pred.log_prob(Y[:, 0].numpy()), pred.log_prob(Y))
    with pytest.raises(ValueError, match=r"\(200, 1\).*\(199, 1\)"):
        pred.log_prob(Y[:199])


@pytest.mark.unit
def test_a_target_scale_that_overflows_is_an_error_not_nan(tmp_path):
    huge = (Y * 1e30).float()  # float32: its variance, 1e60, has no float32
    e = small()
    with pytest.raises(FloatingPointError, match="trained, but cannot predict.*not finite.*float64 target.*saved at"):
        train(e, tmp_path, Y=huge, train_num_steps=5)  # at the end of training, not at the first prediction
    assert load_ensemble(tmp_path / "checkpoint-1").num_members == e.num_members  # the run is kept
    with pytest.raises(FloatingPointError, match="not finite.*float64 target"):
        e(X)
    e64 = small()
    train(e64, tmp_path / "64", Y=huge.double(), train_num_steps=5)
    assert torch.isfinite(e64(X).variance).all()


@pytest.mark.unit
def test_m_curve_draws_distinct_subsets_and_checks_its_arguments(monkeypatch, tmp_path):
    e = DeepEnsemble(dim_in=2, num_members=6, hidden_dim=8)
    drawn = []
    score = selection.ensemble_validation_metrics
    monkeypatch.setattr(selection, "ensemble_validation_metrics", lambda task, ids, *a: drawn.append(tuple(ids)) or score(task, ids, *a))
    rows = sweep.m_curve(e, X, Y, num_subsets=19)  # 20 triples: almost all of them
    triples = [d for d in drawn if len(d) == 3]
    assert rows[2]["num_subsets"] == 19 and len(set(triples)) == 19
    with pytest.raises(ValueError, match="'num_subsets'.*>= 1.*Got 0"):
        sweep.m_curve(e, X, Y, num_subsets=0)


# F. sweeps, metrics and formats -----------------------------------------------------------------

@pytest.mark.unit
def test_every_option_passes_to_a_trial_and_an_unknown_one_is_named(monkeypatch):
    built = {}

    import inspect

    import ray.train
    import ray.tune
    import ray_ensembles.trainer

    class Recorder:
        def __init__(self, ensemble, dataset, **kwargs):
            built.update(ensemble=ensemble, **kwargs)

        def train(self):
            pass

    Recorder.__init__.__signature__ = inspect.signature(Trainer.__init__)  # what the sweep reads
    options = sweep.canonical_options({"amp": True, "steps": 30, "on_divergence": "restart", "cuda_graphs": False},
                                      "regression", "trainer_options")
    monkeypatch.setattr(ray_ensembles.trainer, "Trainer", Recorder)
    monkeypatch.setattr(ray.tune, "get_context", lambda: type("C", (), {"get_trial_id": lambda self: "t0"})())
    monkeypatch.setattr(sweep, "_tune_report_callback", lambda task, y: ray.train.UserCallback())  # needs Tune
    base = {"cls": DeepEnsemble, "dim_out": {"dim_out": 1}, "ensemble": {"perturbation": "random"},
            "trainer": options, "num_reports": 3, "cpus_per_worker": 1.0, "use_gpu": False, "max_workers": 2,
            "trials_dir": "/tmp/unused", "training": "ray_train"}
    sweep._run_trial({"num_members": 2, "adversarial_eps": 0.01}, train=TensorDataset(X, Y),
                     validation=TensorDataset(X, Y), base=base)
    assert built["ensemble"].perturbation == "random" and built["ensemble"].use_adversarial_training
    assert (built["amp"], built["train_num_steps"], built["on_divergence"], built["cuda_graphs"]) == \
        (True, 30, "restart", False)
    assert built["save_every"] == 10  # 30 steps in 3 reports (before: computed for 40 epochs)
    with pytest.raises(ValueError, match="unknown option 'learning_rate'"):
        sweep.canonical_options({"learning_rate": 0.1}, "regression", "trainer_options")


@pytest.mark.unit
def test_crps_is_nan_only_for_a_degenerate_row_and_the_area_is_an_area():
    scipy_stats = pytest.importorskip("scipy.stats")
    mean, var, y = torch.zeros(3, 1), torch.tensor([[1.0], [0.0], [4.0]]), torch.tensor([[0.5], [0.1], [-1.0]])
    per_row = crps_gaussian(mean, var, y, reduction="none")
    assert torch.isnan(per_row[1]) and torch.isfinite(per_row[[0, 2]]).all()
    sigma, z = 2.0, -0.5  # the closed form of row 2, by scipy
    expected = sigma * (z * (2 * scipy_stats.norm.cdf(z) - 1) + 2 * scipy_stats.norm.pdf(z) - 1 / np.sqrt(np.pi))
    assert per_row[2].item() == pytest.approx(expected, rel=1e-5)
    # intervals twice too narrow: observed(p) = 2 Phi(Phi^-1((1 + p) / 2) / 2) - 1, area by quadrature
    g = torch.Generator().manual_seed(0)
    y = torch.randn(200_000, 1, generator=g, dtype=torch.float64)
    area = miscalibration_area(torch.zeros_like(y), torch.full_like(y, 0.25), y)
    from scipy.integrate import quad
    exact, _ = quad(lambda p: abs(2 * scipy_stats.norm.cdf(scipy_stats.norm.ppf((1 + p) / 2) * 2) - 1 - p), 0, 1)
    assert area == pytest.approx(exact, abs=2e-3)
    expected_levels, observed = calibration_curve(torch.zeros_like(y), torch.full_like(y, 0.25), y)
    assert (observed - expected_levels).abs().mean().item() > area  # the old figure, the mean gap


@pytest.mark.unit
def test_one_rule_for_table_formats_and_uri_loads_leave_nothing_behind(tmp_path):
    (tmp_path / "t.txt").write_text("a,y\n1,2\n")
    with pytest.raises(ValueError, match=r"\.csv"):
        read_table(str(tmp_path / "t.txt"))
    small().save(tmp_path / "ens")
    before = set(Path(tempfile.gettempdir()).glob("ensemble-*"))
    load_ensemble(f"file://{tmp_path / 'ens'}")
    assert set(Path(tempfile.gettempdir()).glob("ensemble-*")) == before


@pytest.mark.unit
def test_an_uncalibrated_ensemble_is_format_3_and_versions_1_and_2_still_load(tmp_path):
    e = small()
    e.save(tmp_path / "ens")
    manifest = json.loads((tmp_path / "ens" / "manifest.json").read_text())
    assert manifest["format_version"] == 3 and FORMAT_VERSION == 6  # 4 to 6: calibrated, combined, shaped or conformal ones only
    manifest["format_version"] = 1
    del manifest["normalization"]["target_dtype"], manifest["config"]["nll_beta"]
    for entry in manifest["members"]:  # member files of then: their config had no nll_beta either
        tensors, meta = storage.read_member_file(tmp_path / "ens" / entry["file"])
        del meta["config"]["nll_beta"]
        entry["sha256"] = storage.write_member_file(tmp_path / "ens", entry["id"], tensors, meta)
    (tmp_path / "ens" / "manifest.json").write_text(json.dumps(manifest))
    loaded = DeepEnsemble.load(tmp_path / "ens")
    assert torch.equal(loaded(X).mean, e(X).mean)
    assert loaded.nll_beta == 0.0  # members saved before version 3 trained on the plain NLL


# G. the peer's API ------------------------------------------------------------------------------

@pytest.mark.unit
def test_the_other_tasks_summaries_are_none_as_in_deep_ensembles_pytorch():
    assert small()(X).probs is None
    clf = DeepEnsembleClassifier(dim_in=2, num_classes=3, num_members=2, hidden_dim=8, depth=1)
    assert clf(X).mean is None and clf(X).probs.shape == (200, 3)


# A3: every instant of a save is crash-safe (killed, not raising) -----------------------------------

KILL_DURING_SAVE = """
import os, sys
from ray_ensembles import DeepEnsemble
from ray_ensembles.io import directories, manifest
path, step = sys.argv[1], sys.argv[2]
def die(*args, **kwargs):
    os._exit(3)
if step == "before the manifest":
    manifest.Manifest.write = die
elif step == "before the exchange":
    directories._exchange = die
elif step == "before the old is removed":
    directories.shutil.rmtree = die
DeepEnsemble(dim_in=2, num_members=2, hidden_dim=8, seed=1).save(path)
"""


@pytest.mark.e2e
@pytest.mark.parametrize("step, survivor", [("before the manifest", 0), ("before the exchange", 0),
                                            ("before the old is removed", 1)])
def test_a_save_killed_at_any_step_leaves_a_whole_ensemble(tmp_path, step, survivor):
    import subprocess
    import sys

    from conftest import REPO
    small(seed=0).save(tmp_path / "ens")
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, str(tmp_path / "ens"), step],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert DeepEnsemble.load(tmp_path / "ens").seed == survivor
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == ["ens"]
