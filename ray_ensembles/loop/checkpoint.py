"""Training checkpoints: an ensemble directory whose member files also hold the training state.

Per member: `model.*` the weights to predict with (EMA's when on), `online.*` the weights being
trained when EMA is on, `adam.*` (Adam, AdamW) or `sgd.*` the optimiser's state; its metadata adds the
loop's step, settings and data fingerprint, restart attempts and the epoch's loss so far. Any
checkpoint therefore loads as an ensemble; `restore` resumes one exactly.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from ..io import storage
from ..io.manifest import Manifest
from .training import EnsembleFit


def training_state(fit: EnsembleFit) -> dict:
    return {"step": fit.step, "settings": fit.settings.record(), "data": fit.data}


def member_files(fit: EnsembleFit) -> dict[int, tuple[dict[str, torch.Tensor], dict]]:
    """Per member id: the tensors of its checkpoint file and its metadata."""
    members = fit.ensemble.members
    optimizer = fit.optimizer
    state = {key: optimizer.named_state(key) for key in optimizer.KEYS}
    files = {}
    for i, m in enumerate(fit.ensemble.member_ids):
        tensors = {f"model.{k}": v for k, v in fit.predicting_members.member_state(i).items()}
        if fit.ema is not None:
            tensors.update({f"online.{k}": v for k, v in members.member_state(i).items()})
        for key, named in state.items():
            tensors.update({f"{optimizer.PREFIX}.{key}.{k}": v for k, v in members.member_view(i, named).items()})
        metadata = dict(storage.member_metadata(fit.ensemble, i), training=training_state(fit),
                        train_loss=float(fit.last_finite_loss[i]), attempt=fit.attempts[i],
                        epoch_loss_sum=float(fit.epoch_loss_sum[i]), epoch_loss_steps=int(fit.epoch_steps[i]))
        files[m] = (tensors, metadata)
    return files


def save(fit: EnsembleFit, path) -> Path:
    """The standard ensemble directory, plus each member's training state."""
    return storage.write_ensemble(path, fit.ensemble, member_files(fit), training=training_state(fit))


def restore(fit: EnsembleFit, directory):
    """Resume every member `fit` holds from a checkpoint directory (an ensemble directory, or a
    Ray checkpoint of member files)."""
    directory = Path(directory)
    loaded = storage.read_members(directory, fit.ensemble)  # refuses other ensembles and mixed steps
    saved = loaded[0][1].get("training", {}).get("data")
    if saved is not None and saved != fit.data:
        raise ValueError(f"Checkpoint {directory} was trained on other data (fingerprint {saved}, "
                         f"this data's {fit.data}): resuming it here would not continue that "
                         "run. Train afresh, or pass the data it was trained on.")
    members = fit.ensemble.members
    online_prefix = "online." if fit.ema is not None else "model."
    for i, (tensors, meta) in enumerate(loaded):
        members.load_member_state(i, storage.strip_prefix(tensors, online_prefix))
        if fit.ema is not None:
            fit.ema.ema_model.load_member_state(i, storage.strip_prefix(tensors, "model."))
        fit.ensemble.member_seeds[i] = meta["seed"]
        fit.attempts[i] = meta.get("attempt", 0)
        fit.epoch_loss_sum[i] = meta.get("epoch_loss_sum", 0.0)
        fit.epoch_steps[i] = meta.get("epoch_loss_steps", 0)
        fit.last_finite_loss[i] = meta.get("train_loss", float("nan"))
    fit.batches.reset()  # the restored seeds set the data order
    fit.step = loaded[0][1]["training"]["step"]
    if fit.step > 0:
        prefix = fit.optimizer.PREFIX
        fit.optimizer.load_state(
            {key: members.assemble([storage.strip_prefix(t, f"{prefix}.{key}.") for t, _ in loaded])
             for key in fit.optimizer.KEYS})


def check_resumable(path, ensemble, settings):
    """Refuse a checkpoint of another ensemble or without training state; warn when `settings`
    differ from the saved ones (they apply from here on). Gives `ensemble` the checkpoint's
    normalisation, which the resumed run must keep."""
    manifest = Manifest.read(path)
    if manifest.config != ensemble.config or manifest.task != ensemble.task:
        raise ValueError(f"Checkpoint {path} was saved by a {manifest.task} ensemble with config "
                         f"{manifest.config}, not this one's {ensemble.config}.")
    if manifest.training is None:
        raise ValueError(f"{path} holds an ensemble without training state; load it with "
                         f"{type(ensemble).__name__}.load, or train it afresh.")
    saved = manifest.training["settings"]
    changed = {k: (saved[k], v) for k, v in settings.record().items() if k in saved and saved[k] != v}
    if changed:
        warnings.warn(f"Resuming {path} with other training settings (saved -> now): "
                      + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()), stacklevel=4)
    ensemble.standardizer.load_state(manifest.normalization)
