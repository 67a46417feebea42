"""The GPU paths: training on CUDA (float32 and bfloat16 AMP, with and without CUDA graphs),
loading on any device, one Ray worker per GPU, and the prediction job's --use-gpu. Skipped where
torch sees no GPU."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from ray.train import ScalingConfig

import predict as job
from ray_ensembles import DeepEnsemble, TensorDataset, Trainer
from ray_ensembles.loop.placement import local_device
from ray_ensembles.loop.training import EnsembleFit, TrainSettings

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

G = torch.Generator().manual_seed(0)
X = torch.randn(400, 3, generator=G)
Y = X[:, :1] * X[:, 1:2] + 0.1 * torch.randn(400, 1, generator=G)
DATA = TensorDataset(X, Y, feature_names=["a", "b", "c"])
OPTIONS = dict(train_batch_size=32, train_num_epochs=10, train_lr=3e-3, max_grad_norm=1.0, save_every=10 ** 6)


def ensemble(num_members=4, **kwargs):
    return DeepEnsemble(dim_in=3, num_members=num_members, hidden_dim=32, seed=3,
                        use_adversarial_training=True, adversarial_eps=0.02, **kwargs)


def train(tmp_path, amp=False, scaling_config=None, **kwargs):
    e, epochs = ensemble(**kwargs), []
    trainer = Trainer(e, DATA, results_folder=tmp_path / "runs", amp=amp, scaling_config=scaling_config,
                      metrics_callback=epochs.append, **OPTIONS)
    trainer.train()
    return e, trainer, epochs


def mean_loss(entry):
    return np.mean(list(entry["member_train_loss"].values()))


@pytest.mark.unit
@pytest.mark.parametrize("amp", [False, True])
def test_cuda_graphs_give_the_eager_members_through_a_restart(amp):
    """400 rows in batches of 32: two graphs (32 rows, and the epoch's last 16). Member 1 is
    poisoned mid-run and restarted in place, which the graphs' replays must then see."""
    fits = []
    for graphs in (True, False):
        e = ensemble()
        e.fit_normalization(X, Y)
        settings = TrainSettings(batch_size=32, num_steps=100, lr=3e-3, max_grad_norm=1.0, ema_decay=0.9,
                                 ema_update_every=1, amp=amp, cuda_graphs=graphs, on_divergence="restart")
        fit = EnsembleFit(e, TensorDataset(X, Y), settings, local_device())
        while fit.step < settings.num_steps:
            if fit.step == 70:
                with torch.no_grad():
                    e.members.weights[0][1].fill_(float("nan"))
            fit.train_step()
        fit.finish()
        fits.append(fit)
    graphed, eager = fits
    assert len(graphed.graphed_step.graphs) == 2 and eager.graphed_step is None
    assert graphed.attempts == eager.attempts == [0, 1, 0, 0]
    for k, v in eager.ensemble.state_dict().items():
        torch.testing.assert_close(graphed.ensemble.state_dict()[k], v, atol=1e-6, rtol=1e-5,
                                   msg=lambda m, k=k: f"{k}: {m}")


@pytest.fixture(scope="module")
def on_gpu(tmp_path_factory):
    return train(tmp_path_factory.mktemp("gpu"))


@pytest.mark.unit
@pytest.mark.parametrize("amp", [False, True])
def test_members_train_on_the_gpu_and_load_on_any_device(amp, on_gpu, tmp_path):
    e, _, epochs = train(tmp_path, amp=amp) if amp else on_gpu
    assert e.device.type == "cuda"
    assert mean_loss(epochs[-1]) < mean_loss(epochs[0]) - 0.3
    e.save(tmp_path / "ensemble")
    loaded = DeepEnsemble.load(tmp_path / "ensemble")
    assert loaded.device.type == "cpu"
    on_cpu, trained = loaded(X), e(X)  # e's predictions come back on X's device
    torch.testing.assert_close(on_cpu.mean, trained.mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(on_cpu.variance, trained.variance, rtol=1e-4, atol=1e-5)
    back = DeepEnsemble.load(tmp_path / "ensemble", map_location="cuda")
    torch.testing.assert_close(back.predict(X.cuda(), batch_size=64).mean.cpu(), trained.mean, rtol=1e-4, atol=1e-5)


@pytest.mark.unit
def test_amp_members_are_close_to_float32_ones(on_gpu, tmp_path):
    """bfloat16 autocast changes rounding, not the model: the fits agree on the data."""
    fp32 = on_gpu[0](X).mean
    amp = train(tmp_path, amp=True)[0](X).mean
    assert (amp - fp32).abs().mean() < 0.1 * Y.std()


@pytest.mark.unit
def test_a_member_is_the_same_alone_or_in_an_ensemble_on_the_gpu(on_gpu, tmp_path):
    together = on_gpu[0]
    alone = train(tmp_path, num_members=1, member_ids=[2])[0]
    for k, v in alone.members.member_state(0).items():
        torch.testing.assert_close(v, together.members.member_state(2)[k], atol=1e-5, rtol=1e-4, msg=k)


def assert_the_prediction_job_matches(e, tmp_path, *options):
    """jobs/predict.py --use-gpu on X, with `options`, gives e(X)."""
    e.save(tmp_path / "ensemble")
    pq.write_table(pa.table({"id": np.arange(len(X)), **{c: X[:, i].numpy() for i, c in enumerate("abc")}}),
                   tmp_path / "in.parquet")
    job.main(["--ensemble", str(tmp_path / "ensemble"), "--data", str(tmp_path / "in.parquet"),
              "--output", str(tmp_path / "out"), "--use-gpu", *options])
    out = pq.read_table(tmp_path / "out").to_pandas().sort_values("id")
    np.testing.assert_allclose(out["mean"], e(X).mean[:, 0].numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.unit
def test_the_prediction_job_runs_on_the_gpu(on_gpu, tmp_path):
    assert_the_prediction_job_matches(on_gpu[0], tmp_path)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=4, num_gpus=torch.cuda.device_count(), log_to_driver=False,
             include_dashboard=False)
    yield
    ray.shutdown()


@pytest.mark.ray
def test_one_worker_per_gpu_gives_the_in_process_members(local_ray, on_gpu, tmp_path):
    gpus = torch.cuda.device_count()
    base = on_gpu[0]
    # two members per worker, so each worker also stacks members
    e, trainer, _ = train(tmp_path, scaling_config=ScalingConfig(num_workers=gpus, use_gpu=True),
                          num_members=2 * gpus)
    assert {p["rank"] for p in trainer.placement.values()} == set(range(gpus))
    assert all(p["device"] == "cuda:0" and len(p["gpu_ids"]) == 1 for p in trainer.placement.values())
    assert len({p["gpu_ids"][0] for p in trainer.placement.values()}) == gpus  # one GPU each
    for i in range(min(2 * gpus, base.num_members)):
        for k, v in e.members.member_state(i).items():
            torch.testing.assert_close(v.cpu(), base.members.member_state(i)[k].cpu(), atol=1e-5, rtol=1e-4, msg=k)


@pytest.mark.ray
def test_the_prediction_job_puts_each_ray_data_actor_on_a_gpu(local_ray, on_gpu, tmp_path):
    assert_the_prediction_job_matches(on_gpu[0], tmp_path, "--num-workers", "1", "--batch-size", "100")


@pytest.mark.unit
def test_stacked_image_members_on_a_gpu_train_as_the_per_member_path_with_augmentation(tmp_path):
    """On a GPU a Sequential CNN runs as grouped calls for all members, and augmentation draws
    from CUDA generators: the grouped path takes the per-member path's steps on the same device."""
    from launched_train import X as images, Y as targets, ensemble as image_ensemble
    from ray_ensembles.loop.augmentation import Compose, RandomCrop, RandomHorizontalFlip

    settings = TrainSettings(batch_size=32, num_steps=20, lr=0.01, optimizer="sgd", nesterov=True,
                             augment=Compose(RandomCrop(1), RandomHorizontalFlip()))
    fits = {}
    for path in ("grouped", "per_member"):
        e = image_ensemble()
        e.members.channels_path = path
        e.fit_normalization(images, targets)
        EnsembleFit(e, TensorDataset(images, targets), settings, local_device()).run()
        fits[path] = e
    for i in range(3):
        for k, v in fits["per_member"].members.member_state(i).items():
            torch.testing.assert_close(fits["grouped"].members.member_state(i)[k], v, atol=1e-4, rtol=1e-3, msg=k)
