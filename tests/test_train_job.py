"""jobs/train_ensemble.py: its one-line errors before Ray starts, and a real smoke run."""

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from test_images import tensor_tables
from conftest import REPO, shared_local_ray
from ray_ensembles import DeepEnsemble

import train_ensemble as train_job


@pytest.fixture
def table(tmp_path):
    rng = np.random.default_rng(0)
    data = {"id": np.arange(50), "a": rng.normal(size=50), "b": rng.normal(size=50),
            "name": [f"row{i}" for i in range(50)], "label": rng.integers(0, 3, 50)}
    data["y"] = data["a"] * 2 + rng.normal(size=50) * 0.1
    path = tmp_path / "table.parquet"
    pq.write_table(pa.table(data), path)
    with_nan = dict(data, b=np.where(np.arange(50) == 7, np.nan, data["b"]))
    pq.write_table(pa.table(with_nan), tmp_path / "nan.parquet")
    (tmp_path / "table.csv").write_text("a,y\n1,2\n3,4\n")
    (tmp_path / "parts").mkdir()
    pq.write_table(pa.table(data), tmp_path / "parts" / "part-0.parquet")
    (tmp_path / "mixed").mkdir()  # two files that disagree on the type of column 'a'
    pq.write_table(pa.table({"a": np.arange(50), "y": data["y"]}), tmp_path / "mixed" / "part-0.parquet")
    pq.write_table(pa.table({"a": data["a"], "y": data["y"]}), tmp_path / "mixed" / "part-1.parquet")
    images = rng.random((20, 1, 4, 4))
    np.savez(tmp_path / "images.npz", X=images, y=rng.integers(0, 2, 20))
    np.savez(tmp_path / "no_y.npz", X=images)
    return path


CASES = [
    ("missing file", ["--data", "{tmp}/nope.parquet", "--target", "y"], "does not exist"),
    ("unsupported URI scheme", ["--data", "foo://bucket/t.parquet", "--target", "y"], "URI that pyarrow.fs supports"),
    ("no target", ["--data", "{table}"], "'--target' option is required"),
    ("unknown target", ["--data", "{table}", "--target", "price"], "'target'.*Got 'price'"),
    ("unknown feature", ["--data", "{table}", "--target", "y", "--features", "a,zz"], "Got 'zz'"),
    ("text feature", ["--data", "{table}", "--target", "y", "--features", "a,name"], "'name' must be numeric"),
    ("NaN in data", ["--data", "{tmp}/nan.parquet", "--target", "y"], "'b' must be free of missing"),
    ("non-integer labels", ["--data", "{table}", "--target", "y", "--task", "classification"], "integer class labels"),
    ("more workers than members", ["--num-members", "2", "--num-workers", "3"], "'--num-workers'.*Got 3"),
    ("zero members", ["--num-members", "0"], "'num_members'.*Got 0"),
    ("negative eps", ["--adversarial-eps", "-0.1"], "'adversarial_eps'.*-0.1"),
    ("resume without name", ["--resume"], "'--resume' option needs the '--name'"),
    ("bad validation fraction", ["--data", "{table}", "--target", "y", "--validation-fraction", "1.5"], "'fraction'"),
    ("unreadable file", ["--data", "{tmp}/table.csv.parquet", "--target", "y"], "could not be read"),
    ("features include the target", ["--data", "{table}", "--target", "y", "--features", "a,y"],
     "distinct columns other than the target 'y'"),
    ("negative epochs", ["--epochs", "-1"], "'train_num_epochs'.*Got -1"),
    ("zero batch size", ["--batch-size", "0"], "'train_batch_size'.*Got 0"),
    ("zero batch size of a table", ["--data", "{table}", "--target", "y", "--batch-size", "0"],
     "'train_batch_size'.*Got 0"),
    ("zero learning rate", ["--lr", "0"], "'train_lr'.*Got 0"),
    ("EMA decay 1", ["--ema-decay", "1"], "'ema_decay'.*Got 1.0"),
    ("zero save_every", ["--save-every", "0"], "'save_every'.*Got 0"),
    ("zero CPUs a worker", ["--cpus-per-worker", "0"], "'--cpus-per-worker'.*Got 0"),
    ("output a file", ["--output", "{table}"], "'--output' option must be a folder.*a file"),
    ("output inside the data folder", ["--data", "{tmp}/parts", "--target", "y", "--output", "{tmp}/parts/out"],
     "Refusing to write an ensemble.*inside the input"),
    ("output holds another folder", ["--output", "{tmp}/mine"], "Refusing to write an ensemble.*not an ensemble"),
    ("streaming without data", ["--streaming"], "'--streaming' option reads the table in --data"),
    ("streaming with a validation fraction", ["--data", "{table}", "--target", "y", "--streaming",
                                              "--validation-fraction", "0.2"], "'--validation-fraction'.*with --streaming"),
    ("streaming labels without classes", ["--data", "{table}", "--target", "label", "--task", "classification",
                                          "--streaming"], "'--num-classes' option is required"),
    ("streaming NaN", ["--data", "{tmp}/nan.parquet", "--target", "y", "--streaming"], "'b' must be free of missing"),
    ("unknown MLflow scheme", ["--mlflow-tracking-uri", "foo://nowhere"], "'--mlflow-tracking-uri' option.*foo://"),
    ("TensorBoard folder a file", ["--tensorboard-dir", "{table}"], "'--tensorboard-dir' option.*a file"),
    ("files disagree on a type", ["--data", "{tmp}/mixed", "--target", "y"],
     "column 'a' is int64 in part-0.parquet but double in part-1.parquet"),
    ("streamed files disagree on a type", ["--data", "{tmp}/mixed", "--target", "y", "--streaming"],
     "column 'a' is int64 in part-0.parquet but double in part-1.parquet"),
    ("zero shuffle buffer", ["--shuffle-buffer-rows", "0"], "'shuffle_buffer_rows'.*Got 0"),
    ("factory module missing", ["--member-factory", "no_such_module:cnn"],
     "'--member-factory' option names a module that does not import .*No module named 'no_such_module'"),
    ("factory not module:function", ["--member-factory", "cnn"], "'--member-factory' option must be module:function"),
    ("factory function missing", ["--member-factory", "json:no_such_function"], "'--member-factory' option names a function"),
    ("factory builds the wrong network", ["--data", "{tmp}/images.npz", "--task", "classification",
                                          "--member-factory", "launched_train:small_cnn"],
     r"'member_factory' .* taking inputs \(B, 1, 4, 4\)"),
    ("augmentation unknown", ["--augment", "rotate"], "'--augment' option must be crop"),
    ("augmentation of a table", ["--data", "{table}", "--target", "y", "--augment", "crop"],
     r"'augment' parameter of Trainer must be a transform.*\(B, 4\)"),
    ("arrays with a target", ["--data", "{tmp}/images.npz", "--target", "y"], "'--target'.* are for tables"),
    ("arrays without y", ["--data", "{tmp}/no_y.npz"], r"must hold the arrays \['X', 'y'\]"),
]


@pytest.mark.unit
@pytest.mark.parametrize("case, argv, message", CASES, ids=[c[0] for c in CASES])
def test_bad_options_exit_with_one_line_before_ray_starts(case, argv, message, table, tmp_path, capsys,
                                                          ray_must_not_start):
    (tmp_path / "table.csv.parquet").write_text("not parquet")
    (tmp_path / "mine" / "ensemble").mkdir(parents=True)
    (tmp_path / "mine" / "ensemble" / "notes.txt").write_text("mine")
    argv = ["--output", str(tmp_path / "out")] + [a.format(tmp=tmp_path, table=table) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        train_job.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    import re
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()
    assert (tmp_path / "mine" / "ensemble" / "notes.txt").read_text() == "mine"
    assert [p.name for p in (tmp_path / "parts").iterdir()] == ["part-0.parquet"]


@pytest.mark.unit
def test_table_columns_become_named_features(table):
    from ray_ensembles.loop.data import read_table, table_to_dataset
    ds = table_to_dataset(read_table(str(table)), "y")
    assert ds.feature_names == ["id", "a", "b", "label"]  # numeric columns other than the target
    ds = table_to_dataset(read_table(f"file://{table}"), "label", ["a", "b"], task="classification")
    assert ds.y.dtype.is_floating_point is False and ds.X.shape == (50, 2)


def run_job(*argv, ray_address=""):
    """The job with --smoke-test, on its own local Ray or the one at `ray_address`."""
    env = dict(os.environ, RAY_ADDRESS=ray_address)
    env.pop("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", None)  # as a user has it: the job sets its own
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "train_ensemble.py"), "--smoke-test", *argv],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.ray
def test_smoke_run_trains_saves_and_plots_and_prints_a_short_readable_console(tmp_path):
    shared_local_ray()  # another Ray on the machine, beside the one the job starts: Ray Train's own
    out = tmp_path / "out"  # placement-group cleaner then fails to tell them apart, off the console
    proc = run_job("--output", str(out))
    console = proc.stdout + proc.stderr
    lines = [line.split("\r")[-1] for line in console.splitlines()]  # a bar's redraws share its line
    assert len(lines) <= 40, console
    for dump in ("Reporting training result", "TrainingReport", "metrics={", "PreemptionWatcher",
                 "Failed to kill actor", "Traceback"):
        assert dump not in console, console
    assert proc.stdout.splitlines()[-1].startswith("saved the ensemble to ")
    assert any(line.startswith("Ray at ") and "CPUs" in line for line in lines)
    assert "training 2 members for 5 steps on 2 Ray Train workers (1 CPU each): 0 | 1" in lines
    bar = [line for line in lines if line.startswith("training: 100%")]
    assert bar and "10/10" in bar[-1] and "val_nll=" in bar[-1]  # 2 members x 5 steps, with validation
    assert "ensemble: val_nll" in proc.stdout
    assert (out / "toy.png").stat().st_size > 10_000
    metrics = json.loads((out / "metrics.json").read_text())
    assert sorted(metrics["metrics"]["members"]) == ["0", "1"]
    assert np.isfinite(metrics["metrics"]["val_nll"])
    assert DeepEnsemble.load(out / "ensemble").num_members == 2


@pytest.mark.ray
def test_a_streamed_table_trains_on_every_row_with_a_quiet_console(table, tmp_path):
    out = tmp_path / "out"
    proc = run_job("--data", str(table), "--target", "y", "--features", "a,b", "--streaming", "--num-workers", "2",
                   "--output", str(out), ray_address=shared_local_ray())
    console = proc.stdout + proc.stderr
    for noise in ("Starting execution", "execution finished", "Progress bars disabled", "Traceback", " nan "):
        assert noise not in console, console
    # two workers on this 2-CPU Ray share the CPU left after Ray Data's
    assert ("training 2 members for 5 steps on 2 Ray Train workers (0.5 CPU each; 1 CPU left to reading the "
            "table): 0 | 1") in console, console
    assert "ensemble: no validation rows (--streaming trains on every row)" in proc.stdout
    loaded = DeepEnsemble.load(out / "ensemble")
    assert loaded.feature_names == ["a", "b"]
    manifest = json.loads((out / "ensemble" / "manifest.json").read_text())
    column = pq.read_table(table).column("a").to_numpy()
    assert manifest["normalization"]["x_mean"][0] == pytest.approx(column.mean(), rel=1e-12)  # from all 50 rows


@pytest.mark.ray
def test_a_classification_table_prints_one_json_object_and_the_trackers_hold_the_run(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from ray_ensembles import DeepEnsembleClassifier

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # for this reader; the job opts in itself
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=300), rng.normal(size=300)
    pq.write_table(pa.table({"a": a, "b": b, "label": (a > 0).astype(np.int64) + (b > 0).astype(np.int64)}),
                   tmp_path / "t.parquet")
    out = tmp_path / "out"
    env = dict(os.environ, RAY_ADDRESS=shared_local_ray())
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "train_ensemble.py"), "--data", str(tmp_path / "t.parquet"),
                           "--target", "label", "--task", "classification", "--num-members", "2", "--epochs", "15",
                           "--lr", "0.01", "--output", str(out), "--json", "--name", "table-run",
                           "--mlflow-tracking-uri", str(tmp_path / "mlruns"), "--tensorboard-dir", str(tmp_path / "tb")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)  # nothing else on stdout
    assert sorted(result["metrics"]["members"]) == ["0", "1"] and result["metrics"]["val_accuracy"] > 0.8
    assert "training:" not in proc.stderr  # no bar either
    assert DeepEnsembleClassifier.load(out / "ensemble").feature_names == ["a", "b"]
    client = MlflowClient((tmp_path / "mlruns").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("ray_ensembles").experiment_id])
    assert run.info.run_name == "table-run" and run.data.params["num_workers"] == "2"
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 15  # one per epoch
    assert client.get_metric_history(run.info.run_id, "val_nll")[-1].value == pytest.approx(result["metrics"]["val_nll"])
    assert run.data.tags["ensemble_path"] == result["checkpoint"]
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


@pytest.mark.ray
def test_ctrl_c_stops_with_one_line_whose_command_resumes_the_run(tmp_path):
    import shlex
    import signal
    import time

    out = tmp_path / "out"
    env = dict(os.environ, RAY_ADDRESS=shared_local_ray())
    argv = ["--num-members", "2", "--epochs", "1500", "--save-every", "100", "--output", str(out), "--quiet"]
    job = subprocess.Popen([sys.executable, "jobs/train_ensemble.py", *argv], cwd=REPO, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(out.glob("runs/*/checkpoint_*")):  # interrupted once it has a checkpoint
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()
        time.sleep(0.2)
    job.send_signal(signal.SIGINT)
    stdout, stderr = job.communicate(timeout=120)
    assert job.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stdout + stderr and not (out / "ensemble").exists()
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("error: interrupted: the run's checkpoints so far are in "), stderr[-3000:]
    command = shlex.split(line.split("resume with: ", 1)[1])
    assert command[-3:-1] == ["--name", command[-2]] and command[-1] == "--resume"
    resumed = subprocess.run([sys.executable, *command[1:]], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert DeepEnsemble.load(out / "ensemble").num_members == 2
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert history[0]["step"] > 100  # the resumed run began after the checkpoint, not at step 0


@pytest.mark.unit
@pytest.mark.parametrize("job", ["train_ensemble", "tune_ensemble", "predict", "serve"])
def test_a_jobs_help_imports_neither_torch_nor_ray(job):
    probe = (f"import runpy, sys; sys.argv = ['{job}.py', '--help']\n"
             f"try:\n    runpy.run_path('jobs/{job}.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(REPO / "jobs")))
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.unit
def test_a_second_run_writing_the_same_output_is_refused_while_the_first_holds_it(tmp_path, capsys,
                                                                                ray_must_not_start):
    from common import exclusive_output  # jobs/common.py

    out = tmp_path / "out"
    with exclusive_output(out):  # a first run, writing
        with pytest.raises(SystemExit) as exit_info:
            train_job.main(["--output", str(out), "--smoke-test"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "'--output' option names a folder another run is writing now" in err, err
        assert [p.name for p in out.iterdir()] == [".ray_ensembles.lock"]  # the second wrote nothing
    assert not out.exists()  # the first made the folder and left it empty: removed


@pytest.mark.unit
def test_a_ray_that_does_not_start_is_tried_once_more_then_one_line(monkeypatch, capsys):
    import ray

    import common  # jobs/common.py

    calls = []

    def times_out(**options):
        calls.append(options)
        raise Exception("The current node timed out during startup. This could happen because ...")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(ray, "init", times_out)
    args = train_job.parse_args([])
    with pytest.raises(SystemExit) as exit_info:
        common.start_ray(args)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 1 and len(calls) == 2 and "\n" not in err
    assert err.startswith("error: Ray did not start on this machine: The current node timed out"), err


@pytest.mark.ray
def test_images_in_an_npz_file_train_with_a_member_factory_and_augmentation_then_predict(tmp_path, monkeypatch, capsys):
    """The placement tests' image workload through the jobs: the train job (factory importable
    from its working directory), then the prediction job on the same .npz file."""
    import launched_train
    import predict as predict_job
    import ray

    np.savez(tmp_path / "images.npz", X=launched_train.X.numpy(), y=launched_train.Y[:, 0].numpy())
    out = tmp_path / "out"
    monkeypatch.chdir(REPO / "tests")  # the factory's module is importable from the working directory
    monkeypatch.setenv("RAY_ADDRESS", shared_local_ray())
    # A job run as a process calls ray.init in its working directory, which Ray puts on its workers'
    # sys.path; the shared Ray was started from another one, so its workers get the module by value.
    ray.cloudpickle.register_pickle_by_value(launched_train)
    train_job.main(["--data", str(tmp_path / "images.npz"), "--member-factory", "launched_train:small_cnn",
                    "--augment", "crop=1,flip", "--optimizer", "sgd", "--nesterov", "--lr", "0.01", "--num-members", "2",
                    "--epochs", "2", "--output", str(out), "--json"])
    assert sorted(json.loads(capsys.readouterr().out)["metrics"]["members"]) == ["0", "1"]
    ensemble = DeepEnsemble.load(out / "ensemble", member_factory=launched_train.small_cnn)
    assert ensemble.input_shape == (2, 4, 4) and ensemble.config["member_factory"] == "launched_train:small_cnn"
    predict_job.main(["--ensemble", str(out / "ensemble"), "--data", str(tmp_path / "images.npz"),
                      "--output", str(tmp_path / "predictions"), "--member-factory", "launched_train:small_cnn"])
    predictions = pq.read_table(tmp_path / "predictions").to_pandas()
    assert (predictions["row"].to_numpy() == np.arange(150)).all()
    expected = ensemble.predict(launched_train.X).mean[:, 0].numpy()
    np.testing.assert_allclose(predictions["mean"], expected, rtol=1e-5, atol=1e-6)
    # the same images as a Parquet tensor column, as Ray Data writes one
    pq.write_table(tensor_tables(launched_train.X.numpy(), np.arange(150))["ray"], tmp_path / "images.parquet")
    predict_job.main(["--ensemble", str(out / "ensemble"), "--data", str(tmp_path / "images.parquet"),
                      "--output", str(tmp_path / "from_table"), "--member-factory", "launched_train:small_cnn",
                      "--features", "image"])  # trained on arrays, the ensemble knows no column names
    predictions = pq.read_table(tmp_path / "from_table").to_pandas()
    assert (predictions["label"].to_numpy() == np.arange(150)).all()  # the table's other columns kept
    np.testing.assert_allclose(predictions["mean"], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.unit
@pytest.mark.parametrize("streaming", [False, True])
def test_a_parquet_tensor_column_builds_an_image_ensemble(streaming, tmp_path):
    X = np.random.default_rng(0).random((40, 1, 8, 8), dtype=np.float32)
    pq.write_table(tensor_tables(X, np.arange(40) % 2)["canonical"], tmp_path / "images.parquet")
    argv = ["--data", str(tmp_path / "images.parquet"), "--target", "label", "--task", "classification",
            "--output", str(tmp_path / "out")] + (["--streaming", "--num-classes", "2"] if streaming else [])
    ensemble, train, _ = train_job.build(train_job.parse_args(argv))
    assert ensemble.input_shape == (1, 8, 8) and train.feature_names == ["image"]
    assert np.array_equal(train.X[:3].numpy(), X[:3]) if streaming else train.X.shape[1:] == (1, 8, 8)
