"""benchmarks/benchmark_uci.py: the protocol's units and statistics, and a quick real run."""

import csv
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from benchmarks import benchmark_uci as bench
from conftest import REPO, require_data, shared_local_ray
from ray_ensembles import DeepEnsemble, FitResult, Trainer

CFG = {"num_members": 2, "hidden_dim": 16, "epochs": 5, "batch_size": 20, "lr": 1e-2, "seed": 0,
       "adversarial_eps": 0.0, "tuned": False, "nll_beta": 0.0, "lr_schedule": "constant", "hyper": False}


def fit_here(jobs, folder):
    """The benchmark's `fit`, in this process: what fit_many does on each actor."""
    results = {}
    for key, job in jobs.items():
        trainer = Trainer(**job, results_folder=folder / "-".join(map(str, key)))
        trainer.train()
        results[key] = FitResult(key, trainer.ensemble, trainer.metrics, trainer.history, None, 1, 0.0)
    return results


def run_split(arrays, folder, cfg=CFG):
    return bench.run_splits({("s", 0): arrays}, cfg, lambda jobs: fit_here(jobs, folder))[0]


def synthetic(n=120, scale=1.0, shift=0.0, constant_column=False):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 3))
    if constant_column:
        x[:, 2] = 7.0
    y = x[:, 0] - 2 * x[:, 1] + 0.3 * rng.normal(size=n)
    data = np.column_stack([x, scale * y + shift])
    return data, [0, 1, 2], 3, (np.arange(100), np.arange(100, n))


@pytest.mark.unit
def test_scores_are_in_original_units_as_a_hand_computation_says(tmp_path):
    """Standardising makes y and 1000 y + 5 the same problem: RMSE scales by 1000 and the NLL
    shifts by exactly log(1000) (NLL_original = NLL_standardised + log std_y)."""
    small = run_split(synthetic(), tmp_path / "small")
    large = run_split(synthetic(scale=1000.0, shift=5.0), tmp_path / "large")
    assert large["rmse"] == pytest.approx(1000 * small["rmse"], rel=1e-4)
    assert large["nll"] - small["nll"] == pytest.approx(math.log(1000), abs=1e-4)
    assert large["nll_mixture"] - small["nll_mixture"] == pytest.approx(math.log(1000), abs=1e-4)


@pytest.mark.unit
def test_the_hyper_column_selects_on_validation_rows_carved_from_the_training_rows(monkeypatch, tmp_path):
    seen = []
    original = bench.greedy_selection
    monkeypatch.setattr(bench, "greedy_selection", lambda log_lik, size: (seen.append(tuple(log_lik.shape)), original(log_lik, size))[1])
    cfg = dict(CFG, hyper=True, hyper_samples=3, hyper_seeds=2, hyper_size=4, hyper_refit=True)
    monkeypatch.setattr(bench, "HYPER_SPACE", dict(bench.HYPER_SPACE, epochs=(3, 5), hidden_dim=(8, 16)))
    fitted = {}

    def fit(jobs):  # records each job's rows and its members' initial weights
        fitted.update({key: (len(job["dataset"]), [job["ensemble"].members.member_state(m)["weights.0"].clone()
                                                   for m in range(job["ensemble"].num_members)])
                       for key, job in jobs.items()})
        return fit_here(jobs, tmp_path)

    row = bench.run_splits({("s", 0): synthetic()}, cfg, fit)[0]
    assert seen == [(6, 20)]  # 3 configurations x 2 members, scored on 20 of the 100 training rows
    assert len(row["hyper_widths"].split("/")) == 4 and set(row["hyper_widths"].split("/")) <= {"8", "16"}
    assert all(math.isfinite(row[k]) for k in ("hyper_nll", "hyper_rmse", "hyper_cal_nll")) and row["hyper_variance_scale"] > 0
    refits = [key for key in fitted if "refit" in key]
    assert 1 <= len(refits) <= 4 and all(fitted[key][0] == 100 for key in refits)  # all the training rows
    for key in refits:  # each from the initialisation of the member it retrains
        t, i = key[-2:]
        assert torch.equal(fitted[key][1][0], fitted[("s", 0, "hyper", t)][1][i])
    assert all(math.isfinite(row[k]) for k in ("hyper_refit_nll", "hyper_refit_cal_nll"))
    assert 0 <= row["hyper_refit_conformal_coverage_90"] <= 1 and row["hyper_refit_conformal_width_90"] > 0


@pytest.mark.unit
def test_standardisation_uses_the_training_rows_only(monkeypatch, tmp_path):
    seen = []
    original = DeepEnsemble.fit_normalization
    monkeypatch.setattr(DeepEnsemble, "fit_normalization",
                        lambda self, x, y=None: (seen.append((len(x), float(x[:, 0].mean()))), original(self, x, y))[1])
    data, features, target, (train, test) = synthetic()
    data[test, 0] += 1e4  # test rows far away: using them would move the statistics
    run_split((data, features, target, (train, test)), tmp_path)
    assert seen == [(100, pytest.approx(float(data[train, 0].mean()), rel=1e-5))]


@pytest.mark.unit
def test_a_constant_feature_gives_finite_scores(tmp_path):
    row = run_split(synthetic(constant_column=True), tmp_path)
    assert all(math.isfinite(row[k]) for k in ("rmse", "nll", "nll_mixture"))


@pytest.mark.unit
def test_summary_has_std_and_standard_error():
    rows = [{"rmse": v, "nll": v, "nll_mixture": v} for v in (1.0, 2.0, 3.0, 4.0)]
    s = bench.summarize(rows)
    assert s["nll_mean"] == 2.5 and s["nll_std"] == pytest.approx(np.std([1, 2, 3, 4], ddof=1))
    assert s["nll_stderr"] == pytest.approx(s["nll_std"] / 2)


@pytest.mark.unit
def test_energys_target_is_column_8():
    data, features, target, splits = bench.load_uci(require_data("uci", "energy"))
    assert target == 8 and features == list(range(8)) and data.shape == (768, 9) and len(splits) == 20
    train, test = splits[0]
    assert not set(train) & set(test) and len(train) + len(test) == 768


@pytest.mark.parametrize("argv, message", [
    (["--data-dir", "/nonexistent"], "'--data-dir'"),
    (["--datasets", "bostonHousing,atlantis"], "'--datasets'.*atlantis"),
    (["--splits", "0"], "'--splits'.*Got 0"),
    (["--epochs", "0"], "'--epochs'.*Got 0"),
])
@pytest.mark.unit
def test_bad_options_exit_with_one_line(argv, message, capsys):
    if "--data-dir" not in argv:
        argv = ["--data-dir", str(require_data("uci"))] + argv
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err
    import re
    assert re.search(message, err), err


@pytest.mark.ray
def test_a_quick_run_writes_the_table(tmp_path):
    require_data("uci", "bostonHousing")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.benchmark_uci", "--datasets",
                           "bostonHousing,yacht", "--splits", "2", "--epochs", "3", "--num-workers", "2",
                           "--output", str(tmp_path)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, RAY_ADDRESS=shared_local_ray()), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "uci.csv").open()))
    assert [r["dataset"] for r in rows] == ["bostonHousing", "yacht"]
    assert list(rows[0])[:10] == ["dataset", "n_splits", "rmse_mean", "rmse_std", "rmse_stderr",
                                  "nll_mean", "nll_std", "nll_stderr", "nll_mixture_mean", "nll_mixture_std"]
    assert "worker_s" in rows[0] and all(r["n_splits"] == "2" for r in rows)
    assert all(math.isfinite(float(r[k])) for r in rows for k in ("rmse_mean", "nll_mean", "nll_stderr"))
    # original units: Boston's RMSE is in $1000s (a few), not standardised units (below 1)
    assert 1.5 < float(rows[0]["rmse_mean"]) < 15
    table = (tmp_path / "uci.md").read_text()
    assert "| Boston | 2 |" in table and "2.41 ± 0.25" in table


@pytest.mark.unit
def test_the_synthetic_hard_regime_is_the_plant_it_describes():
    (data, features, target, splits), noise = bench.synthetic_hard_regime()
    x, y = data[:, features], data[:, target]
    assert data.shape == (20_000, 17) and target == 16 and len(splits) == 5
    assert x[:, 12].std() == 0 and 0 < x[:, 13].std() < 1e-11 and 0 < x[:, 14].std() < 1e-6
    assert set(np.unique(x[:, 15])) == {0.0, 1.0} and x[:, 15].mean() < 0.01   # the rare flag
    assert x[:, :12].std(0).max() / x[:, :12].std(0).min() > 1e4                 # std 0.04 to 1,000
    assert noise == pytest.approx(0.01 * y.std(), rel=0.01)                     # 1% of the target's std
    for train, test in splits:
        assert len(test) == 2000 and not set(train) & set(test) and len(train) + len(test) == 20_000


@pytest.mark.unit
def test_the_default_rate_follows_the_runs_length():
    from ray_ensembles.loop.training import horizon_lr
    assert [horizon_lr(s) for s in (120, 200, 800, 20_000)] == pytest.approx([0.1, 0.1, 0.05, 0.01])
    options = lambda rows: bench.trainer_options(dict(CFG, lr=None, epochs=40, batch_size=100), rows)
    assert options(455)["train_lr"] == 0.1   # Boston: 200 steps
    assert options(7373)["train_lr"] == pytest.approx(0.0260, abs=1e-4)


@pytest.mark.unit
def test_the_tuned_column_takes_the_rate_and_length_of_the_best_validation_report(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "TUNED_MAX_EPOCHS", 40)
    monkeypatch.setattr(bench, "TUNED_EVAL_EVERY", 10)
    fits = []
    row = bench.run_splits({("s", 0): synthetic()}, dict(CFG, tuned=True),
                           lambda jobs: fits.append(fit_here(jobs, tmp_path / str(len(fits)))) or fits[-1])[0]
    search, final = fits
    reports = [(entry["val_nll"], key[2], entry["epoch"] + 1) for key, result in search.items() if len(key) == 3
               for entry in result.history if "val_nll" in entry]
    assert len(reports) == 2 * 4  # two rates, a report every 10 of 40 epochs
    best = min(reports)
    assert (row["tuned_lr"], row["tuned_epochs"]) == best[1:]
    [job] = [r for r in final.values()]
    assert job.ensemble.num_members == CFG["num_members"] and len(job.history) == best[2]  # one entry per epoch
    assert all(math.isfinite(row[f"tuned_{k}"]) for k in ("rmse", "nll", "nll_mixture"))
