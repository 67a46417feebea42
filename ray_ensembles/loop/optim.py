"""Optimisers over stacked members: one fused kernel call per step, M independent optimisers.

Each calls the kernel its torch.optim class calls with fused=True (Adam, AdamW, SGD), so the
arithmetic is the same. What they drop is that class's per-step Python work (grouping tensors by
device and dtype, hooks, profiler ranges, lazy state), which at UCI size cost more than the
kernel itself. The updates are elementwise, so one call over the stack is M independent
optimisers, for stacked and factory-built members alike. Weight decay is each optimiser's own:
added to the gradient (Adam, SGD) or decoupled from it (AdamW).
"""

from __future__ import annotations

import torch


class StackedOptimizer:
    """State per member and parameter, stacked as the parameters are; `KEYS` name it, and
    checkpoints store it under `PREFIX.<key>.`"""

    KEYS: tuple[str, ...] = ()
    PREFIX = ""

    def __init__(self, members, lr: float, weight_decay: float):
        self.members = members
        named = dict(members.named_parameters())
        self.names, self.params = list(named), list(named.values())
        self.lr, self.weight_decay = lr, weight_decay

    def named_state(self, key: str) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.state[key]))

    def load_state(self, state: dict[str, dict[str, torch.Tensor]]):
        missing = sorted({f"{self.PREFIX}.{key}.*" for key in self.KEYS for name in self.names if name not in state[key]})
        if missing:
            raise ValueError(f"The checkpoint lacks the optimiser state {missing}, so training cannot resume "
                             "from it (files from before per-member Adam step counts, or of another "
                             "optimiser). It still loads as an ensemble.")
        with torch.no_grad():
            for key, named in state.items():
                for name, t in zip(self.names, self.state[key]):
                    t.copy_(named[name])
        self._state_changed()

    def reset_member(self, index: int):
        """A fresh optimiser for member `index` only: its state zeroed."""
        for key in self.KEYS:
            self.members.zero_member_(index, self.named_state(key))
        self._state_changed()

    def _state_changed(self):
        pass

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def _live(self) -> list[int]:
        """The parameters that have a gradient: a factory member may leave some unused."""
        return [j for j, p in enumerate(self.params) if p.grad is not None]


class StackedSGD(StackedOptimizer):
    """SGD with momentum (and Nesterov's variant) over the stack. The momentum buffers start at
    zero, which gives torch's first step (buffer = gradient) without a per-member first-step flag,
    so a member restarted alone needs only its buffer zeroed."""

    KEYS = ("momentum_buffer",)
    PREFIX = "sgd"

    def __init__(self, members, lr: float, weight_decay: float, momentum: float = 0.9, nesterov: bool = False):
        super().__init__(members, lr, weight_decay)
        self.momentum, self.nesterov = momentum, nesterov
        self.state = {"momentum_buffer": [torch.zeros_like(p) for p in self.params]}

    @torch.no_grad()
    def step(self):
        live = self._live()
        if not live:
            return
        buffers = [self.state["momentum_buffer"][j] for j in live] if self.momentum else []
        torch._fused_sgd_([self.params[j] for j in live], [self.params[j].grad for j in live], buffers,
                          weight_decay=self.weight_decay, momentum=self.momentum, lr=self.lr, dampening=0.0,
                          nesterov=self.nesterov, maximize=False, is_first_step=False)


class StackedAdam(StackedOptimizer):
    """Adam, or with `decoupled` weight decay AdamW, over the members' parameters.

    Step counts are kept per member, as M separate Adams would: a member restarted after
    divergence starts its bias correction afresh. While every member's count is the same, the
    kernel runs on the stacked tensors; after a restart, on per-member views.
    """

    KEYS = ("exp_avg", "exp_avg_sq", "step")
    PREFIX = "adam"

    def __init__(self, members, num_members: int, lr: float, weight_decay: float, decoupled: bool = False):
        super().__init__(members, lr, weight_decay)
        named = dict(zip(self.names, self.params))
        # per member and parameter: (M,) for a stacked parameter, () for one a single member owns
        steps = members.assemble([{k: torch.zeros((), device=v.device) for k, v in members.member_view(i, named).items()}
                                  for i in range(num_members)])
        self.state = {"exp_avg": [torch.zeros_like(p) for p in self.params],
                      "exp_avg_sq": [torch.zeros_like(p) for p in self.params],
                      "step": [steps[name] for name in self.names]}
        self.kernel = torch._fused_adamw_ if decoupled else torch._fused_adam_
        self._state_changed()

    def _state_changed(self):
        self._uniform = all(bool((s == s.flatten()[0]).all()) for s in self.state["step"])
        self._first_counts = [s.flatten()[0] for s in self.state["step"]]  # views: always current

    @torch.no_grad()
    def step(self):
        live = self._live()
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
        self.kernel(params, grads, exp_avgs, exp_avg_sqs, [], counts, amsgrad=False, lr=self.lr,
                    beta1=0.9, beta2=0.999, weight_decay=self.weight_decay, eps=1e-8, maximize=False)


def stacked_optimizer(members, num_members: int, settings):
    """The loop's optimiser for `settings.optimizer`: "adam", "adamw" or "sgd"."""
    if settings.optimizer == "sgd":
        return StackedSGD(members, settings.lr, settings.weight_decay, settings.momentum, settings.nesterov)
    return StackedAdam(members, num_members, settings.lr, settings.weight_decay, decoupled=settings.optimizer == "adamw")
