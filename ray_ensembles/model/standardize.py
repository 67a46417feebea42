"""Input and target standardisation, fitted on the training data.

Inputs are standardised per channel: per column of a table (N, D), per channel of channel-first
inputs (N, C, H, W) or (N, C, L), the statistics taken over all positions of the channel.

Statistics are float64 and inputs are standardised in float64: a feature such as a Unix
timestamp keeps its variation, which float32 (7 digits) would round away before the subtraction.
Members see float32 standardised values; regression predictions come back in original units and
in the fitted target's dtype.
"""

from __future__ import annotations

import torch
from torch import nn


class Moments:
    """Per-column count, mean, sum of squared deviations, min and max in float64, merged batch by
    batch (Chan et al.'s parallel Welford update): one pass over a table of any length gives the
    same statistics as the whole table at once, up to float64 rounding."""

    def __init__(self, dim: int):
        self.count = 0
        self.mean = torch.zeros(dim, dtype=torch.float64)
        self.m2 = torch.zeros(dim, dtype=torch.float64)
        self.min = torch.full((dim,), float("inf"), dtype=torch.float64)
        self.max = torch.full((dim,), float("-inf"), dtype=torch.float64)

    @classmethod
    def of(cls, x: torch.Tensor) -> "Moments":
        moments = cls(x.shape[1])
        moments.update(x)
        return moments

    def update_channels(self, x: torch.Tensor, rows: int = 4096):
        """Add inputs (n, C, *positions) per channel, `rows` rows at a time (bounded float64 copies)."""
        for part in x.split(rows):
            self.update(part.movedim(1, -1).reshape(-1, part.shape[1]) if part.ndim > 2 else part)

    def update(self, x: torch.Tensor):
        """Add rows x (n, dim), any real dtype."""
        x = x.double()
        n = len(x)
        if n == 0:
            return
        mean = x.mean(0)
        m2 = (x - mean).square().sum(0)
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * (n / total)
        self.m2 += m2 + delta.square() * (self.count * n / total)
        self.count = total
        self.min = torch.minimum(self.min, x.amin(0))
        self.max = torch.maximum(self.max, x.amax(0))

    @property
    def std(self) -> torch.Tensor:
        """The population std; a constant column's is 1, so it standardises to 0, not NaN."""
        std = (self.m2 / self.count).sqrt()
        return torch.where(std > 0, std, torch.ones_like(std))


class Standardizer(nn.Module):
    """Per-channel mean and std of inputs of `input_shape` (C,) and, with `dim_out`, of the
    target (T,). Identity until `fit`, or always with `standardize_inputs=False` (the targets
    are still standardised); a constant channel gets std 1, so it standardises to 0, not NaN.
    `x_range` sets the FGSM step (eps * range per channel)."""

    def __init__(self, input_shape: tuple[int, ...], dim_out: int | None = None, standardize_inputs: bool = True):
        super().__init__()
        channels = input_shape[0]
        # statistics broadcast over a channel's positions: (C,) for a table, (C, 1, 1) for images
        self.broadcast = (channels, *[1] * (len(input_shape) - 1))
        self.standardize_inputs = standardize_inputs
        self.register_buffer("x_mean", torch.zeros(channels, dtype=torch.float64))
        self.register_buffer("x_std", torch.ones(channels, dtype=torch.float64))
        self.register_buffer("x_range", torch.ones(channels, dtype=torch.float64))
        if dim_out is not None:
            self.register_buffer("y_mean", torch.zeros(dim_out, dtype=torch.float64))
            self.register_buffer("y_std", torch.ones(dim_out, dtype=torch.float64))
        self.has_target = dim_out is not None
        self.fitted = False
        self.feature_names: list[str] | None = None
        self.target_dtype = torch.float32  # of the fitted target: regression predictions come in it

    @property
    def channels(self) -> int:
        return self.broadcast[0]

    @property
    def _names(self) -> tuple[str, ...]:
        return ("x_mean", "x_std", "x_range") + (("y_mean", "y_std") if self.has_target else ())

    def fit(self, x: torch.Tensor, y: torch.Tensor | None = None):
        """Fit to checked inputs (N, *input_shape) and, for a target-standardising one, targets (N, T)."""
        target = None if y is None or not self.has_target else Moments.of(y.reshape(len(y), -1))
        inputs = Moments(self.channels)
        inputs.update_channels(x)
        self.fit_moments(inputs, target, None if y is None else y.dtype)

    def fit_moments(self, x: Moments, y: Moments | None = None, target_dtype: torch.dtype | None = None):
        """Fit to the moments of the inputs and, for a target-standardising one, of the targets
        (a streaming pass over a table, or `Moments.of` tensors in memory)."""
        if self.standardize_inputs:
            self.x_mean.copy_(x.mean)
            self.x_std.copy_(x.std)
        self.x_range.copy_(x.max - x.min)
        if y is not None and self.has_target:
            self.target_dtype = target_dtype  # predictions come back in it: a float64 target stays exact
            self.y_mean.copy_(y.mean)
            self.y_std.copy_(y.std)
        self.fitted = True

    def standardize_x(self, x: torch.Tensor) -> torch.Tensor:
        """Original-unit inputs to the members' float32 standardised ones, computed in float64."""
        if not self.standardize_inputs:
            return x.float()
        return ((x.double() - self.x_mean.view(self.broadcast)) / self.x_std.view(self.broadcast)).float()

    def standardize_y(self, y: torch.Tensor) -> torch.Tensor:
        """Targets in the members' units: standardised for regression, labels unchanged."""
        return ((y.double() - self.y_mean) / self.y_std).float() if self.has_target else y

    def original_units(self, mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Standardised means and variances (M, B, T) in the target's units and dtype."""
        y_mean, y_std = self.y_mean.to(self.target_dtype), self.y_std.to(self.target_dtype)
        return mean.to(self.target_dtype) * y_std + y_mean, var.to(self.target_dtype) * y_std.square()

    def adversarial_step(self, eps: float) -> torch.Tensor:
        """FGSM step per channel in standardised units, eps * range / std, broadcast over a
        channel's positions: (D,) for a table, (C, 1, 1) for images."""
        return (eps * self.x_range / self.x_std).float().view(self.broadcast)

    def state(self) -> dict:
        """The statistics as plain lists, as the manifest stores them."""
        return dict({name: getattr(self, name).tolist() for name in self._names}, fitted=self.fitted,
                    feature_names=self.feature_names,
                    target_dtype=str(self.target_dtype).removeprefix("torch."))

    def load_state(self, state: dict):
        try:
            for name in self._names:
                value = torch.tensor(state[name], dtype=torch.float64)
                if value.shape != getattr(self, name).shape:
                    raise ValueError(f"'{name}' has shape {tuple(value.shape)}, expected "
                                     f"{tuple(getattr(self, name).shape)}")
                getattr(self, name).copy_(value)
        except (KeyError, TypeError) as err:
            raise ValueError(f"normalisation statistics are incomplete ({err!r})") from None
        self.fitted = bool(state.get("fitted", True))
        self.feature_names = state.get("feature_names")
        self.target_dtype = getattr(torch, state.get("target_dtype", "float32"))
