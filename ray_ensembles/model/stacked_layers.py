"""User-built members of one `nn.Sequential` architecture, run as one batched pass.

A factory's members are M copies of one architecture. When that is an `nn.Sequential` of the
common layers below, `stack_sequential` turns the M modules into one `StackedSequential`: every
parameter and buffer gets a leading member dimension, and each layer runs once for all members.

- Linear: a batched matmul over the member dimension (`baddbmm`), as the built-in MLP's.
- Conv1d, Conv2d: one grouped convolution, the members' channels side by side (groups = M x g).
- BatchNorm1d, BatchNorm2d: one batch norm over the members' channels side by side, each
  member's statistics its own.
- LayerNorm: over each member's rows, with its own weight and bias.
- Pools, activations, Dropout, Flatten, Identity: the layer itself, which never mixes channels.

Activations travel in one of two layouts: "members" (M, B, ...), which Linear and LayerNorm
take, and "channels" (B, M x C, ...), which convolutions, batch norms and pools take; a layer
converts only when the layout it needs differs. On a CPU a network with channel layers runs
member by member instead (`StackedSequential.channels_path`): there one thread is bound by
arithmetic and cache, and the grouped calls were slower than the loop (docs/benchmarks.md). A
member's output depends on its own parameters and rows only, so the summed loss's gradient is
each member's own, as in the loop.

Member state keeps the user's names and shapes ("0.weight", (out, in)), so checkpoints and saved
ensembles are the same files whichever path trained them. Any other layer, or a network that is
not a plain Sequential (a ResNet's blocks), runs as the per-member loop (`FactoryMembers`).
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

# layers that never mix channels or rows: run as they are, on either layout
ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Softplus,
               nn.Mish, nn.Hardswish, nn.Identity, nn.Dropout)
POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
         nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.Dropout1d, nn.Dropout2d)


def check_state(own: dict, state: dict, expected_shape):
    """Raise ValueError unless `state` has exactly the keys of `own`, each of `expected_shape(own[key])`."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"member state does not match the architecture: missing {missing}, "
                         f"unexpected {unexpected}")
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(expected_shape(v)):
            raise ValueError(f"member state '{k}' has shape {tuple(state[k].shape)}, "
                             f"expected {tuple(expected_shape(v))}")


class Stacked(nn.Module):
    """The per-member interface the training loop uses, for members whose every parameter and
    buffer has a leading member dimension (`members.FactoryMembers` has the same interface)."""

    @staticmethod
    def user_name(name: str) -> str:
        """A tensor's name in one member's state."""
        return name

    def member_state(self, index: int) -> dict[str, torch.Tensor]:
        """Member `index`'s parameters and buffers, without the member dimension."""
        return self.member_view(index, self.state_dict())

    def member_view(self, index: int, named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Member `index`'s part of tensors named like this module's (e.g. Adam moments)."""
        return {self.user_name(k): v[index].detach().clone() for k, v in named.items()}

    def assemble(self, states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The inverse of member_view: per-member tensors back into module-shaped ones."""
        names = {self.user_name(k): k for k in self.state_dict()}
        return {names[k]: torch.stack([s[k] for s in states]) for k in states[0]}

    def zero_member_(self, index: int, named: dict[str, torch.Tensor]):
        """Zero member `index`'s part of tensors named like this module's, in place."""
        for v in named.values():
            v[index].zero_()

    def grad_norms(self) -> torch.Tensor:
        """Each member's gradient norm, (M,)."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        return torch.stack([g.flatten(1).square().sum(1) for g in grads]).sum(0).sqrt()

    def scale_grads(self, scale: torch.Tensor):
        """Multiply member m's gradient by scale[m]."""
        for p in self.parameters():
            if p.grad is not None:
                p.grad.mul_(scale.view(-1, *[1] * (p.grad.ndim - 1)))

    def check_member_state(self, state: dict[str, torch.Tensor], index: int = 0):
        """Raise ValueError unless `state` is one member's tensors for this architecture (every
        member's: `index` matters only to MemberGroups)."""
        check_state({self.user_name(k): v for k, v in self.state_dict().items()}, state, lambda v: v.shape[1:])

    def load_member_state(self, index: int, state: dict[str, torch.Tensor]):
        self.check_member_state(state)
        with torch.no_grad():
            for k, v in self.state_dict().items():
                v[index].copy_(state[self.user_name(k)])


def to_channels(x: torch.Tensor) -> torch.Tensor:
    """(M, B, C, *positions) -> (B, M x C, *positions)."""
    return x.transpose(0, 1).flatten(1, 2)


def to_members(x: torch.Tensor, num_members: int) -> torch.Tensor:
    """(B, M x C, *positions) -> (M, B, C, *positions)."""
    return x.unflatten(1, (num_members, -1)).transpose(0, 1)


class StackedLayer(nn.Module):
    """One layer of M members: the user's parameters and buffers, each with a leading member
    dimension; `layout` is the one its forward takes."""

    layout = "members"

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        for name, _ in layers[0].named_parameters(recurse=False):
            self.register_parameter(name, nn.Parameter(torch.stack([getattr(m, name).detach() for m in layers])))
        for name, b in layers[0].named_buffers(recurse=False):
            if b is not None:
                self.register_buffer(name, torch.stack([getattr(m, name) for m in layers]))
        self.num_members = len(layers)


class StackedLinear(StackedLayer):
    def forward(self, x):                                       # (M, B, ..., in)
        flat = x if x.ndim == 3 else x.flatten(1, -2)
        bias = self.bias.unsqueeze(1) if getattr(self, "bias", None) is not None else flat.new_zeros(())
        out = torch.baddbmm(bias, flat, self.weight.mT)
        return out if x.ndim == 3 else out.view(*x.shape[:-1], -1)

    def member_forward(self, x, m: int):                        # member m's (B, ..., in)
        return F.linear(x, self.weight[m], self.bias[m] if getattr(self, "bias", None) is not None else None)


class StackedConv(StackedLayer):
    layout = "channels"

    def __init__(self, layers):
        super().__init__(layers)
        conv = layers[0]
        self.function = F.conv1d if isinstance(conv, nn.Conv1d) else F.conv2d
        self.options = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation)
        self.groups = conv.groups

    def forward(self, x):                                       # (B, M x C, ...)
        bias = self.bias.flatten() if getattr(self, "bias", None) is not None else None
        return self.function(x, self.weight.flatten(0, 1), bias, **self.options, groups=self.groups * self.num_members)

    def member_forward(self, x, m: int):                        # member m's (B, C, ...)
        bias = self.bias[m] if getattr(self, "bias", None) is not None else None
        return self.function(x, self.weight[m], bias, **self.options, groups=self.groups)


class StackedBatchNormLayer(StackedLayer):
    layout = "channels"

    def __init__(self, layers):
        super().__init__(layers)
        self.eps, self.momentum = layers[0].eps, layers[0].momentum

    def forward(self, x):                                       # (B, M x C, ...)
        return self._norm(x, slice(None))

    def member_forward(self, x, m: int):                        # member m's (B, C, ...)
        return self._norm(x, m)

    def _norm(self, x, members):
        if self.training:
            self.num_batches_tracked[members] += 1
        weight = self.weight[members].flatten() if getattr(self, "weight", None) is not None else None
        bias = self.bias[members].flatten() if getattr(self, "bias", None) is not None else None
        # views of the stacked buffers: batch_norm's in-place update of the running statistics
        # lands in each member's own slice
        return F.batch_norm(x, self.running_mean[members].view(-1), self.running_var[members].view(-1), weight, bias,
                            self.training, self.momentum, self.eps)


class StackedLayerNorm(StackedLayer):
    def __init__(self, layers):
        super().__init__(layers)
        self.shape, self.eps = layers[0].normalized_shape, layers[0].eps

    def forward(self, x):                                       # (M, B, ..., *shape)
        out = F.layer_norm(x, self.shape, None, None, self.eps)
        between = [1] * (x.ndim - 1 - len(self.shape))
        if getattr(self, "weight", None) is not None:
            out = out * self.weight.view(self.num_members, *between, *self.shape)
        if getattr(self, "bias", None) is not None:
            out = out + self.bias.view(self.num_members, *between, *self.shape)
        return out

    def member_forward(self, x, m: int):
        weight, bias = (getattr(self, name, None) for name in ("weight", "bias"))
        return F.layer_norm(x, self.shape, None if weight is None else weight[m], None if bias is None else bias[m], self.eps)


class StackedFlatten(nn.Module):
    layout = "members"

    def forward(self, x):                                       # (M, B, ...) -> (M, B, features)
        return x.flatten(2)

    def member_forward(self, x, m: int):
        return x.flatten(1)


class AnyLayout(nn.Module):
    """A layer that mixes neither members nor channels, run as it is."""

    layout = None

    def __init__(self, layer: nn.Module, layout: str | None = None):
        super().__init__()
        self.layer, self.layout = layer, layout

    def forward(self, x):
        return self.layer.forward(x)

    def member_forward(self, x, m: int):
        return self.layer.forward(x)


def stacked_layer(layers: list[nn.Module]) -> nn.Module | None:
    """The stacked version of one position of M Sequentials, or None if it has none."""
    first = layers[0]
    if any(type(m) is not type(first) for m in layers):
        return None
    if isinstance(first, nn.Linear):
        return StackedLinear(layers)
    if isinstance(first, (nn.Conv1d, nn.Conv2d)) and first.padding_mode == "zeros" and not isinstance(first.padding, str):
        return StackedConv(layers)
    if isinstance(first, (nn.BatchNorm1d, nn.BatchNorm2d)) and first.track_running_stats and first.momentum is not None:
        return StackedBatchNormLayer(layers)
    if isinstance(first, nn.LayerNorm):
        return StackedLayerNorm(layers)
    if isinstance(first, nn.Flatten) and first.start_dim == 1 and first.end_dim == -1:
        return StackedFlatten()
    if type(first) in ELEMENTWISE:
        return AnyLayout(first)
    if type(first) in POOLS:
        return AnyLayout(first, "channels")
    return None


class StackedSequential(Stacked):
    """M `nn.Sequential` members of one architecture as one module: input (M, B, *S), output
    (M, B, outputs). `build(seed)` builds one member afresh (a restart after divergence)."""

    def __init__(self, layers: list[nn.Module], build):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.build = build
        self.convolutional = any(layer.layout == "channels" for layer in layers)
        # how a network with channel layers runs: each layer once for all members ("grouped"), or
        # each member through the whole network in turn ("per_member", the loop's work on stacked
        # parameters). None: per member on a CPU, where one thread works through one member's
        # activations while they are in cache faster than through the stack's; grouped elsewhere
        self.channels_path: str | None = None

    def forward(self, x):
        if self.convolutional and (self.channels_path or ("per_member" if x.device.type == "cpu" else "grouped")) == "per_member":
            return torch.stack([self._member_forward(xm, m) for m, xm in enumerate(x.unbind(0))])
        num_members, layout = len(x), "members"
        for layer in self.layers:
            if layer.layout is not None and layer.layout != layout:
                x = to_channels(x) if layer.layout == "channels" else to_members(x, num_members)
                layout = layer.layout
            x = layer.forward(x)  # not __call__: these modules are ours, with no hooks to run
        return to_members(x, num_members) if layout == "channels" else x

    def _member_forward(self, x, m: int):
        for layer in self.layers:
            x = layer.member_forward(x, m)
        return x

    @staticmethod
    def user_name(name: str) -> str:
        return name.removeprefix("layers.")

    def reset_member(self, index: int, seed: int):
        self.load_member_state(index, self.build(seed).state_dict())


def stack_sequential(nets: list[nn.Module], build) -> StackedSequential | None:
    """The members `nets` as one StackedSequential, or None unless each is a plain nn.Sequential
    of the same layers, every one of which has a stacked version."""
    if not all(type(n) is nn.Sequential for n in nets) or len({len(n) for n in nets}) != 1:
        return None
    layers = []
    for position in zip(*nets):
        layer = stacked_layer(list(position))
        if layer is None:
            return None
        layers.append(layer)
    device = next(iter(nets[0].parameters()), torch.zeros(())).device
    return StackedSequential(layers, build).to(device)
