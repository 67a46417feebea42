"""Adam over stacked members: one fused kernel call per step, M independent Adams."""

from __future__ import annotations

import torch


class StackedAdam:
    """Adam over the members' parameters: one fused kernel call per step.

    It calls the kernel torch.optim.Adam(fused=True) calls, so the arithmetic is the same. What it
    drops is that class's per-step Python work (grouping tensors by device and dtype, hooks,
    profiler ranges, lazy state), which at UCI size cost more than the kernel itself. Adam is
    elementwise, so one call over the stack is M independent Adams.

    Step counts are kept per member, as M separate Adams would: a member restarted after
    divergence starts its bias correction afresh. While every member's count is the same, the
    kernel runs on the stacked tensors; after a restart, on per-member views.
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
