"""A map-style torch Dataset is one more kind of training data: the same members as the in-memory
rows, resumed exactly, fetched by DataLoader worker processes, and refused when its rows do not fit."""

import pytest
import torch

from ray_ensembles import DeepEnsemble, DeepEnsembleClassifier, MapDataset, TensorDataset, Trainer

OPTIONS = dict(train_batch_size=32, train_num_steps=60, train_lr=3e-3, save_every=25)


class Rows(torch.utils.data.Dataset):
    """Rows made on demand, as a Dataset that decodes files would: x of shape (D,), y a scalar."""

    def __init__(self, X, y):
        self.X, self.y = X, y
        self.fetched = 0

    def __len__(self):
        return len(self.X)

    def __getitem__(self, i):
        self.fetched += 1
        return self.X[i].clone(), self.y[i].clone()


def members(ensemble):
    return [ensemble.members.member_state(i) for i in range(ensemble.num_members)]


def assert_same(a, b):
    for sa, sb in zip(members(a), members(b)):
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], rtol=1e-4, atol=1e-5, msg=k)


def train(data, folder, **options):
    e = DeepEnsemble(dim_in=2, num_members=3, hidden_dim=16, seed=5, use_adversarial_training=True)
    trainer = Trainer(e, data, results_folder=folder, **{**OPTIONS, **options})
    trainer.train()
    return trainer


@pytest.mark.unit
def test_a_map_dataset_trains_the_in_memory_members_and_resumes_exactly(toy_data, tmp_path):
    X, y = toy_data
    in_memory = train(TensorDataset(X, y), tmp_path / "memory")
    rows = Rows(X, y[:, 0])
    mapped = train(rows, tmp_path / "map")
    assert_same(mapped.ensemble, in_memory.ensemble)  # every member in its own order, the same one
    # every step's rows fetched for each of the 3 members, nothing held: 60 steps of 32 rows are
    # 8 epochs of 200 rows (7 steps each) and 4 steps more
    assert rows.fetched >= 3 * (8 * 200 + 4 * 32)
    resumed = Trainer(DeepEnsemble(dim_in=2, num_members=3, hidden_dim=16, seed=5, use_adversarial_training=True),
                      rows, results_folder=tmp_path / "map", **OPTIONS)
    resumed.load(2)  # step 50: the loader starts again from there
    resumed.train()
    x = torch.randn(8, 2)
    torch.testing.assert_close(resumed.ensemble(x).mean, mapped.ensemble(x).mean, rtol=0, atol=0)
    assert [e["epoch"] for e in mapped.history if "epoch" in e] == [e["epoch"] for e in in_memory.history if "epoch" in e]


@pytest.mark.unit
def test_a_classifier_trains_on_a_map_dataset_of_labels(tmp_path):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(120, 3, generator=g)
    labels = (X[:, 0] > 0).long() + (X[:, 1] > 0).long()
    clf = DeepEnsembleClassifier(dim_in=3, num_classes=3, num_members=2, hidden_dim=16, seed=1)
    Trainer(clf, Rows(X, labels), train_batch_size=20, train_num_epochs=30, train_lr=1e-2, results_folder=tmp_path).train()
    assert (clf(X).probs.argmax(-1) == labels).float().mean() > 0.8


@pytest.mark.unit
@pytest.mark.parametrize("data, error, message", [
    (Rows(torch.randn(10, 3), torch.randn(10)), ValueError, r"'dataset'.*shape \(2,\).*\(10, 3\)"),
    (Rows(torch.randn(0, 2), torch.randn(0)), ValueError, r"'dataset' parameter of MapDataset must have rows"),
    (Rows(torch.randn(10, 2), torch.full((10,), float("nan"))), ValueError, r"'y'.*NaN"),
])
def test_a_dataset_whose_rows_do_not_fit_is_refused_at_construction(data, error, message, tmp_path):
    with pytest.raises(error, match=message):
        Trainer(DeepEnsemble(dim_in=2, num_members=2), data, results_folder=tmp_path)
    with pytest.raises(ValueError, match="'num_workers'.*>= 0"):
        MapDataset(Rows(torch.randn(4, 2), torch.randn(4)), num_workers=-1)


@pytest.mark.e2e
def test_dataloader_worker_processes_fetch_the_same_rows(toy_data, tmp_path):
    X, y = toy_data
    here = train(MapDataset(Rows(X, y[:, 0])), tmp_path / "here", train_num_steps=30)
    workers = train(MapDataset(Rows(X, y[:, 0]), num_workers=2), tmp_path / "workers", train_num_steps=30)
    assert_same(workers.ensemble, here.ensemble)
