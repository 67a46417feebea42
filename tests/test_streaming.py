"""Training on a Ray Dataset streamed window by window (`streaming`): every member sees every
row in its own order, stacked members share the reading, the standardisation comes from one
pass, memory does not grow with the table, and bad tables are refused naming the column."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import shared_local_ray
from ray_ensembles import DeepEnsemble, DeepEnsembleClassifier, TensorDataset, Trainer
from ray_ensembles.loop.batches import MemberBatches
from ray_ensembles.model.standardize import Moments, Standardizer
from ray_ensembles.on_ray.streaming import StreamBatches, TableStream

ROWS, BLOCK, BATCH = 1000, 70, 25  # blocks that do not line up with the windows or batches


class Blocks:
    """A stand-in for a Ray Dataset's iterator: fixed pyarrow blocks, reads counted."""

    def __init__(self, tables):
        self.tables, self.reads = tables, []  # per pass over the table, the blocks read

    def iter_batches(self, **options):
        self.reads.append(0)
        for table in self.tables:
            self.reads[-1] += 1
            yield table


def table(rows=ROWS, start=0):
    """Column `id` is the row's number, so a batch says which rows it holds."""
    ids = np.arange(start, start + rows, dtype=np.float64)
    return pa.table({"id": ids, "noise": np.sin(ids), "y": ids % 7})


def stream(data=None, rows=ROWS):
    data = data or table(rows)
    blocks = Blocks([data.slice(i, BLOCK) for i in range(0, data.num_rows, BLOCK)])
    return TableStream("y", ["id", "noise"], (2,), "regression", data.num_rows, "fp", blocks), blocks


def batches(member_ids, window_rows, rows=ROWS, num_steps=None):
    source, blocks = stream(rows=rows)
    ensemble = DeepEnsemble(2, num_members=len(member_ids), member_ids=member_ids, seed=3)
    return StreamBatches(source, ensemble, BATCH, window_rows, "cpu", num_steps), blocks


def epoch_rows(b, epoch):
    """(M, N) row ids each member trains on in `epoch`, in order."""
    steps = range(epoch * b.steps_per_epoch, (epoch + 1) * b.steps_per_epoch)
    rows = torch.cat([b(step)[0][:, :, 0] for step in steps], dim=1).long()
    b.close()
    return rows


@pytest.mark.unit
def test_every_member_sees_every_row_once_per_epoch_in_its_own_order_within_its_windows():
    b, _ = batches([0, 1, 2], window_rows=200)
    assert b.window_rows == 200 and b.num_windows == 5 and b.steps_per_epoch == 40
    rows = epoch_rows(b, epoch=0)
    for member in rows:
        assert torch.equal(member.sort().values, torch.arange(ROWS))  # a permutation of all rows
        windows = member.view(5, 200) // 200  # rows move only within their window, windows in order
        assert torch.equal(windows, torch.arange(5)[:, None].expand(5, 200))
    assert not torch.equal(rows[0], rows[1]) and not torch.equal(rows[1], rows[2])
    b2, _ = batches([0, 1, 2], window_rows=200)
    assert not torch.equal(epoch_rows(b2, epoch=1), rows)  # each epoch its own


@pytest.mark.unit
def test_a_members_order_depends_on_its_id_alone_and_a_mid_epoch_start_gives_the_same_batches():
    together = epoch_rows(batches([0, 1, 2], window_rows=200)[0], epoch=1)
    alone = epoch_rows(batches([2], window_rows=200)[0], epoch=1)  # as on another worker
    assert torch.equal(together[2], alone[0])
    resumed, _ = batches([0, 1, 2], window_rows=200)
    step = resumed.steps_per_epoch + 13  # epoch 1, inside its second window
    xs, _ = resumed(step)
    resumed.close()
    assert torch.equal(xs[:, :, 0].long(), together[:, 13 * BATCH:14 * BATCH])


@pytest.mark.unit
def test_stacked_members_share_the_reading_and_one_window_is_the_in_memory_order():
    for members in ([0], [0, 1, 2]):
        b, blocks = batches(members, window_rows=200)
        for step in range(2 * b.steps_per_epoch):
            b(step)
        b.close()
        # each block read once an epoch, whatever the members (the reader may have begun epoch 2)
        assert len(blocks.reads) in (2, 3) and blocks.reads[:2] == [len(blocks.tables)] * 2
    windowed, blocks = batches([0, 1], window_rows=200, num_steps=2 * ROWS // BATCH)
    for step in range(2 * windowed.steps_per_epoch):
        windowed(step)
    windowed.close()
    assert len(blocks.reads) == 2  # a run's reading ends with its last epoch, not one ahead
    whole, blocks = batches([0, 1], window_rows=5000)
    for step in range(3 * whole.steps_per_epoch):  # a table of one window is read once, for every epoch
        whole(step)
    whole.close()
    assert blocks.reads == [len(blocks.tables)]
    ensemble = DeepEnsemble(2, num_members=2, seed=3)
    memory = MemberBatches(torch.arange(ROWS, dtype=torch.float32)[:, None], torch.zeros(ROWS, 1), BATCH,
                           ensemble.member_seeds)
    assert torch.equal(epoch_rows(whole, 0), torch.cat([memory.rows(s) for s in range(memory.steps_per_epoch)], 1))


@pytest.mark.unit
def test_a_bad_value_fails_at_the_block_that_holds_it_naming_the_column():
    data = table()
    noise = data.column("noise").to_numpy().copy()
    noise[900] = np.nan
    bad = data.set_column(1, "noise", pa.array(noise))
    source, _ = stream(bad)
    b = StreamBatches(source, DeepEnsemble(2, num_members=1), BATCH, 200, "cpu")
    b(0)  # the first windows are fine
    with pytest.raises(ValueError, match="Column 'noise' must be free of missing, NaN and inf values"):
        for step in range(b.steps_per_epoch):
            b(step)
    b.close()
    with pytest.raises(ValueError, match="Column 'noise'"):  # the standardisation's pass, before training
        source.scan(DeepEnsemble(2, num_members=1))


@pytest.mark.unit
def test_the_one_pass_moments_are_the_whole_tables_statistics():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10_000, 3, generator=g, dtype=torch.float64) * 1e3 + 1.7e9  # timestamps' scale
    moments = Moments(3)
    for part in x.split(333):
        moments.update(part)
    whole = Standardizer((3,))
    whole.fit(x)
    streamed = Standardizer((3,))
    streamed.fit_moments(moments)
    torch.testing.assert_close(streamed.x_mean, x.mean(0), rtol=1e-15, atol=0)
    torch.testing.assert_close(streamed.x_std, x.std(0, correction=0), rtol=1e-9, atol=0)
    torch.testing.assert_close(streamed.x_range, whole.x_range, rtol=0, atol=0)


@pytest.mark.unit
def test_ray_datas_scheduling_loop_is_paced_only_when_its_steps_return_at_once(monkeypatch):
    from ray_ensembles.on_ray import ray_internals

    clock, sleeps = [100.0], []
    monkeypatch.setattr(ray_internals.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(ray_internals.time, "sleep", sleeps.append)
    paced = ray_internals.PacedExecution()
    paced.on_execution_step(None)  # at once: a spinning loop
    clock[0] += 0.1  # a step that waited on its tasks
    paced.on_execution_step(None)
    assert sleeps == [ray_internals.PacedExecution.PAUSE_S]


# with Ray Data ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_data():
    import ray

    from ray_ensembles.on_ray.ray_internals import quiet_ray_data

    quiet_ray_data("WARNING")
    shared_local_ray()
    return ray.data


def parquet(folder, rows, files=4, seed=0):
    """A folder of `files` Parquet files: y = x0 * x1 + noise, 13 float32 features."""
    g = np.random.default_rng(seed)
    x = g.standard_normal((rows, 13), dtype=np.float32)
    y = x[:, 0] * x[:, 1] + 0.1 * g.standard_normal(rows, dtype=np.float32)
    folder.mkdir()
    data = pa.table({**{f"x{i}": x[:, i] for i in range(13)}, "y": y})
    per = -(-rows // files)
    for k in range(files):
        pq.write_table(data.slice(k * per, per), folder / f"part-{k}.parquet")
    return folder, x, y


@pytest.mark.ray
def test_the_streamed_copy_reads_in_order_without_progress_bars_and_the_users_dataset_is_untouched(ray_data):
    from ray_ensembles.on_ray.ray_internals import PacedExecution, ordered_dataset
    from ray_ensembles.on_ray.streaming import execution_options

    dataset = ray_data.range(10)
    ordered = ordered_dataset(dataset, execution_options())  # Ray's private copy: fails here if it moves
    assert ordered.context is not dataset.context and ordered.context.execution_options.preserve_order
    assert not ordered.context.enable_progress_bars
    assert PacedExecution in ordered.context.execution_callback_classes  # what Ray's planner instantiates
    assert PacedExecution not in dataset.context.execution_callback_classes
    assert ordered.take_all() == dataset.take_all()  # it runs with the callback
    assert dataset.context.enable_progress_bars and ray_data.DataContext.get_current().enable_progress_bars
    assert not ray_data.DataContext.get_current().execution_options.preserve_order


@pytest.mark.ray
def test_a_streamed_table_in_one_window_trains_the_in_memory_members(ray_data, tmp_path, monkeypatch):
    folder, x, y = parquet(tmp_path / "table", 2000)
    options = dict(train_batch_size=50, train_num_epochs=3, train_lr=3e-3, results_folder=tmp_path / "runs")
    streamed, memory = DeepEnsemble(13, num_members=2, seed=1), DeepEnsemble(13, num_members=2, seed=1)
    monkeypatch.setattr(ray_data.DataContext.get_current(), "use_datasource_v2", True)  # Ray's default reader
    trainer = Trainer(streamed, ray_data.read_parquet(str(folder)), target="y", **options)
    trainer.train()
    Trainer(memory, TensorDataset(x, y[:, None]), **options).train()
    assert streamed.feature_names == [f"x{i}" for i in range(13)]
    torch.testing.assert_close(streamed.standardizer.x_mean, memory.standardizer.x_mean, rtol=1e-12, atol=1e-15)
    probe = torch.from_numpy(x[:100])
    torch.testing.assert_close(streamed(probe).mean, memory(probe).mean, rtol=1e-4, atol=1e-5)
    first, last = trainer.history[0]["member_train_loss"], trainer.history[-1]["member_train_loss"]
    assert all(last[m] < first[m] for m in first)  # the loss goes down


@pytest.mark.ray
def test_a_ray_dataset_of_image_tensors_trains_the_in_memory_members(ray_data, tmp_path):
    """Images in Ray Data's tensor type (Parquet as Ray writes it, read back by Ray Data) through
    the streaming path: in one window, the in-memory order, so the in-memory members."""
    from test_images import OPTIONS, classifier, images, tensor_tables

    X, y = images(64)
    pq.write_table(tensor_tables(X.numpy(), y.numpy())["ray"], tmp_path / "images.parquet")
    ds = ray_data.read_parquet(str(tmp_path / "images.parquet"))
    assert type(ds.schema().base_schema.field("image").type).__name__.startswith("ArrowTensorType")

    def train(data, folder, **columns):
        e = classifier()
        Trainer(e, data, train_num_steps=8, results_folder=tmp_path / folder, **OPTIONS, **columns).train()
        return e

    streamed, in_memory = train(ds, "streamed", target="label"), train(TensorDataset(X, y), "memory")
    assert streamed.feature_names == ["image"]
    torch.testing.assert_close(streamed.standardizer.x_std, in_memory.standardizer.x_std)
    for i in range(3):
        for k, v in in_memory.members.member_state(i).items():
            torch.testing.assert_close(streamed.members.member_state(i)[k], v, atol=1e-5, rtol=1e-4, msg=k)
    with pytest.raises(ValueError, match=r"tensor column of the ensemble's input shape \(1, 4, 4\).*"
                                         r"Got \['image'\], inputs of shape \(1, 8, 8\)"):
        Trainer(DeepEnsembleClassifier((1, 4, 4), 2), ds, target="label")
    with pytest.raises(ValueError, match=r"must name dim_in=64 numeric columns. Got \['image'\]"):
        Trainer(DeepEnsembleClassifier(64, 2), ds, target="label")


@pytest.mark.ray
def test_bad_tables_are_refused_naming_the_column_before_training(ray_data, tmp_path):
    folder, x, y = parquet(tmp_path / "table", 400)
    ds = ray_data.read_parquet(str(folder))
    e = DeepEnsemble(13, num_members=1)
    with pytest.raises(ValueError, match="'target' parameter must be a column of the data.*Got 'price'"):
        Trainer(e, ds, target="price")
    with pytest.raises(ValueError, match=r"must name dim_in=13 numeric columns. Got \['x0', 'x1'\], inputs of shape \(2,\)"):
        Trainer(e, ds, target="y", features=["x0", "x1"])
    with pytest.raises(ValueError, match="name the columns of a Ray Dataset"):
        Trainer(e, TensorDataset(x, y), target="y")
    words = ray_data.from_items([{"x": "a", "y": 1.0}])
    with pytest.raises(ValueError, match="Column 'x' must be numeric"):
        Trainer(DeepEnsemble(1), words, target="y", features=["x"])
    with pytest.raises(ValueError, match="Ray Dataset with rows. Got an empty one"):
        Trainer(e, ds.filter(expr="y > 1e9"), target="y")
    nulls = ray_data.from_items([{"x": 1.0, "y": 1.0}, {"x": None, "y": 2.0}])
    trainer = Trainer(DeepEnsemble(1), nulls, target="y", features=["x"], results_folder=tmp_path / "runs")
    with pytest.raises(ValueError, match="Column 'x' must be free of missing, NaN and inf values"):
        trainer.train()
    assert not (tmp_path / "runs").exists()  # nothing written
    labels = ray_data.from_items([{"x": 1.0, "y": 5}])
    with pytest.raises(ValueError, match=r"labels in \[0, 3\)"):
        Trainer(DeepEnsembleClassifier(1, 3), labels, target="y", features=["x"], results_folder=tmp_path).train()


@pytest.mark.ray
def test_memory_does_not_grow_with_the_table(ray_data, tmp_path):
    """Five times the rows, the same peak: the table at 1M rows is 104 MB as float64 (the in-memory
    path's standardising copy), 52 MB of float32 on disk. Blocks of 100,000 rows in both, as a
    folder of files of that size gives (Ray Data would merge small files into larger blocks).
    Each size is measured in a process of its own: in one process, the first run's freed heap
    hides the second's peak."""
    address, peaks = shared_local_ray(), {}
    for rows in (200_000, 1_000_000):
        folder, _, _ = parquet(tmp_path / f"rows-{rows}", rows, files=rows // 100_000)
        measured = subprocess.run([sys.executable, str(Path(__file__).with_name("streamed_peak.py")), address,
                                   str(folder), str(rows // 100_000), str(tmp_path / f"runs-{rows}")],
                                  capture_output=True, text=True, check=True)
        peaks[rows] = int(re.search(r"^peak_bytes=(\d+)$", measured.stdout, flags=re.M)[1])
    assert peaks[1_000_000] < peaks[200_000] + 50e6, peaks
