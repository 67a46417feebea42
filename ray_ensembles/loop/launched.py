"""Under torchrun or `accelerate launch`: each rank trains its round-robin share of the members in
its own process (nothing is averaged) and writes its checkpoints to `results_folder/rank-<r>/`;
rank 0 reads every rank's last checkpoint with the format's one reader and writes the whole
ensemble to `results_folder/checkpoint-<k>`, which every rank then loads. The process group is
used for two barriers only."""

from __future__ import annotations

import math
from pathlib import Path

from ..io import storage
from . import checkpoint
from .history import History, RunResult
from .in_process import fit_here, milestone_path
from .placement import assign_members, launched_rank, process_group


def fit_launched(ensemble, new_fit, *, results_folder: Path, history: History, validation=None,
                 progress: bool = False) -> RunResult:
    """Train this rank's members (`new_fit(subset)` gives their loop) and assemble all ranks'
    members into `ensemble`, in every rank."""
    rank, world = launched_rank()
    shares = assign_members(ensemble.member_ids, world)
    with process_group() as dist:
        fit = fit_here(new_fit(ensemble.subset(shares[rank])), folder=results_folder / f"rank-{rank}",
                       history=history, validation=validation, progress=progress)
        path = milestone_path(results_folder, math.ceil(fit.step / fit.settings.save_every))
        dist.barrier()  # every rank's last checkpoint is written
        if rank == 0:
            files = {}
            for r, ids in enumerate(shares):
                folder = results_folder / f"rank-{r}" / path.name
                files.update(zip(ids, storage.read_members(folder, ensemble.subset(ids))))
            storage.write_ensemble(path, ensemble, files, training=checkpoint.training_state(fit))
        dist.barrier()  # the ensemble is written
    metadata = storage.load_members(path, ensemble)
    ensemble.eval()
    return RunResult(checkpoint_path=path, train_losses={m: meta["train_loss"] for m, meta in metadata.items()},
                     placement={m: {"rank": r} for r, ids in enumerate(shares) for m in ids})
