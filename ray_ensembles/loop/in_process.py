"""Training in this process: the loop with its checkpoints, history and progress bar. The
in-process Trainer runs it, and so does each torchrun rank for its share (`launched`)."""

from __future__ import annotations

import math
from pathlib import Path

from ..model.metrics import validation_metrics
from . import checkpoint
from .history import History
from .progress import EnsembleProgress, Every
from .training import EnsembleFit


def milestone_path(folder, milestone: int) -> Path:
    return Path(folder) / f"checkpoint-{milestone}"


def fit_here(fit: EnsembleFit, *, folder: Path, history: History, validation=None, progress: bool = False,
             on_save=lambda path: None) -> EnsembleFit:
    """Train `fit` to its last step, from wherever it is: a checkpoint `folder/checkpoint-<k>`
    every `save_every` steps and at the end (`on_save(path)` after each), the epochs and the
    validation metrics recorded into `history` at each."""
    ensemble, steps = fit.ensemble, fit.settings.num_steps
    bar, tick = EnsembleProgress(ensemble.num_members * steps, enabled=progress), Every(0.5)

    def on_step(fit):
        if tick() or fit.step == steps:
            bar.update(ensemble.num_members * fit.step, fit.running_loss().mean().item(), history.latest("val_nll"))

    def on_checkpoint(fit):
        on_save(checkpoint.save(fit, milestone_path(folder, math.ceil(fit.step / fit.settings.save_every))))
        history.checkpoint(fit.step, validation_metrics(ensemble.task, validation, fit.evaluate, ensemble.member_ids))

    try:
        fit.run(on_checkpoint=on_checkpoint, on_step=on_step if progress else None,
                on_epoch_end=lambda epoch, losses: history.add_epoch(epoch, fit.step, ensemble.member_ids, losses.tolist()))
    finally:
        bar.close()
    return fit
