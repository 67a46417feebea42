"""The ensemble the torchrun test trains, in one process or as one of several:
`python -m torch.distributed.run --standalone --nproc-per-node 2 tests/launched_train.py OUT`."""

import json
import os
import sys
from pathlib import Path

import torch

from ray_ensembles import DeepEnsemble, TensorDataset, Trainer

G = torch.Generator().manual_seed(0)
X = torch.randn(150, 3, generator=G)
Y = X[:, :1] * X[:, 1:2] + 0.1 * torch.randn(150, 1, generator=G)
VALIDATION = TensorDataset(torch.randn(40, 3, generator=G), torch.randn(40, 1, generator=G))
OPTIONS = dict(train_batch_size=32, train_num_epochs=6, train_lr=3e-3, ema_decay=0.9, ema_update_every=1,
               max_grad_norm=1.0, save_every=10, cpu=True, validation_dataset=VALIDATION)


def train(results_folder) -> Trainer:
    ensemble = DeepEnsemble(dim_in=3, num_members=3, hidden_dim=16, seed=4, use_adversarial_training=True,
                            adversarial_eps=0.02)
    trainer = Trainer(ensemble, TensorDataset(X, Y), results_folder=results_folder, **OPTIONS)
    trainer.train()
    return trainer


if __name__ == "__main__":
    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    trainer = train(out)
    (out / f"rank-{os.environ['RANK']}.json").write_text(json.dumps({
        "placement": trainer.placement, "checkpoint": str(trainer.checkpoint_path),
        "mean": trainer.ensemble(X).mean.tolist(), "metrics": trainer.metrics, "history": trainer.history}))
