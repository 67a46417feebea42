"""Member networks stored stacked: every parameter has a leading member dimension.

One process trains all of its members in one batched forward and backward pass. Nothing mixes
the member dimension: member m's outputs depend only on member m's parameters and rows, so the
gradient of the summed member losses, and any elementwise optimiser, treat members independently.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

ACTIVATIONS = {"relu": F.relu, "tanh": torch.tanh, "silu": F.silu, "gelu": F.gelu}


def member_seed(seed: int, member_id: int, attempt: int = 0) -> int:
    """The root seed of member `member_id`: a function of (seed, member_id, attempt) only."""
    return int(np.random.SeedSequence([seed, member_id, attempt]).generate_state(2, np.uint64)[0]
               >> np.uint64(1))


def epoch_permutations(member_seeds: list[int], epoch: int, num_rows: int) -> torch.Tensor:
    """(M, N) row order of every member for one epoch; member m's depends on its seed only."""
    orders = []
    for s in member_seeds:  # once per epoch, not per step
        g = torch.Generator().manual_seed(
            int(np.random.SeedSequence([s, epoch]).generate_state(1, np.uint64)[0] >> np.uint64(1)))
        orders.append(torch.randperm(num_rows, generator=g))
    return torch.stack(orders)


class StackedBatchNorm(nn.Module):
    """Batch normalisation over each member's own rows: (M, B, H) -> (M, B, H)."""

    def __init__(self, num_members: int, dim: int, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.weight = nn.Parameter(torch.ones(num_members, 1, dim))
        self.bias = nn.Parameter(torch.zeros(num_members, 1, dim))
        self.register_buffer("running_mean", torch.zeros(num_members, 1, dim))
        self.register_buffer("running_var", torch.ones(num_members, 1, dim))

    def reset_member(self, index: int, generator: torch.Generator):
        with torch.no_grad():
            self.weight[index].fill_(1.0)
            self.bias[index].zero_()
            self.running_mean[index].zero_()
            self.running_var[index].fill_(1.0)

    def forward(self, h):
        if self.training:
            var, mean = torch.var_mean(h, dim=1, keepdim=True, correction=0)  # (M, 1, H)
            with torch.no_grad():
                n = h.shape[1]
                unbiased = var * (n / max(n - 1, 1))
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        return (h - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias


class StackedMLP(nn.Module):
    """M independent MLPs: dim_in -> `depth` hidden layers of `hidden_dim` -> dim_out.

    Input (M, B, dim_in), output (M, B, dim_out). Weights are (M, in, out) so each layer is one
    `baddbmm` for all members.
    """

    def __init__(self, num_members: int, dim_in: int, dim_out: int, hidden_dim: int, depth: int,
                 activation: str = "relu", batch_norm: bool = False):
        super().__init__()
        dims = [dim_in] + [hidden_dim] * depth + [dim_out]
        self.num_members = num_members
        self.activation = ACTIVATIONS[activation]
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(num_members, i, o)) for i, o in zip(dims[:-1], dims[1:]))
        self.biases = nn.ParameterList(
            nn.Parameter(torch.empty(num_members, 1, o)) for o in dims[1:])
        self.norms = nn.ModuleList(
            StackedBatchNorm(num_members, hidden_dim) for _ in range(depth)) if batch_norm else None

    def reset_member(self, index: int, generator: torch.Generator):
        """nn.Linear's default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), for member `index` only."""
        with torch.no_grad():
            for w, b in zip(self.weights, self.biases):
                bound = 1.0 / math.sqrt(w.shape[1])
                w[index].copy_(torch.rand(w.shape[1:], generator=generator) * 2 * bound - bound)
                b[index].copy_(torch.rand(b.shape[1:], generator=generator) * 2 * bound - bound)
            for norm in self.norms or ():
                norm.reset_member(index, generator)

    def forward(self, x):
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = torch.baddbmm(b, x, w)  # (M, B, out)
            if i < last:
                if self.norms is not None:
                    x = self.norms[i](x)
                x = self.activation(x)
        return x

    def member_state(self, index: int) -> dict[str, torch.Tensor]:
        """Member `index`'s parameters and buffers, without the member dimension."""
        return {k: v[index].detach().clone() for k, v in self.state_dict().items()}

    def load_member_state(self, index: int, state: dict[str, torch.Tensor]):
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(f"member state does not match the architecture: missing {missing}, "
                             f"unexpected {unexpected}")
        with torch.no_grad():
            for k, v in own.items():
                if tuple(state[k].shape) != tuple(v.shape[1:]):
                    raise ValueError(f"member state '{k}' has shape {tuple(state[k].shape)}, "
                                     f"expected {tuple(v.shape[1:])}")
                v[index].copy_(state[k])
