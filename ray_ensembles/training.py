"""The one training loop, shared by the in-process Trainer and the Ray workers.

`EnsembleFit` trains the members one process holds, all at once: each step gathers every
member's own mini-batch (its own permutation of ALL the rows, from (seed, member, epoch) only),
runs one batched forward and backward over the stacked members, and takes one Adam step over
the stack. Per-member losses are summed, and Adam, EMA and the optional gradient clipping are
elementwise or per member, so a member's trajectory is the same whichever other members share its
process. Data order is a pure function of (seed, member, epoch), so resuming needs no RNG state.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, ClassVar

import torch
from ema_pytorch import EMA

from . import storage
from .ensemble import write_ensemble_directory
from .members import epoch_permutations, member_seed
from .validation import check_choice, check_float, check_int


GATHER_BYTES = 32 << 20  # rows gathered ahead for the coming steps
EAGER_RUNS_BEFORE_CAPTURE = 3  # of each batch shape; CUDA graph capture needs warmed-up kernels


def _gather_rows(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """t[rows] for a 2-D index: index_select copies whole rows, twice as fast on a CPU as
    advanced indexing (MNIST-sized rows)."""
    return t.index_select(0, rows.flatten()).view(*rows.shape, *t.shape[1:])


class MemberDivergedError(RuntimeError):
    """A member's loss became NaN or inf."""

    def __init__(self, member_id: int, step: int, last_finite_loss: float):
        self.member_id, self.step, self.last_finite_loss = member_id, step, last_finite_loss
        super().__init__(f"Member {member_id} diverged at step {step}: its loss is not finite "
                         f"(last finite loss {last_finite_loss:.6g}). Lower the learning rate or "
                         "set max_grad_norm; other members are unaffected.")


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

    def __post_init__(self):
        def check(field, checker, **constraint):
            object.__setattr__(self, field, checker("Trainer", self.PUBLIC_NAMES.get(field, field),
                                                    getattr(self, field), **constraint))

        for field in ("batch_size", "num_steps", "ema_update_every", "save_every"):
            check(field, check_int, minimum=1)
        check("max_restarts", check_int, minimum=0)
        check("lr", check_float, strict_minimum=0.0)
        check("weight_decay", check_float, minimum=0.0)
        check("ema_decay", check_float, minimum=0.0, below=1.0)
        if self.max_grad_norm is not None:
            check("max_grad_norm", check_float, strict_minimum=0.0)
        check_choice("Trainer", "on_divergence", self.on_divergence, {"raise", "restart"})
        for field in ("amp", "cuda_graphs", "lr_scheduler"):
            if not isinstance(getattr(self, field), bool):
                raise TypeError(f"The '{field}' parameter of Trainer must be a bool. Got {getattr(self, field)!r} instead.")

    def lr_at(self, step: int) -> float:
        """The learning rate of the step after `step` steps: a function of the step alone."""
        if not self.lr_scheduler:
            return self.lr
        return self.lr * 0.5 * (1 + math.cos(math.pi * step / self.num_steps))


def horizon_lr(num_steps: int) -> float:
    """The jobs' default Adam rate for a run of `num_steps` steps: the paper's 0.1 up to the
    length of its Boston runs (40 epochs, 200 steps), then 1 / sqrt(steps), the rate first-order
    methods take for a fixed horizon. At 0.1, hidden ReLUs die at a steady rate, so a long run
    at the paper's rate ends with half its units dead (README, "Learning rate")."""
    return 0.1 * min(1.0, math.sqrt(200 / num_steps))


def data_fingerprint(x: torch.Tensor, y: torch.Tensor) -> str:
    """A short digest of the training data: shapes, dtypes, sums and up to 4096 evenly spaced
    rows. Cheap for any size; a checkpoint resumed on other data is refused by it."""
    digest = hashlib.sha256()
    for t in (x, y):
        rows = torch.linspace(0, len(t) - 1, min(len(t), 4096)).long()
        sample = t.detach().cpu()[rows].contiguous()
        digest.update(f"{tuple(t.shape)} {t.dtype} {float(t.sum(dtype=torch.float64))}".encode())  # no float64 copy
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def attach_validation(entries: list[dict], step: int, validation: dict) -> list[dict]:
    """Put validation metrics on the epoch entry that ended at `step`, or add an entry for a
    checkpoint taken mid-epoch. The in-process and Ray paths report alike through this."""
    if validation:
        if entries and entries[-1]["step"] == step:
            entries[-1].update(validation)
        else:
            entries.append({"step": step, **validation})
    return entries


def make_accelerator(cpu: bool) -> Accelerator:
    """An Accelerator for one process's device (AMP is the loop's own autocast: `TrainSettings.amp`)."""
    # imported here: the package is also imported where nothing trains (the prediction job, Ray
    # Train's controller), and accelerate's import took a third of a second of their start-up
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # Accelerate keeps one process-wide state that refuses a second device or precision setting;
    # several Trainers in one process (sweeps, tests, the benchmark's peer) each need their own.
    AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(cpu=cpu)


class StackedAdam:
    """Adam over the members' parameters: one fused kernel call per step.

    It calls the kernel torch.optim.Adam(fused=True) calls, so the arithmetic is the same. What it
    drops is that class's per-step Python work (grouping tensors by device and dtype, hooks,
    profiler ranges, lazy state), which at UCI size cost more than the kernel itself. Adam is
    elementwise, so one call over the stack is M independent Adams.

    Step counts are kept per member, as M separate Adams would: a member restarted after
    divergence starts its bias correction afresh. (With the stack's shared count, its first
    hundred updates were up to 6x larger than a fresh Adam's.) While every member's count is the
    same, the kernel runs on the stacked tensors; after a restart, on per-member views.
    """

    KEYS = ("exp_avg", "exp_avg_sq", "step")

    def __init__(self, members, num_members: int, lr: float, weight_decay: float):
        self.members = members
        named = dict(members.named_parameters())
        self.names, self.params = list(named), list(named.values())
        # per member and parameter: (M,) for a stacked parameter, () for one a single member owns
        steps = members.assemble([{k: torch.zeros((), device=v.device) for k, v in members.member_view(i, named).items()}
                                  for i in range(num_members)])
        self.state = {"exp_avg": [torch.zeros_like(p) for p in self.params],
                      "exp_avg_sq": [torch.zeros_like(p) for p in self.params],
                      "step": [steps[name] for name in self.names]}
        self.lr, self.weight_decay = lr, weight_decay
        self._counts_changed()

    def named_state(self, key: str) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.state[key]))

    def load_state(self, state: dict[str, dict[str, torch.Tensor]]):
        missing = sorted({f"adam.{key}.*" for key in self.KEYS for name in self.names if name not in state[key]})
        if missing:
            raise ValueError(f"The checkpoint lacks the optimiser state {missing}, so training cannot resume "
                             "from it (files from before per-member Adam step counts). It still loads "
                             "as an ensemble.")
        with torch.no_grad():
            for key, named in state.items():
                for name, t in zip(self.names, self.state[key]):
                    t.copy_(named[name])
        self._counts_changed()

    def reset_member(self, index: int):
        """A fresh Adam for member `index` only: zero moments and step count."""
        for key in self.KEYS:
            self.members.zero_member_(index, self.named_state(key))
        self._counts_changed()

    def _counts_changed(self):
        self._uniform = all(bool((s == s.flatten()[0]).all()) for s in self.state["step"])
        self._first_counts = [s.flatten()[0] for s in self.state["step"]]  # views: always current

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self):
        live = [j for j, p in enumerate(self.params) if p.grad is not None]  # a factory member may leave some unused
        if not live:
            return
        exp_avg, exp_avg_sq, steps = (self.state[k] for k in self.KEYS)
        torch._foreach_add_([steps[j] for j in live], 1)
        whole = [(self.params[j], self.params[j].grad, exp_avg[j], exp_avg_sq[j], steps[j]) for j in live]
        if self._uniform:  # the whole stack in one call: every member's count is the first one's
            tensors = [(*t[:4], self._first_counts[j]) for t, j in zip(whole, live)]
        else:  # one view per member, each with its own count
            tensors = [view for t in whole for view in (zip(*(x.unbind(0) for x in t)) if t[4].ndim else [t])]
        params, grads, exp_avgs, exp_avg_sqs, counts = map(list, zip(*tensors))
        torch._fused_adam_(params, grads, exp_avgs, exp_avg_sqs, [], counts, amsgrad=False, lr=self.lr,
                           beta1=0.9, beta2=0.999, weight_decay=self.weight_decay, eps=1e-8, maximize=False)


class EnsembleFit:
    """Training state of the members held by one process: weights, Adam, EMA and step."""

    def __init__(self, ensemble, x: torch.Tensor, y: torch.Tensor, settings: TrainSettings,
                 accelerator: Accelerator):
        self.ensemble = ensemble.to(accelerator.device)
        self.settings = settings
        self.accelerator = accelerator
        device = accelerator.device
        self.xs = ensemble.standardize_x(x.to(device))             # (N, D)
        self.ys = ensemble.standardize_y(ensemble._check_y(y, len(x)))  # (N, T) or (N,)
        self.steps_per_epoch = math.ceil(len(x) / settings.batch_size)
        self.optimizer = StackedAdam(ensemble.members, ensemble.num_members, settings.lr, settings.weight_decay)
        self.ema = None
        if settings.ema_decay > 0:  # updated by _update_ema, not by the EMA's own schedule
            self.ema = EMA(ensemble.members, beta=settings.ema_decay, include_online_model=False,
                           use_foreach=True)
        self.data = data_fingerprint(x, y)
        self.step = 0
        self._order, self._order_epoch, self._gathered = None, -1, None
        step_bytes = ensemble.num_members * settings.batch_size * (
            self.xs[0].numel() * self.xs.element_size() + self.ys[0].numel() * self.ys.element_size())
        self._steps_per_gather = max(1, GATHER_BYTES // step_bytes)
        self.last_finite_loss = torch.full((ensemble.num_members,), float("nan"))
        # this epoch's finite step losses so far, and how many, per member
        self._epoch_loss_sum = torch.zeros(ensemble.num_members, dtype=torch.float64)
        self._epoch_steps = torch.zeros(ensemble.num_members, dtype=torch.float64)
        self.last_epoch_loss: torch.Tensor | None = None
        self.attempts = [0] * ensemble.num_members
        # CUDA graphs need every kernel of the step known and launched from a fixed set of
        # tensors: not so for user-built members or the random perturbation (drawn on the CPU)
        self._graphs = {} if (settings.cuda_graphs and device.type == "cuda" and ensemble.member_factory is None
                              and ensemble.perturbation != "random") else None
        self._eager_runs: dict[tuple, int] = {}

    # the step -----------------------------------------------------------------------------------

    def batch_rows(self, step: int) -> torch.Tensor:
        """(M, b) row indices of every member's mini-batch at `step`."""
        epoch, position = divmod(step, self.steps_per_epoch)
        b = self.settings.batch_size
        return self._epoch_order(epoch)[:, position * b:(position + 1) * b]

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        if epoch != self._order_epoch:
            self._order = epoch_permutations(self.ensemble.member_seeds, epoch,
                                             len(self.xs)).to(self.xs.device)
            self._order_epoch, self._gathered = epoch, None
        return self._order

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every member's mini-batch at the current step, (M, b, D) and (M, b, ...).

        Rows are gathered for up to GATHER_BYTES worth of steps at once: a slice of that is one
        cheap view per step, where a gather per step was two index ops.
        """
        epoch, position = divmod(self.step, self.steps_per_epoch)
        order, b = self._epoch_order(epoch), self.settings.batch_size
        first = position - position % self._steps_per_gather
        if self._gathered is None or self._gathered[0] != first:
            rows = order[:, first * b:(first + self._steps_per_gather) * b]
            self._gathered = (first, _gather_rows(self.xs, rows), _gather_rows(self.ys, rows))
        _, xs, ys = self._gathered
        offset = (position - first) * b
        return xs[:, offset:offset + b], ys[:, offset:offset + b]

    def train_step(self) -> torch.Tensor:
        """One step for all members; returns their losses (M,)."""
        xs, ys = self._batch()
        losses = self._forward_backward(xs, ys) if self._graphs is None else self._graphed_forward_backward(xs, ys)
        diverged = self._check_finite(losses)
        self.optimizer.lr = self.settings.lr_at(self.step)
        self.optimizer.step()
        if self.ema is not None:
            self._update_ema()
        if diverged:  # after the step: every update is elementwise, so NaN stayed in their own slices
            self._restart_members(diverged)
        self.step += 1
        return losses

    def _forward_backward(self, xs, ys) -> torch.Tensor:
        """Every member's loss (M,) and gradient, clipped per member when asked."""
        # AMP is bfloat16 autocast: float16 would need a gradient scaler, and its single scale
        # skips the step of EVERY member when one member overflows, coupling members.
        # No cache of bfloat16 weights: it must not outlive a graph capture, and without it the
        # gradients of a weight's several uses (FGSM's passes) are summed in float32, not bfloat16,
        # so the eager and the graphed step compute the same thing.
        with (torch.autocast(xs.device.type, dtype=torch.bfloat16, cache_enabled=False) if self.settings.amp
              else contextlib.nullcontext()):  # a disabled autocast still costs 3 us a step
            losses = self.ensemble.member_losses(xs, ys, step=self.step)
        self.optimizer.zero_grad()
        losses.sum().backward()
        if self.settings.max_grad_norm is not None:
            self._clip_per_member(self.settings.max_grad_norm)
        return losses.detach()

    def _graphed_forward_backward(self, xs, ys) -> torch.Tensor:
        """`_forward_backward` replayed from a CUDA graph, one per batch shape (an epoch's last
        batch may be smaller). For small members a GPU step is mostly kernel launches from
        Python, which a replay does at once: 5-9x faster steps on an H200. Each shape first runs
        eagerly on a side stream, as capture requires. Adam stays outside the graph, after the
        finiteness check, as on the eager path."""
        key = tuple(xs.shape)  # ys's shape follows from it
        captured = self._graphs.get(key)
        if captured is None:
            self._eager_runs[key] = self._eager_runs.get(key, 0) + 1
            if self._eager_runs[key] <= EAGER_RUNS_BEFORE_CAPTURE:
                side = torch.cuda.Stream(xs.device)
                side.wait_stream(torch.cuda.current_stream(xs.device))
                with torch.cuda.stream(side):
                    losses = self._forward_backward(xs, ys)
                torch.cuda.current_stream(xs.device).wait_stream(side)
                return losses
            captured = self._graphs[key] = self._capture(xs, ys)
        graph, static_xs, static_ys, losses, grads = captured
        static_xs.copy_(xs)
        static_ys.copy_(ys)
        graph.replay()
        for p, g in zip(self.optimizer.params, grads):  # another shape's capture may have left its own
            p.grad = g
        return losses.clone()  # the next replay overwrites the graph's output

    def _capture(self, xs, ys) -> tuple:
        """Record (not run) `_forward_backward` on static copies of this batch's inputs."""
        static_xs, static_ys = xs.clone(), ys.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            losses = self._forward_backward(static_xs, static_ys)
        return graph, static_xs, static_ys, losses, [p.grad for p in self.optimizer.params]

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
        steps since the last one (a per-update decay would average over k times as many steps:
        most of a short run, its first weights included), and at the last step, so the final
        steps always count. A function of the step alone, so resuming needs no EMA counter."""
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
            self._epoch_loss_sum[i] = self._epoch_steps[i] = 0  # its epoch mean starts afresh
        self._order_epoch = -1  # their data order follows their new seeds

    @torch.no_grad()
    def _clip_per_member(self, max_norm: float):
        """Clip each member's gradient norm on its own: one member's gradient never shrinks another's."""
        members = self.ensemble.members
        members.scale_grads((max_norm / (members.grad_norms() + 1e-6)).clamp(max=1.0))

    def run(self, *, on_epoch_end: Callable[[int, torch.Tensor], None] | None = None,
            on_checkpoint: Callable[["EnsembleFit"], None] | None = None,
            on_step: Callable[["EnsembleFit"], None] | None = None):
        """Train until `settings.num_steps`, from wherever the step counter is.

        `on_epoch_end(epoch, mean_member_losses)` runs after each full epoch; `on_step(self)`
        after every step (keep it cheap: the progress bar throttles itself); `on_checkpoint(self)`
        every `save_every` steps and at the last step.
        """
        s = self.settings
        self.ensemble.train()
        while self.step < s.num_steps:
            losses = self.train_step().cpu().double()
            finite = torch.isfinite(losses)  # a diverged member's last loss is not part of its mean
            self._epoch_loss_sum += torch.where(finite, losses, 0.0)
            self._epoch_steps += finite
            if self.step == s.num_steps and self.ema is not None:
                self.last_finite_loss = self.full_loss(self.ema.ema_model)
            if self.step % self.steps_per_epoch == 0:
                self.last_epoch_loss = (self._epoch_loss_sum / self._epoch_steps).float()
                self._epoch_loss_sum.zero_()
                self._epoch_steps.zero_()
                if on_epoch_end is not None:
                    on_epoch_end(self.step // self.steps_per_epoch - 1, self.last_epoch_loss)
            if on_step is not None:
                on_step(self)
            if on_checkpoint is not None and (self.step % s.save_every == 0 or self.step == s.num_steps):
                on_checkpoint(self)
        self.finish()

    def running_loss(self) -> torch.Tensor | None:
        """Each member's mean training loss over this epoch's steps so far, (M,), or over the last
        epoch right after one ends; None before the first step."""
        position = self.step % self.steps_per_epoch
        return (self._epoch_loss_sum / self._epoch_steps).float() if position else self.last_epoch_loss

    @torch.no_grad()
    def full_loss(self, members, rows: int = 8192) -> torch.Tensor:
        """Each member's mean loss (M,) over all training rows, in eval mode and without the
        adversarial term: with EMA on, the reported training loss is the EMA weights', which are
        the ones that predict."""
        was_training = members.training
        members.eval()
        try:
            total = torch.zeros(self.ensemble.num_members, dtype=torch.float64)
            for xs, ys in zip(self.xs.split(rows), self.ys.split(rows)):
                out = members(xs.expand(self.ensemble.num_members, *xs.shape))
                total += self.ensemble._member_nll(out, ys).double().cpu() * len(xs)
        finally:
            members.train(was_training)
        return (total / len(self.xs)).float()

    def finish(self):
        """Leave the ensemble holding the weights to predict with: EMA ones when EMA is on."""
        if self.ema is not None:
            for i in range(self.ensemble.num_members):
                self.ensemble.members.load_member_state(i, self.ema.ema_model.member_state(i))
        self.ensemble.eval()

    def evaluate(self, x, y) -> tuple[torch.Tensor, torch.Tensor]:
        """`ensemble.evaluate_members` with the weights being predicted with (EMA when on), in
        eval mode. (The loop owns the ensemble while it trains, so it may switch the mode.)"""
        online = self.ensemble.members
        if self.ema is not None:
            self.ensemble.members = self.ema.ema_model
        self.ensemble.eval()
        try:
            return self.ensemble.evaluate_members(x, y)
        finally:
            self.ensemble.members = online
            self.ensemble.train()

    # checkpoints --------------------------------------------------------------------------------

    def training_state(self) -> dict:
        return {"step": self.step, "settings": asdict(self.settings), "data": self.data}

    def member_files(self) -> dict[int, tuple[dict[str, torch.Tensor], dict]]:
        """Per member id: the tensors of its checkpoint file and its metadata.

        `model.*` holds the weights to predict with (EMA when on), `online.*` the weights being
        trained when EMA is on, `adam.*` the optimiser's moments and step counts.
        """
        members = self.ensemble.members
        adam = {key: self.optimizer.named_state(key) for key in StackedAdam.KEYS}
        files = {}
        for i, m in enumerate(self.ensemble.member_ids):
            predicting = self.ema.ema_model if self.ema is not None else members
            tensors = {f"model.{k}": v for k, v in predicting.member_state(i).items()}
            if self.ema is not None:
                tensors.update({f"online.{k}": v for k, v in members.member_state(i).items()})
            for key, named in adam.items():
                tensors.update({f"adam.{key}.{k}": v for k, v in members.member_view(i, named).items()})
            metadata = dict(self.ensemble.member_metadata(i), training=self.training_state(),
                            train_loss=float(self.last_finite_loss[i]), attempt=self.attempts[i],
                            epoch_loss_sum=float(self._epoch_loss_sum[i]),
                            epoch_loss_steps=int(self._epoch_steps[i]))
            files[m] = (tensors, metadata)
        return files

    def save_checkpoint(self, path) -> Path:
        """The standard ensemble directory, plus each member's training state."""
        return write_ensemble_directory(path, self.ensemble, self.member_files(),
                                        training=self.training_state())

    def restore(self, directory):
        """Resume every member this process holds from a checkpoint directory (an ensemble
        directory, or a Ray checkpoint of member files)."""
        directory = Path(directory)
        shas = {}
        if (directory / storage.MANIFEST).exists():
            shas = {e["id"]: e["sha256"] for e in storage.read_manifest(directory)["members"]}
        loaded = [storage.read_member_file(directory / storage.member_filename(m), shas.get(m))
                  for m in self.ensemble.member_ids]
        steps = {meta["training"]["step"] for _, meta in loaded}
        if len(steps) != 1:
            raise ValueError(f"Checkpoint {directory} mixes members from different steps {sorted(steps)}.")
        for (_, meta), m in zip(loaded, self.ensemble.member_ids):
            if meta["config"] != self.ensemble.config or meta["member_id"] != m:
                raise ValueError(f"Checkpoint {directory}: member {meta.get('member_id')} was trained "
                                 "with another configuration than this ensemble's.")
            saved = meta["training"].get("data")
            if saved is not None and saved != self.data:
                raise ValueError(f"Checkpoint {directory} was trained on other data (fingerprint {saved}, "
                                 f"this data's {self.data}): resuming it here would not continue that "
                                 "run. Train afresh, or pass the data it was trained on.")
        members = self.ensemble.members
        online_prefix = "online." if self.ema is not None else "model."
        for i, (tensors, meta) in enumerate(loaded):
            members.load_member_state(i, storage.strip_prefix(tensors, online_prefix))
            if self.ema is not None:
                self.ema.ema_model.load_member_state(i, storage.strip_prefix(tensors, "model."))
            self.ensemble.member_seeds[i] = meta["seed"]
            self.attempts[i] = meta.get("attempt", 0)
            self._epoch_loss_sum[i] = meta.get("epoch_loss_sum", 0.0)
            self._epoch_steps[i] = meta.get("epoch_loss_steps", 0)
            self.last_finite_loss[i] = meta.get("train_loss", float("nan"))
        self.step = loaded[0][1]["training"]["step"]
        if self.step > 0:
            self.optimizer.load_state(
                {key: members.assemble([storage.strip_prefix(t, f"adam.{key}.") for t, _ in loaded])
                 for key in StackedAdam.KEYS})

