"""benchmarks/benchmark_mnist.py: bad data files, and a smoke run on a small MNIST subset."""

import csv
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import benchmark_mnist as bench
from conftest import REPO, require_data, shared_local_ray
from ray_ensembles import DeepEnsembleClassifier


def npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


@pytest.fixture
def files(tmp_path):
    images = np.zeros((20, 28, 28), np.uint8)
    return {
        "good": npz(tmp_path / "good.npz", x_train=images, y_train=np.arange(20) % 10, x_test=images, y_test=np.arange(20) % 10),
        "bad_labels": npz(tmp_path / "labels.npz", x_train=images, y_train=np.arange(20) + 0.5, x_test=images, y_test=np.arange(20) % 10),
        "out_of_range": npz(tmp_path / "range.npz", x_train=images, y_train=np.arange(20), x_test=images, y_test=np.arange(20) % 10),
        "small_images": npz(tmp_path / "small.npz", x_train=np.zeros((20, 14, 14)), y_train=np.arange(20) % 10,
                            x_test=np.zeros((20, 14, 14)), y_test=np.arange(20) % 10),
        "no_x_test": npz(tmp_path / "ood.npz", images=images),
    }


@pytest.mark.parametrize("argv, message", [
    (["--data", "{bad_labels}"], r"labels y_train .* integers in \[0, 10\). Got dtype float64"),
    (["--data", "{out_of_range}"], r"labels y_train .* range \[0, 19\]"),
    (["--data", "{small_images}"], r"must be 28x28 to match dim_in=784. Got shape \(20, 14, 14\)"),
    (["--data", "{good}", "--ood-data", "{no_x_test}"], r"has no 'x_test' array"),
    (["--data", "{good}", "--variants", "plain,fancy"], r"'--variants'.*plain,fancy"),
    (["--data", "{good}", "--num-members", "0,5"], r"'--num-members'"),
])
@pytest.mark.unit
def test_bad_data_and_options_exit_with_one_line(argv, message, files, tmp_path, capsys):
    argv = [a.format(**files) for a in argv] + ["--output", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err and re.search(message, err), err
    assert not (tmp_path / "out").exists()


@pytest.mark.ray
def test_smoke_run_on_a_small_mnist_subset(tmp_path):
    require_data("mnist", "mnist.npz")
    require_data("notmnist", "notmnist_test10k.npz")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.benchmark_mnist", "--smoke-test",
                           "--variants", "adversarial", "--num-members", "1,2", "--cnn-rows", "cnn_crop",
                           "--num-workers", "1",  # both members stacked on one worker: one worker process to start
                           "--output", str(tmp_path)],
                          capture_output=True, text=True, timeout=400, env=dict(os.environ, RAY_ADDRESS=shared_local_ray()), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "mnist.csv").open()))
    assert list(rows[0]) == ["variant", "num_members", "error", "nll", "brier", "ece", "auroc_entropy", "auroc_mi"]
    assert [(r["variant"], r["num_members"]) for r in rows] == [("adversarial", "1"), ("adversarial", "2"), ("cnn_crop", "2")]
    pair = rows[1]
    assert float(pair["error"]) < 0.3                     # 5000 images, 3 epochs: far better than chance (0.9)
    assert float(pair["auroc_entropy"]) > 0.5 and float(pair["auroc_mi"]) > 0.5  # NotMNIST is told apart
    for name in ("metrics_vs_m.png", "entropy_histograms.png", "accuracy_vs_confidence.png"):
        assert (tmp_path / name).stat().st_size > 5000
    report = (tmp_path / "mnist.md").read_text()
    assert "| adversarial | 2 |" in report and "tau=0.9" in report
    assert DeepEnsembleClassifier.load(tmp_path / "adversarial_ensemble").num_members == 2
