"""Hyper-deep ensembles (Wenzel et al., 2020): members that differ in their hyperparameters as well
as their seeds, picked from a sweep's trials by greedy selection on validation rows (`selection`)
and combined without retraining (`ensemble.combine`)."""

from __future__ import annotations

import torch

from .loop.data import TensorDataset
from .many import fit_many
from .model.ensemble import combine, load_ensemble
from .model.selection import greedy_selection, mixture_nll
from .model.validation import check_int, check_type
from .sweep import grid_size, canonical_options, normalize_param_space, split_options, tune_ensemble


def hyper_ensemble(dataset: TensorDataset, param_space: dict, *, size: int = 5, num_samples: int = 10,
                   seeds_per_config: int = 1, replacement: bool = True, calibrate: bool = False, refit: bool = False,
                   task: str = "regression", validation_dataset: TensorDataset | None = None,
                   validation_fraction: float = 0.2, ensemble_options: dict | None = None, seed: int = 0,
                   **sweep_options):
    """A hyper-deep ensemble (Wenzel et al., 2020): a Tune sweep trains `num_samples` draws of
    `param_space` (its grid repeated, its distributions sampled), each `seeds_per_config`
    stacked members with a seed of its own; greedy selection (with `replacement`, by default)
    picks `size` of all those members by the mixture's NLL on the validation rows (a
    `validation_fraction` of `dataset`'s rows unless `validation_dataset`: never test rows); the
    chosen members are combined from the trials' saved ensembles, without retraining, each with
    its trial's swept values in `member_configs[i]["hyperparameters"]`. With `refit`, each chosen
    member is trained again, from the same initialisation, on all the rows (training and
    validation; `fit_many`). `calibrate` fits the variance scale (or temperature) on the
    validation rows, to the members that did not train on them (with `refit`, the scale fitted
    before the refit is kept). Other options go to `tune_ensemble` (`trainer_options`,
    `storage_path`, `trial_training`, ...). The returned ensemble's `selection` holds each chosen
    member's trial and the validation NLLs.
    """
    from ray import tune

    owner = "hyper_ensemble"
    size = check_int(owner, "size", size, minimum=1)
    num_samples = check_int(owner, "num_samples", num_samples, minimum=1)
    seeds_per_config = check_int(owner, "seeds_per_config", seeds_per_config, minimum=1)
    ensemble_options = dict(ensemble_options or {})
    if "num_members" in (param_space or {}) or "num_members" in ensemble_options:
        raise ValueError(f"The 'param_space' of {owner} must not set num_members: each configuration trains "
                         f"'seeds_per_config' members. Got {param_space!r}, {ensemble_options!r} instead.")
    space = normalize_param_space(param_space, task)  # an empty or unknown space fails here
    candidates = grid_size(space) * num_samples * seeds_per_config
    if not replacement and size > candidates:
        raise ValueError(f"The 'size' parameter of {owner} must be at most the {candidates} members the sweep "
                         f"trains when chosen without replacement. Got {size} instead.")
    check_type(owner, "dataset", dataset, TensorDataset, "a TensorDataset")
    if validation_dataset is None:
        dataset, validation_dataset = dataset.split(validation_fraction, seed=seed)
    result = tune_ensemble(dataset, {**param_space, "seed": tune.randint(0, 2**31 - 1)}, task=task,
                           validation_dataset=validation_dataset, num_samples=num_samples, seed=seed,
                           ensemble_options={**ensemble_options, "num_members": seeds_per_config}, **sweep_options)
    trials = [row for row in result.table if row.get("val_nll") is not None]
    ensembles = [load_ensemble(row["ensemble_path"]) for row in trials]
    log_lik = torch.cat([e.evaluate_members(validation_dataset.X, validation_dataset.y)[0] for e in ensembles])
    if not replacement and size > len(log_lik):
        raise RuntimeError(f"{owner}: only {len(log_lik)} members finished training; {size} were asked for "
                           f"without replacement. Failed trials: {[r['error'] for r in result.table if r['error']]}")
    chosen = greedy_selection(log_lik, size, replacement=replacement)
    members = [(t, i) for t, e in enumerate(ensembles) for i in range(e.num_members)]
    picks = [members[c] for c in chosen]
    swept = [k for k in space if k != "seed"] + ["seed"]
    hyper = combine([ensembles[t].subset([ensembles[t].member_ids[i]]) for t, i in picks],
                    [{k: trials[t][k] for k in swept} for t, _ in picks])
    selection = {"trials": [trials[t]["trial_id"] for t, _ in picks], "val_nll": mixture_nll(log_lik, chosen),
                 "best_single_trial_val_nll": trials[0]["val_nll"], "candidates": len(log_lik)}
    if calibrate:
        fitted = hyper.calibrate(validation_dataset.X, validation_dataset.y)
        selection["calibrated_val_nll"] = fitted["val_nll_after"]
    if refit:
        everything = TensorDataset(torch.cat([dataset.X, validation_dataset.X]),
                                   torch.cat([dataset.y, validation_dataset.y]), feature_names=dataset.feature_names)
        fixed = {**canonical_options(ensemble_options, task, "ensemble_options"),
                 **canonical_options(dict(sweep_options.get("trainer_options") or {}), task, "trainer_options")}
        jobs = {}
        for t, i in dict.fromkeys(picks):  # a member chosen twice trains once
            kwargs, trainer_kwargs = split_options({**fixed, **{k: trials[t][k] for k in swept}}, task)
            part = ensembles[t]
            outputs = {"dim_out": part.dim_out} if task == "regression" else {"num_classes": part.num_classes}
            member = type(part)(part.dim_in, **outputs, **kwargs, num_members=1, member_ids=[part.member_ids[i]])
            jobs[(t, i)] = {"ensemble": member, "dataset": everything, **trainer_kwargs}
        refitted = fit_many(jobs)
        calibration = hyper.calibration
        hyper = combine([refitted[p].ensemble for p in picks], [{k: trials[t][k] for k in swept} for t, _ in picks])
        hyper.calibration = calibration
    hyper.selection = selection
    return hyper
