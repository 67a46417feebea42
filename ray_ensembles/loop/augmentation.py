"""Per-member training augmentation: a transform of each member's mini-batch, on its device.

A transform is any callable `transform(x, generator) -> x` taking one member's batch (B, *S) of
standardised inputs and a `torch.Generator` it draws all its randomness from, and returning a
batch of the same shape and dtype. The loop gives member m at step t a generator seeded from
(member m's seed, t) only, so augmentation resumes exactly and does not depend on which members
share a process. It is applied in training only, never at evaluation or prediction.

`RandomCrop` and `RandomHorizontalFlip` are the standard image augmentations, batched as torch
ops over (B, C, H, W) (or any (B, ..., H, W)); they refuse table rows (B, D), whose feature order
they would mirror or shift. `Compose` chains transforms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model.members import member_seed
from ..model.validation import check_float, check_int, fail

AUGMENTATION_STREAM = 2  # member_seed's `attempt` slot for augmentation (1: the random perturbation)


def check_images(transform, x: torch.Tensor):
    if x.ndim < 3:
        raise ValueError(f"{transform!r} takes batches of images (B, C, H, W) or (B, H, W). "
                         f"Got a batch of shape {tuple(x.shape)} instead.")


class RandomCrop:
    """Pad the last two dimensions by `padding` (zeros: the channel's mean once standardised)
    and take a random window of the original size from each row, as torchvision's
    RandomCrop(size, padding) does per image."""

    def __init__(self, padding: int = 4):
        self.padding = check_int("RandomCrop", "padding", padding, minimum=1)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        check_images(self, x)
        p, (h, w), b = self.padding, x.shape[-2:], len(x)
        padded = F.pad(x, (p, p, p, p))
        top = torch.randint(0, 2 * p + 1, (b, 1), generator=generator, device=x.device)
        left = torch.randint(0, 2 * p + 1, (b, 1), generator=generator, device=x.device)
        rows = (top + torch.arange(h, device=x.device))[:, :, None]          # (B, H, 1)
        cols = (left + torch.arange(w, device=x.device))[:, None, :]         # (B, 1, W)
        batch = torch.arange(b, device=x.device)[:, None, None]
        # positions first, so one advanced index picks every row's window: (B, H, W, ...)
        return padded.movedim((-2, -1), (1, 2))[batch, rows, cols].movedim((1, 2), (-2, -1))

    def __repr__(self):
        return f"RandomCrop(padding={self.padding})"


class RandomHorizontalFlip:
    """Mirror each row's last dimension with probability `p`."""

    def __init__(self, p: float = 0.5):
        self.p = check_float("RandomHorizontalFlip", "p", p, minimum=0.0)
        if self.p > 1:
            fail("RandomHorizontalFlip", "p", "a probability in [0, 1]", p)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        check_images(self, x)
        flip = torch.rand(len(x), generator=generator, device=x.device) < self.p
        return torch.where(flip.view(-1, *[1] * (x.ndim - 1)), x.flip(-1), x)

    def __repr__(self):
        return f"RandomHorizontalFlip(p={self.p})"


class Compose:
    """The transforms in order, each drawing from the same generator."""

    def __init__(self, *transforms):
        if not transforms or not all(callable(t) for t in transforms):
            raise TypeError(f"The 'transforms' of Compose must be callables. Got {transforms!r} instead.")
        self.transforms = transforms

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        for t in self.transforms:
            x = t(x, generator)
        return x

    def __repr__(self):
        return f"Compose({', '.join(map(repr, self.transforms))})"


def augment_members(transform, xs: torch.Tensor, member_seeds: list[int], step: int) -> torch.Tensor:
    """Each member's batch of xs (M, B, *S) transformed with its own generator, seeded from
    (its seed, step)."""
    out = []
    for seed, x in zip(member_seeds, xs):
        generator = torch.Generator(device=xs.device).manual_seed(member_seed(seed, step, AUGMENTATION_STREAM))
        out.append(transform(x, generator))
    return torch.stack(out)


def check_transform(transform, input_shape: tuple[int, ...]):
    """Run `transform` on a batch of 2 zeros of `input_shape`: it must return a tensor of the
    same shape and dtype, or the Trainer refuses it before any work."""
    x = torch.zeros(2, *input_shape)
    try:
        out = transform(x, torch.Generator().manual_seed(0))
    except Exception as err:  # noqa: BLE001 - any failure of user code is reported as the refusal
        raise ValueError(f"The 'augment' parameter of Trainer must be a transform(x, generator) of a batch "
                         f"(B, {', '.join(map(str, input_shape))}). Got {transform!r}, which fails on a batch of "
                         f"2 zeros: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
    got = (tuple(out.shape), out.dtype) if isinstance(out, torch.Tensor) else type(out).__name__
    if got != (tuple(x.shape), x.dtype):
        raise ValueError(f"The 'augment' parameter of Trainer must return a batch of the shape and dtype it takes, "
                         f"{(tuple(x.shape), x.dtype)} for 2 rows. Got {got} from {transform!r} instead.")


def describe(transform) -> str | None:
    """How a run's record names the transform: its repr for a built-in one, module:name for a function."""
    if transform is None:
        return None
    if isinstance(transform, (RandomCrop, RandomHorizontalFlip, Compose)):
        return repr(transform)
    return f"{getattr(transform, '__module__', '?')}:{getattr(transform, '__qualname__', type(transform).__qualname__)}"
