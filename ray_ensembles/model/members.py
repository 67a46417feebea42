"""Member networks stored stacked: every parameter has a leading member dimension.

One process trains all of its members in one batched forward and backward pass. Nothing mixes
the member dimension: member m's outputs depend only on member m's parameters and rows, so the
gradient of the summed member losses, and any elementwise optimiser, treat members independently.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from .stacked_layers import Stacked, check_state, stack_sequential

# In place where autograd allows it (the result, not the input, gives the gradient): it saves a
# pass over memory, the largest cost of relu at inference.
ACTIVATIONS = {"relu": F.relu_, "tanh": torch.tanh_, "silu": F.silu, "gelu": F.gelu}


def member_seed(seed: int, member_id: int, attempt: int = 0) -> int:
    """The root seed of member `member_id`: a function of (seed, member_id, attempt) only."""
    return int(np.random.SeedSequence([seed, member_id, attempt]).generate_state(2, np.uint64)[0]
               >> np.uint64(1))


def epoch_permutations(member_seeds: list[int], epoch: int, num_rows: int, window: int | None = None) -> torch.Tensor:
    """(M, N) row order of every member for one epoch, or for one `window` of a streamed epoch;
    member m's depends on its seed only."""
    orders = []
    key = [epoch] if window is None else [epoch, window]
    for s in member_seeds:  # once per epoch, not per step
        g = torch.Generator().manual_seed(
            int(np.random.SeedSequence([s, *key]).generate_state(1, np.uint64)[0] >> np.uint64(1)))
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

    def reset_member(self, index: int):
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


class StackedMLP(Stacked):
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

    def reset_member(self, index: int, seed: int):
        """nn.Linear's default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), for member `index` only."""
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for w, b in zip(self.weights, self.biases):
                bound = 1.0 / math.sqrt(w.shape[1])
                w[index].copy_(torch.rand(w.shape[1:], generator=generator) * 2 * bound - bound)
                b[index].copy_(torch.rand(b.shape[1:], generator=generator) * 2 * bound - bound)
            for norm in self.norms or ():
                norm.reset_member(index)

    def forward(self, x):
        x = x.flatten(2)  # inputs of any shape (M, B, *S): the MLP sees their values in a row
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            if w.shape[2] < w.shape[1] and w.device.type == "cpu" and not torch.is_grad_enabled():
                # Few outputs (the Gaussian head's 2, 10 classes): at inference MKL's batched
                # matmul is faster with the weight column-major, which this small copy gives; in
                # training the copy's backward costs more than it saves.
                w = w.mT.contiguous().mT
            x = torch.baddbmm(b, x, w)  # (M, B, out)
            if i < last:
                if self.norms is not None:
                    x = self.norms[i](x)
                x = self.activation(x)
        return x


class FactoryMembers(nn.Module):
    """Members built by a user's `nn.Module` factory, one module each, run in a loop: the
    fallback for networks `stacked_layers` cannot stack.

    Member m is built under torch.manual_seed(its seed) (`build_member`), so its initialisation
    depends on (seed, m) only. Each module maps (B, *S) to (B, outputs), or to a (mean, raw
    variance) pair for regression. Input (M, B, *S), output (M, B, outputs).
    """

    def __init__(self, factory, seeds: list[int]):
        super().__init__()
        self.factory = factory
        self.nets = nn.ModuleList(build_member(factory, s) for s in seeds)

    def reset_member(self, index: int, seed: int):
        # in place: an optimiser may hold the parameters
        self.nets[index].load_state_dict(build_member(self.factory, seed).state_dict())

    def zero_member_(self, index: int, named: dict[str, torch.Tensor]):
        prefix = f"nets.{index}."
        for k, v in named.items():
            if k.startswith(prefix):
                v.zero_()

    def forward(self, x):
        outs = []
        for net, xm in zip(self.nets, x):
            out = net(xm)
            outs.append(torch.cat(out, dim=-1) if isinstance(out, (tuple, list)) else out)
        return torch.stack(outs)

    def member_state(self, index: int) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.nets[index].state_dict().items()}

    def member_view(self, index: int, named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        prefix = f"nets.{index}."
        return {k[len(prefix):]: v.detach().clone() for k, v in named.items() if k.startswith(prefix)}

    def assemble(self, states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {f"nets.{i}.{k}": v for i, s in enumerate(states) for k, v in s.items()}

    def grad_norms(self) -> torch.Tensor:
        return torch.stack([
            torch.stack([p.grad.square().sum() for p in net.parameters() if p.grad is not None]).sum().sqrt()
            for net in self.nets])

    def scale_grads(self, scale: torch.Tensor):
        for net, factor in zip(self.nets, scale):
            for p in net.parameters():
                if p.grad is not None:
                    p.grad.mul_(factor)

    def check_member_state(self, state: dict[str, torch.Tensor], index: int = 0):
        check_state(self.nets[index].state_dict(), state, lambda v: v.shape)

    def load_member_state(self, index: int, state: dict[str, torch.Tensor]):
        check_state(self.nets[index].state_dict(), state, lambda v: v.shape)
        self.nets[index].load_state_dict(state)


def build_member(factory, seed: int) -> nn.Module:
    """One member of `factory`, built under torch.manual_seed(seed), the global RNG left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = factory()
    if not isinstance(net, nn.Module):
        raise TypeError(f"The 'member_factory' must return an nn.Module. Got {type(net).__name__} instead.")
    return net


SHAPE = ("hidden_dim", "depth", "activation", "batch_norm")  # what decides which members stack


class MemberGroups(nn.Module):
    """Members of several shapes: one StackedMLP per shape, run one batched pass each, outputs
    back in member order. Input (M, B, dim_in), output (M, B, dim_out). For prediction and
    storage; such an ensemble is assembled from trained members, never trained as one."""

    def __init__(self, dim_in: int, dim_out: int, shapes: list[tuple], seeds: list[int]):
        super().__init__()
        self.shapes = list(dict.fromkeys(shapes))                 # in order of first appearance
        self.where = []                                           # member -> (group, index in it)
        counts = [0] * len(self.shapes)
        for shape in shapes:
            g = self.shapes.index(shape)
            self.where.append((g, counts[g]))
            counts[g] += 1
        self.groups = nn.ModuleList(StackedMLP(n, dim_in, dim_out, *shape) for n, shape in zip(counts, self.shapes))
        for (g, j), seed in zip(self.where, seeds):
            self.groups[g].reset_member(j, seed)
        self.indices = [[m for m, (g2, _) in enumerate(self.where) if g2 == g] for g in range(len(self.shapes))]

    def forward(self, x):
        outs = [group(x[idx]) for group, idx in zip(self.groups, self.indices)]
        out = x.new_empty(x.shape[0], x.shape[1], outs[0].shape[-1])
        for idx, o in zip(self.indices, outs):
            out[idx] = o
        return out

    def member_state(self, index: int) -> dict[str, torch.Tensor]:
        g, j = self.where[index]
        return self.groups[g].member_state(j)

    def check_member_state(self, state: dict[str, torch.Tensor], index: int = 0):
        g, _ = self.where[index]
        self.groups[g].check_member_state(state)

    def load_member_state(self, index: int, state: dict[str, torch.Tensor]):
        g, j = self.where[index]
        self.groups[g].load_member_state(j, state)


def build_members(owner: str, seeds: list[int], input_shape: tuple[int, ...], dim_out: int, hidden_dim: int,
                  depth: int, activation: str, batch_norm: bool, member_factory=None) -> nn.Module:
    """One member per seed, each initialised from its own seed: stacked MLPs (on flattened
    inputs), or the modules `member_factory` builds, checked to map (B, *input_shape) to
    (B, dim_out): stacked layer by layer where `stacked_layers` can, else run in a loop."""
    if member_factory is None:
        members = StackedMLP(len(seeds), math.prod(input_shape), dim_out, hidden_dim, depth, activation, batch_norm)
        for i, s in enumerate(seeds):
            members.reset_member(i, s)
        return members
    members = FactoryMembers(member_factory, seeds)
    net = members.nets[0]
    was_training = net.training
    net.eval()
    shape = ", ".join(map(str, input_shape))
    try:
        with torch.no_grad():
            out = members(torch.zeros(1, 2, *input_shape))[0]
    except (RuntimeError, ValueError, TypeError, IndexError) as err:  # e.g. a layer of another width
        raise ValueError(f"The 'member_factory' of {owner} must build modules taking inputs (B, {shape}). "
                         f"Got a module that fails on a batch of 2 zeros: {str(err).splitlines()[0]}") from None
    finally:
        net.train(was_training)
    if out.shape != (2, dim_out):
        raise ValueError(f"The 'member_factory' of {owner} must build modules mapping (B, {shape}) to "
                         f"(B, {dim_out}). Got output shape {tuple(out.shape)} for B=2 instead.")
    return stack_sequential(list(members.nets), functools.partial(build_member, member_factory)) or members
