"""The workload of the placement tests, in one process or as one of several: image-shaped inputs,
factory-built convolutional members (stacked), per-member augmentation, FGSM, SGD with Nesterov
momentum and warm-up, EMA and gradient clipping. The torchrun test runs
`python -m torch.distributed.run --standalone --nproc-per-node 2 tests/launched_train.py OUT`;
the Ray tests train it on workers (tests/test_distributed.py)."""

import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

from ray_ensembles import DeepEnsemble, TensorDataset, Trainer
from ray_ensembles.loop.augmentation import Compose, RandomCrop, RandomHorizontalFlip

G = torch.Generator().manual_seed(0)
X = torch.randn(150, 2, 4, 4, generator=G)  # (N, C, H, W)
Y = X[:, 0].mean((1, 2)).unsqueeze(1) * 4 * X[:, 1].mean((1, 2)).unsqueeze(1) + 0.1 * torch.randn(150, 1, generator=G)
VALIDATION = TensorDataset(torch.randn(40, 2, 4, 4, generator=G), torch.randn(40, 1, generator=G))
OPTIONS = dict(train_batch_size=32, train_num_epochs=6, train_lr=0.01, optimizer="sgd", nesterov=True,
               warmup_steps=5, augment=Compose(RandomCrop(1), RandomHorizontalFlip()), ema_decay=0.9,
               ema_update_every=1, max_grad_norm=1.0, save_every=10, validation_dataset=VALIDATION)


def small_cnn():
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 2))


def ensemble() -> DeepEnsemble:
    return DeepEnsemble(dim_in=(2, 4, 4), num_members=3, seed=4, member_factory=small_cnn,
                        use_adversarial_training=True, adversarial_eps=0.02)


def train(results_folder, **options) -> Trainer:
    trainer = Trainer(ensemble(), TensorDataset(X, Y), results_folder=results_folder, **OPTIONS, **options)
    trainer.train()
    return trainer


if __name__ == "__main__":
    import launched_train  # the factory by its module's name, as the in-process run records it, not __main__'s

    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    trainer = launched_train.train(out, cpu=True)
    (out / f"rank-{os.environ['RANK']}.json").write_text(json.dumps({
        "placement": trainer.placement, "checkpoint": str(trainer.checkpoint_path),
        "mean": trainer.ensemble(X).mean.tolist(), "metrics": trainer.metrics, "history": trainer.history}))
