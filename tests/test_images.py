"""Inputs of any shape: images with per-channel standardisation and FGSM, per-member augmentation,
factory networks stacked layer by layer, and the refusals that come before any work."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from ray_ensembles import DeepEnsemble, DeepEnsembleClassifier, TensorDataset, Trainer
from ray_ensembles.loop.augmentation import Compose, RandomCrop, RandomHorizontalFlip, augment_members
from ray_ensembles.loop.training import EnsembleFit, TrainSettings
from ray_ensembles.model.inference import feature_columns
from ray_ensembles.model.members import FactoryMembers
from ray_ensembles.model.stacked_layers import StackedSequential

pytestmark = pytest.mark.unit


def images(n: int, seed: int = 0):
    """(n, 1, 8, 8) images whose label says whether the top half is brighter than the bottom
    (flips and small crops keep it)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.rand(n, 1, 8, 8, generator=g)
    return X, (X[:, 0, :4].mean((1, 2)) > X[:, 0, 4:].mean((1, 2))).long()


def cnn():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(64, 2))


class Residual(nn.Module):
    """Not a plain Sequential: trained as the per-member loop."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(1, 1, 3, padding=1), nn.Linear(64, 2)

    def forward(self, x):
        return self.head((x + self.conv(x)).flatten(1))


AUGMENT = Compose(RandomCrop(1), RandomHorizontalFlip())
OPTIONS = dict(train_batch_size=32, train_lr=0.05, optimizer="sgd", momentum=0.9, warmup_steps=5, augment=AUGMENT)


def classifier(num_members=3, **kwargs):
    return DeepEnsembleClassifier((1, 8, 8), 2, num_members=num_members, member_factory=cnn, seed=3, **kwargs)


def test_an_image_ensemble_learns_and_saves_loads_subsets_and_calibrates(tmp_path):
    X, y = images(400)
    e = classifier()
    assert isinstance(e.members, StackedSequential) and e.config["dim_in"] == [1, 8, 8]
    trainer = Trainer(e, TensorDataset(X[:300], y[:300]), train_num_steps=200, results_folder=tmp_path / "run",
                      validation_dataset=TensorDataset(X[300:], y[300:]), **OPTIONS)
    trainer.train()
    assert trainer.history[-1]["member_train_loss"][0] < trainer.history[0]["member_train_loss"][0]
    assert trainer.metrics["val_accuracy"] > 0.8
    member_2 = e.sample_predictions(X)[2].probs
    assert e.calibrate(X[300:], y[300:])["val_nll_after"] <= e.calibrate(X[300:], y[300:])["val_nll_before"]
    path = e.save(tmp_path / "images")
    assert json.loads((path / "manifest.json").read_text())["format_version"] == 5  # older readers refuse it
    loaded = DeepEnsembleClassifier.load(path, member_factory=cnn)
    assert loaded.input_shape == (1, 8, 8) and loaded.calibration == e.calibration
    assert torch.equal(loaded.predict(X).probs, e.predict(X).probs)
    sub = loaded.subset([2])
    torch.testing.assert_close(sub.predict(X).probs, member_2, atol=1e-6, rtol=0)  # uncalibrated, as a subset starts


def test_the_builtin_mlp_takes_images_flattened(tmp_path):
    X, y = images(300)
    e = DeepEnsembleClassifier([1, 8, 8], 2, num_members=2, hidden_dim=32, depth=1)
    Trainer(e, TensorDataset(X, y), train_num_steps=200, train_lr=0.01, results_folder=tmp_path).train()
    assert (e.predict(X).probs.argmax(-1) == y).float().mean() > 0.85


def test_inputs_are_standardised_per_channel_and_fgsm_steps_per_channel():
    g = torch.Generator().manual_seed(0)
    X = torch.rand(50, 3, 4, 4, generator=g) * torch.tensor([1.0, 10.0, 100.0]).view(3, 1, 1) + torch.tensor([0.0, 5.0, -50.0]).view(3, 1, 1)
    e = DeepEnsemble((3, 4, 4), num_members=1, adversarial_eps=0.1)
    e.fit_normalization(X, torch.randn(50, 1))
    channel_rows = X.transpose(0, 1).reshape(3, -1).double()
    torch.testing.assert_close(e.standardizer.x_mean, channel_rows.mean(1))
    torch.testing.assert_close(e.standardizer.x_std, channel_rows.std(1, correction=0))
    xs = e.standardizer.standardize_x(X)
    torch.testing.assert_close(xs.transpose(0, 1).reshape(3, -1).mean(1), torch.zeros(3), atol=1e-5, rtol=0)
    span = channel_rows.amax(1) - channel_rows.amin(1)
    torch.testing.assert_close(e.adversarial_step, (0.1 * span / channel_rows.std(1, correction=0)).float().view(3, 1, 1))
    off = DeepEnsemble((3, 4, 4), num_members=1, standardize_inputs=False)
    off.fit_normalization(X, torch.randn(50, 1))
    assert torch.equal(off.standardizer.standardize_x(X), X) and off.config["standardize_inputs"] is False
    assert "standardize_inputs" not in e.config  # the default is left out, as readers before format 5 expect


def test_stacked_sequential_members_train_as_the_per_member_loop():
    """One process, same initial weights: stacked (both channel paths) and looped members take
    the same steps, up to float rounding; a network that is not a plain Sequential loops."""
    X, y = images(128)
    data = TensorDataset(X, y)
    settings = TrainSettings(batch_size=32, num_steps=8, lr=0.05, optimizer="sgd", augment=AUGMENT)

    def fit(path):
        e = classifier(use_adversarial_training=True)
        if path == "loop":
            e.members = FactoryMembers(cnn, e.member_seeds)
        else:
            e.members.channels_path = path
        e.fit_normalization(X)
        fit = EnsembleFit(e, data, settings)
        fit.run()
        return e

    loop = fit("loop")
    for path in ("per_member", "grouped"):
        stacked = fit(path)
        for i in range(3):
            for k, v in loop.members.member_state(i).items():
                torch.testing.assert_close(stacked.members.member_state(i)[k], v, atol=1e-5, rtol=1e-4, msg=f"{path} {k}")
    assert isinstance(DeepEnsembleClassifier((1, 8, 8), 2, member_factory=Residual).members, FactoryMembers)


def test_augmentation_draws_from_seed_member_and_step_only():
    xs = torch.rand(2, 5, 1, 8, 8)
    both = augment_members(AUGMENT, xs, [11, 22], step=7)
    alone = augment_members(AUGMENT, xs[1:], [22], step=7)
    assert torch.equal(both[1], alone[0])
    assert not torch.equal(both, augment_members(AUGMENT, xs, [11, 22], step=8))
    # a crop is a window of the zero-padded image; a flip mirrors the last dimension
    x = torch.arange(64.0).view(1, 1, 8, 8)
    out = RandomCrop(2)(x, torch.Generator().manual_seed(0))
    padded = nn.functional.pad(x, (2, 2, 2, 2))
    assert any(torch.equal(out, padded[..., i:i + 8, j:j + 8]) for i in range(5) for j in range(5))
    assert torch.equal(RandomHorizontalFlip(1.0)(x, torch.Generator()), x.flip(-1))
    assert torch.equal(RandomHorizontalFlip(0.0)(x, torch.Generator()), x)


def test_a_member_trained_alone_with_augmentation_equals_it_in_an_ensemble(tmp_path):
    X, y = images(96)

    def train(num_members, member_ids=None):
        e = DeepEnsembleClassifier((1, 8, 8), 2, num_members=num_members, member_ids=member_ids, member_factory=cnn, seed=3)
        Trainer(e, TensorDataset(X, y), train_num_steps=12, results_folder=tmp_path / str(num_members), **OPTIONS).train()
        return e

    three, alone = train(3), train(1, [2])
    for k, v in alone.members.member_state(0).items():
        torch.testing.assert_close(three.members.member_state(2)[k], v, atol=1e-6, rtol=1e-5, msg=k)


def test_a_run_with_augmentation_resumes_exactly(tmp_path):
    X, y = images(96)
    options = dict(OPTIONS, train_num_steps=12, save_every=5, results_folder=tmp_path)
    full = classifier()
    Trainer(full, TensorDataset(X, y), **options).train()
    resumed = classifier()
    trainer = Trainer(resumed, TensorDataset(X, y), **options)
    trainer.load(1)  # step 5
    trainer.train()
    for k, v in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, atol=1e-6, rtol=0, msg=k)


def wrong_width():
    return nn.Sequential(nn.Flatten(), nn.Linear(60, 2))


def too_many_outputs():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 3))


X8, Y8 = images(20)
BAD = [
    ("transform changes the shape", lambda: Trainer(classifier(), TensorDataset(X8, Y8), augment=lambda x, g: x[..., :4]),
     ValueError, r"'augment' .* the shape and dtype .*\(2, 1, 8, 8\).*\(2, 1, 8, 4\)"),
    ("transform changes the dtype", lambda: Trainer(classifier(), TensorDataset(X8, Y8), augment=lambda x, g: x.double()),
     ValueError, r"'augment' .* the shape and dtype .*float64"),
    ("transform fails", lambda: Trainer(classifier(), TensorDataset(X8, Y8), augment=lambda x: x),
     ValueError, r"'augment' .* fails on a batch of 2 zeros: TypeError"),
    ("transform is no callable", lambda: Trainer(classifier(), TensorDataset(X8, Y8), augment="crop"),
     TypeError, r"'augment'"),
    ("factory takes other inputs", lambda: DeepEnsembleClassifier((1, 8, 8), 2, member_factory=wrong_width),
     ValueError, r"'member_factory' .* taking inputs \(B, 1, 8, 8\). .*fails on a batch of 2 zeros"),
    ("factory gives other outputs", lambda: DeepEnsembleClassifier((1, 8, 8), 2, member_factory=too_many_outputs),
     ValueError, r"mapping \(B, 1, 8, 8\) to \(B, 2\). Got output shape \(2, 3\)"),
    ("inputs of another shape", lambda: Trainer(classifier(), TensorDataset(X8[..., :7], Y8)),
     ValueError, r"'dataset' .* inputs of shape \(1, 8, 8\) \(dim_in\). Got shape \(1, 8, 7\)"),
    ("a table for an image ensemble", lambda: Trainer(classifier(), TensorDataset(X8.flatten(1), Y8)),
     ValueError, r"inputs of shape \(1, 8, 8\).*Got shape \(64,\)"),
    ("prediction of another shape", lambda: classifier().predict(X8[:, :, :4]),
     ValueError, r"'X' .* rows of input_shape \(1, 8, 8\). Got shape \(20, 1, 4, 8\)"),
    ("prediction of a table without names", lambda: feature_columns(classifier(), ["image", "label"]),
     ValueError, r"without feature names; pass the one tensor column of \(1, 8, 8\) inputs \('features'\)"),
    ("a shape with a zero", lambda: DeepEnsemble([1, 0, 8]), ValueError, r"'dim_in' .* positive integer"),
    ("an optimiser that does not exist", lambda: Trainer(classifier(), TensorDataset(X8, Y8), optimizer="lamb"),
     ValueError, r"'optimizer'.*'lamb'"),
    ("a crop without padding", lambda: RandomCrop(0), ValueError, r"'padding' parameter of RandomCrop"),
    ("a flip of table rows", lambda: Trainer(DeepEnsemble(3), TensorDataset(X8.flatten(1)[:, :3], Y8.float()[:, None]),
                                             augment=RandomHorizontalFlip()),
     ValueError, r"'augment' .* RandomHorizontalFlip\(p=0.5\) takes batches of images .* Got a batch of shape \(2, 3\)"),
]


@pytest.mark.parametrize("case, call, error, message", BAD, ids=[c[0] for c in BAD])
def test_bad_image_inputs_are_refused_before_any_work(case, call, error, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error, match=message):
        call()
    assert not any(tmp_path.iterdir())


def test_an_npz_file_of_images_reads_back_and_refuses_what_is_not_one(tmp_path):
    from ray_ensembles.loop.data import read_arrays

    X, y = images(10)
    np.savez(tmp_path / "images.npz", X=X.numpy(), y=y.numpy())
    arrays = read_arrays(str(tmp_path / "images.npz"))
    assert np.array_equal(arrays["X"], X.numpy()) and np.array_equal(arrays["y"], y.numpy())
    np.savez(tmp_path / "other.npz", inputs=X.numpy())
    with pytest.raises(ValueError, match=r"must hold the arrays \['X', 'y'\].*Got the arrays \['inputs'\]"):
        read_arrays(str(tmp_path / "other.npz"))
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(ValueError, match="could not be read as .npz"):
        read_arrays(str(tmp_path / "text.npz"))


def test_the_serve_app_reads_nested_rows_checked_against_the_input_shape():
    from ray_ensembles.serving import RequestError, parse_request

    e = classifier()
    X, coverage = parse_request({"rows": X8[:2].tolist()}, e)
    assert X.shape == (2, 1, 8, 8) and np.array_equal(X, X8[:2].double().numpy())
    for row in (X8[0, :, :4].tolist(), X8[0].flatten().tolist(), [[["a"] * 8] * 8], [[[True] * 8] * 8]):
        with pytest.raises(RequestError) as refused:
            parse_request({"rows": [row]}, e)
        assert refused.value.status == 400 and "input shape" in str(refused.value.body())


def test_a_torch_dataset_of_images_trains_the_in_memory_members(tmp_path):
    X, y = images(96)

    class Images(torch.utils.data.Dataset):  # images made on demand, as one that decodes files would
        def __len__(self):
            return len(X)

        def __getitem__(self, i):
            return X[i].clone(), y[i].clone()

    def train(data, folder):
        e = classifier(use_adversarial_training=True)
        Trainer(e, data, train_num_steps=8, results_folder=tmp_path / folder, **OPTIONS).train()
        return e

    mapped, in_memory = train(Images(), "map"), train(TensorDataset(X, y), "memory")
    torch.testing.assert_close(mapped.standardizer.x_mean, in_memory.standardizer.x_mean)
    for i in range(3):
        for k, v in in_memory.members.member_state(i).items():
            torch.testing.assert_close(mapped.members.member_state(i)[k], v, atol=1e-5, rtol=1e-4, msg=k)


def tensor_tables(X: np.ndarray, y: np.ndarray):
    """Images as each kind of fixed-shape tensor column: Arrow's canonical one, and Ray Data's as
    pyarrow reads it from Parquet without Ray (a list column that names Ray's type)."""
    import pyarrow as pa

    canonical = pa.table({"image": pa.FixedShapeTensorArray.from_numpy_ndarray(X), "label": y})
    ray_field = pa.field("image", pa.large_list(pa.float32()), metadata={
        b"ARROW:extension:name": b"ray.data.arrow_tensor_v2",
        b"ARROW:extension:metadata": json.dumps(list(X.shape[1:])).encode()})
    as_ray = pa.Table.from_arrays([pa.array(list(X.reshape(len(X), -1)), ray_field.type), pa.array(y)],
                                  schema=pa.schema([ray_field, pa.field("label", pa.from_numpy_dtype(y.dtype))]))
    return {"canonical": canonical, "ray": as_ray}


@pytest.mark.parametrize("kind", ["canonical", "ray"])
def test_a_tensor_column_of_a_table_is_the_input_for_training_and_prediction(kind, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ray_ensembles.loop.data import read_table, table_to_dataset
    from ray_ensembles.model.inference import BatchPredictor

    X, y = X8.numpy(), Y8.numpy()
    pq.write_table(tensor_tables(X, y)[kind].slice(3), tmp_path / "images.parquet")  # a column not at offset 0
    table = read_table(str(tmp_path / "images.parquet"))
    data = table_to_dataset(table, "label", task="classification")
    assert data.feature_names == ["image"] and torch.equal(data.X, X8[3:].double()) and torch.equal(data.y, Y8[3:])
    e = classifier()
    Trainer(e, data, train_num_steps=6, results_folder=tmp_path / "run", **OPTIONS).train()
    assert e.feature_names == ["image"]
    out = BatchPredictor(e)(table.append_column("id", pa.array(np.arange(17))))
    assert out.column_names[:2] == ["label", "id"]  # the other columns kept, then the predictions
    expected = e.predict(X8[3:]).probs
    np.testing.assert_allclose(np.stack([out.column(f"prob_{c}").to_numpy() for c in (0, 1)], 1), expected.numpy(),
                               rtol=1e-5, atol=1e-6)


def test_tensor_columns_are_refused_where_they_cannot_be_the_input():
    import pyarrow as pa

    from ray_ensembles.loop.data import table_to_dataset

    X, y = X8.numpy(), Y8.numpy()
    canonical = tensor_tables(X, y)["canonical"]
    two = canonical.append_column("mask", canonical.column("image"))
    with pytest.raises(ValueError, match=r"several tensor columns \['image', 'mask'\].*'features'"):
        table_to_dataset(two, "label")
    assert table_to_dataset(two, "label", ["mask"]).X.shape == (20, 1, 8, 8)
    with pytest.raises(ValueError, match=r"one tensor column alone .*Got \['image', 'x'\]"):
        table_to_dataset(canonical.append_column("x", pa.array(np.ones(20))), "label", ["image", "x"])
    with pytest.raises(ValueError, match="target column 'image' must hold one number per row"):
        table_to_dataset(canonical, "image", ["label"])
    X[2, 0, 3, 3] = np.nan
    with pytest.raises(ValueError, match="Column 'image' must be free of missing, NaN and inf"):
        table_to_dataset(tensor_tables(X, y)["ray"], "label")
