"""The one training loop, shared by the in-process Trainer, Ray workers and torchrun processes.

`EnsembleFit` trains the members one process holds, all at once: each step takes every member's
own mini-batch (`batches`), runs one batched forward and backward over the stacked members, and
takes one Adam step over the stack (`optim`). Per-member losses are summed, and Adam, EMA and the
optional gradient clipping are elementwise or per member, so a member's trajectory is the same
whichever other members share its process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from ema_pytorch import EMA

from ..model.members import member_seed
from ..model.validation import check_bool, check_callable, check_choice, check_float, check_int, fail
from .augmentation import augment_members, describe
from .cuda_graphs import GraphedStep
from .data import TrainingData
from .optim import stacked_optimizer


class MemberDivergedError(RuntimeError):
    """A member's loss became NaN or inf."""

    def __init__(self, member_id: int, step: int, last_finite_loss: float):
        self.member_id, self.step, self.last_finite_loss = member_id, step, last_finite_loss
        super().__init__(f"Member {member_id} diverged at step {step}: its loss is not finite "
                         f"(last finite loss {last_finite_loss:.6g}). Lower the learning rate or "
                         "set max_grad_norm; other members are unaffected.")

    def __reduce__(self):  # picklable, so that it crosses from a Ray worker intact
        return type(self), (self.member_id, self.step, self.last_finite_loss)


@dataclass(frozen=True)
class TrainSettings:
    """Options of the loop; a plain, serialisable record so Ray workers receive the same ones.
    It checks itself, naming each option as the Trainer does (`lr` is its `train_lr`), and its
    defaults are the Trainer's."""

    # the Trainer's names for the options it prefixes
    PUBLIC_NAMES: ClassVar[dict[str, str]] = {"batch_size": "train_batch_size", "lr": "train_lr",
                                              "num_steps": "train_num_steps"}

    batch_size: int = 100
    lr: float = 1e-3
    num_steps: int = 10_000
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    ema_decay: float = 0.0
    ema_update_every: int = 10
    amp: bool = False
    cuda_graphs: bool = True       # on a GPU, replay each step's forward and backward as a CUDA graph
    save_every: int = 1000
    on_divergence: str = "raise"   # or "restart": re-initialise only that member, fresh seed
    max_restarts: int = 3          # per member, with on_divergence="restart"
    lr_scheduler: bool = True      # cosine annealing of the rate to 0 over num_steps (the peer's)
    warmup_steps: int = 0          # a linear warm-up of the rate over the first steps, before the schedule
    optimizer: str = "adam"        # or "adamw" (decoupled weight decay) or "sgd"
    momentum: float = 0.9          # SGD's
    nesterov: bool = False         # SGD's
    shuffle_buffer_rows: int = 1 << 20  # a streamed table's rows mix within windows of this many (`streaming`)
    augment: Callable | None = None  # each member's training batches transformed (`augmentation`)

    def __post_init__(self):
        def check(field, checker, **constraint):
            object.__setattr__(self, field, checker("Trainer", self.PUBLIC_NAMES.get(field, field),
                                                    getattr(self, field), **constraint))

        for field in ("batch_size", "num_steps", "ema_update_every", "save_every", "shuffle_buffer_rows"):
            check(field, check_int, minimum=1)
        check("max_restarts", check_int, minimum=0)
        check("warmup_steps", check_int, minimum=0)
        if self.warmup_steps >= self.num_steps:
            fail("Trainer", "warmup_steps", f"fewer than the run's {self.num_steps} steps", self.warmup_steps)
        check_choice("Trainer", "optimizer", self.optimizer, {"adam", "adamw", "sgd"})
        check("momentum", check_float, minimum=0.0, below=1.0)
        check("lr", check_float, strict_minimum=0.0)
        check("weight_decay", check_float, minimum=0.0)
        check("ema_decay", check_float, minimum=0.0, below=1.0)
        if self.max_grad_norm is not None:
            check("max_grad_norm", check_float, strict_minimum=0.0)
        if self.nesterov is True and (self.optimizer != "sgd" or self.momentum == 0):
            fail("Trainer", "nesterov", "False unless optimizer='sgd' with momentum > 0", self.nesterov)
        check_choice("Trainer", "on_divergence", self.on_divergence, {"raise", "restart"})
        for field in ("amp", "cuda_graphs", "lr_scheduler", "nesterov"):
            check_bool("Trainer", field, getattr(self, field))
        check_callable("Trainer", "augment", self.augment, "a transform(x, generator) -> x (`augmentation`)")

    def record(self) -> dict:
        """The settings as a run's record and a checkpoint keep them: plain values, the transform by name."""
        return {**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, "augment": describe(self.augment)}

    def lr_at(self, step: int) -> float:
        """The learning rate of the step after `step` steps: a function of the step alone. The
        warm-up rises linearly to `lr` at its last step; the cosine then runs over the rest."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if not self.lr_scheduler:
            return self.lr
        done = (step - self.warmup_steps) / (self.num_steps - self.warmup_steps)
        return self.lr * 0.5 * (1 + math.cos(math.pi * done))


def horizon_lr(num_steps: int) -> float:
    """The jobs' default Adam rate for a run of `num_steps` steps: the paper's 0.1 up to the
    length of its Boston runs (40 epochs, 200 steps), then 1 / sqrt(steps), the rate first-order
    methods take for a fixed horizon. At 0.1, hidden ReLUs die at a steady rate, so a long run
    at the paper's rate ends with half its units dead (docs/benchmarks.md, "Learning rate")."""
    return 0.1 * min(1.0, math.sqrt(200 / num_steps))


def num_steps(num_rows: int, batch_size: int, steps: int | None, epochs: int | None) -> int:
    """The length of a run: `steps`, or `epochs` of ceil(num_rows / batch_size) steps, or 10,000
    steps (TrainSettings' default, deep-ensembles-pytorch's) when neither is given."""
    if steps is not None and epochs is not None:
        raise ValueError("Trainer takes one of 'train_num_steps' and 'train_num_epochs'. "
                         f"Got both ({steps}, {epochs}) instead.")
    if epochs is not None:
        epochs = check_int("Trainer", "train_num_epochs", epochs, minimum=1)
        return epochs * math.ceil(num_rows / check_int("Trainer", "train_batch_size", batch_size, minimum=1))
    return check_int("Trainer", "train_num_steps", TrainSettings.num_steps if steps is None else steps, minimum=1)


class EnsembleFit:
    """Training state of the members held by one process: weights, Adam, EMA and step.
    Checkpoints of it are written and read by `checkpoint`."""

    def __init__(self, ensemble, data: TrainingData, settings: TrainSettings, device: torch.device | str = "cpu"):
        self.ensemble = ensemble.to(device)
        self.settings = settings
        self.batches = data.member_batches(self.ensemble, settings, device)
        self.data = data.fingerprint
        self.steps_per_epoch = self.batches.steps_per_epoch
        self.optimizer = stacked_optimizer(ensemble.members, ensemble.num_members, settings)
        self.ema = None
        if settings.ema_decay > 0:  # updated by _update_ema, not by the EMA's own schedule
            self.ema = EMA(ensemble.members, beta=settings.ema_decay, include_online_model=False,
                           use_foreach=True)
        self.step = 0
        self.last_finite_loss = torch.full((ensemble.num_members,), float("nan"))
        # this epoch's finite step losses so far, and how many, per member
        self.epoch_loss_sum = torch.zeros(ensemble.num_members, dtype=torch.float64)
        self.epoch_steps = torch.zeros(ensemble.num_members, dtype=torch.float64)
        self.last_epoch_loss: torch.Tensor | None = None
        self.attempts = [0] * ensemble.num_members
        # CUDA graphs need every kernel of the step known and launched from a fixed set of
        # tensors: not so for user-built members or the random perturbation (drawn on the CPU)
        graphable = settings.cuda_graphs and torch.device(device).type == "cuda" and \
            ensemble.member_factory is None and ensemble.perturbation != "random"
        self.graphed_step = GraphedStep(self._forward_backward, self.optimizer.params) if graphable else None

    def run(self, *, on_epoch_end: Callable[[int, torch.Tensor], None] | None = None,
            on_checkpoint: Callable[["EnsembleFit"], None] | None = None,
            on_step: Callable[["EnsembleFit"], None] | None = None):
        """Train until `settings.num_steps`, from wherever the step counter is.

        `on_epoch_end(epoch, mean_member_losses)` runs after each full epoch; `on_step(self)`
        after every step (keep it cheap); `on_checkpoint(self)` every `save_every` steps and at
        the last step.
        """
        s = self.settings
        self.ensemble.train()
        while self.step < s.num_steps:
            losses = self.train_step().cpu().double()
            finite = torch.isfinite(losses)  # a diverged member's last loss is not part of its mean
            self.epoch_loss_sum += torch.where(finite, losses, 0.0)
            self.epoch_steps += finite
            if self.step == s.num_steps and self.ema is not None:
                self.last_finite_loss = self.full_loss(self.ema.ema_model)
            if self.step % self.steps_per_epoch == 0:
                self.last_epoch_loss = (self.epoch_loss_sum / self.epoch_steps).float()
                self.epoch_loss_sum.zero_()
                self.epoch_steps.zero_()
                if on_epoch_end is not None:
                    on_epoch_end(self.step // self.steps_per_epoch - 1, self.last_epoch_loss)
            if on_step is not None:
                on_step(self)
            if on_checkpoint is not None and (self.step % s.save_every == 0 or self.step == s.num_steps):
                on_checkpoint(self)
        self.finish()

    def train_step(self) -> torch.Tensor:
        """One step for all members; returns their losses (M,)."""
        xs, ys = self.batches(self.step)                         # (M, b, *S), (M, b, ...)
        if self.settings.augment is not None:
            xs = augment_members(self.settings.augment, xs, self.ensemble.member_seeds, self.step)
        losses = (self.graphed_step or self._forward_backward)(xs, ys)
        diverged = self._check_finite(losses)
        self.optimizer.lr = self.settings.lr_at(self.step)
        self.optimizer.step()  # outside any graph, after the finiteness check
        if self.ema is not None:
            self._update_ema()
        if diverged:  # after the step: every update is elementwise, so NaN stayed in their own slices
            self._restart_members(diverged)
        self.step += 1
        return losses

    def _forward_backward(self, xs, ys) -> torch.Tensor:
        """Every member's loss (M,) and gradient, clipped per member when asked."""
        # AMP is bfloat16 autocast: float16's gradient scaler skips the step of EVERY member when
        # one overflows, coupling members. No weight cache: it must not outlive a graph capture.
        with (torch.autocast(xs.device.type, dtype=torch.bfloat16, cache_enabled=False) if self.settings.amp
              else contextlib.nullcontext()):
            losses = self.ensemble.member_losses(xs, ys, step=self.step)
        self.optimizer.zero_grad()
        losses.sum().backward()
        if self.settings.max_grad_norm is not None:  # per member: one's gradient never shrinks another's
            members = self.ensemble.members
            members.scale_grads((self.settings.max_grad_norm / (members.grad_norms() + 1e-6)).clamp(max=1.0))
        return losses.detach()

    def _check_finite(self, losses) -> list[int]:
        """Indices of members whose loss is not finite; raises unless they may restart."""
        losses = losses.cpu()  # the step's one device sync
        if math.isfinite(losses.sum()):  # the usual case: no per-member work on the hot path
            self.last_finite_loss = losses
            return []
        finite = torch.isfinite(losses)
        self.last_finite_loss = torch.where(finite, losses, self.last_finite_loss)
        bad = (~finite).nonzero()[:, 0].tolist()
        for i in bad:
            if self.settings.on_divergence != "restart" or self.attempts[i] >= self.settings.max_restarts:
                raise MemberDivergedError(self.ensemble.member_ids[i], self.step,
                                          float(self.last_finite_loss[i]))
        return bad

    @torch.no_grad()
    def _update_ema(self):
        """EMA of the weights with ema-pytorch's warm-up, per step: decay 1 - (1 + t)^(-2/3) at
        step t, capped at ema_decay. Taken every `ema_update_every` steps as decay^k for the k
        steps since the last one (a per-update decay would average over k times as many steps),
        and at the last step. A function of the step alone, so resuming needs no EMA counter."""
        s, done = self.settings, self.step + 1
        if done % s.ema_update_every and done != s.num_steps:
            return
        since = done - s.ema_update_every * ((done - 1) // s.ema_update_every)
        decay = min(s.ema_decay, 1 - (1 + done) ** (-2 / 3)) ** since
        self.ema.update_moving_average(self.ema.ema_model, self.ema.model, current_decay=decay)

    @torch.no_grad()
    def _restart_members(self, indices: list[int]):
        """Re-initialise only these members, each from a fresh seed derived from
        (seed, member id, attempt), with a fresh Adam and EMA. They train on for the remaining
        steps; every other member's tensors are left untouched."""
        members = self.ensemble.members
        for i in indices:
            self.attempts[i] += 1
            seed = member_seed(self.ensemble.seed, self.ensemble.member_ids[i], self.attempts[i])
            self.ensemble.member_seeds[i] = seed
            members.reset_member(i, seed)
            self.optimizer.reset_member(i)
            if self.ema is not None:
                self.ema.ema_model.load_member_state(i, members.member_state(i))
            self.epoch_loss_sum[i] = self.epoch_steps[i] = 0  # its epoch mean starts afresh
        self.batches.reset()  # their data order follows their new seeds

    def running_loss(self) -> torch.Tensor | None:
        """Each member's mean training loss over this epoch's steps so far, (M,), or over the last
        epoch right after one ends; None before the first step."""
        position = self.step % self.steps_per_epoch
        return (self.epoch_loss_sum / self.epoch_steps).float() if position else self.last_epoch_loss

    @torch.no_grad()
    def full_loss(self, members, rows: int = 8192) -> torch.Tensor:
        """Each member's mean loss (M,) over all training rows, in eval mode and without the
        adversarial term: with EMA on, the reported training loss is the EMA weights', which are
        the ones that predict."""
        was_training = members.training
        members.eval()
        try:
            total = torch.zeros(self.ensemble.num_members, dtype=torch.float64)
            for xs, ys in self.batches.chunks(rows):
                out = members(xs.expand(self.ensemble.num_members, *xs.shape))
                total += self.ensemble.head.loss(out, ys).double().cpu() * len(xs)
        finally:
            members.train(was_training)
        return (total / self.batches.num_rows).float()

    @property
    def predicting_members(self):
        """The weights predictions use: the EMA's when EMA is on."""
        return self.ema.ema_model if self.ema is not None else self.ensemble.members

    def finish(self):
        """Leave the ensemble holding the weights to predict with."""
        self.batches.close()
        if self.ema is not None:
            for i in range(self.ensemble.num_members):
                self.ensemble.members.load_member_state(i, self.ema.ema_model.member_state(i))
        self.ensemble.eval()

    def evaluate(self, x, y) -> tuple[torch.Tensor, torch.Tensor]:
        """`ensemble.evaluate_members` with the weights being predicted with, in eval mode. (The
        loop owns the ensemble while it trains, so it may switch the mode.)"""
        online = self.ensemble.members
        self.ensemble.members = self.predicting_members
        self.ensemble.eval()
        try:
            return self.ensemble.evaluate_members(x, y)
        finally:
            self.ensemble.members = online
            self.ensemble.train()
